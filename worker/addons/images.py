"""Image inputs on the wire -> validated PIL images with a content hash.

Sources: ``{"type": "image", "path": ...}``, ``{"type": "image", "data": <base64 or data: URL>}`` and
OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}`` (data: URL, file:// URL or absolute
path; nothing is ever fetched over a network). PNG, JPEG, WebP and GIF (first frame) are accepted.
The size is checked from the header before any pixel is decoded, so decompression bombs are refused
cheaply. Images are not resized here: the model's processor applies its own limits.
"""

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from ..protocol import ImagePart, ImageUrlPart, WorkerError
from . import media

CODE = "invalid_image"
FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
MAX_BYTES = 64 << 20  # encoded size of one image
MAX_SIDE = 16384  # pixels per side
MAX_PIXELS = 64_000_000  # width * height


@dataclass
class LoadedImage:
    digest: str  # sha256 of the encoded bytes: the identity used by the feature memo and cache key
    image: Any  # PIL.Image.Image, RGB
    size: tuple  # (width, height) as stored


def _bad(msg: str) -> WorkerError:
    return WorkerError(CODE, msg)


def _locate(part, what: str):
    """("path", absolute path) or ("data", bytes) for an image part."""
    if isinstance(part, ImagePart):
        return media.from_part(part, what, CODE, MAX_BYTES)
    if isinstance(part, ImageUrlPart):
        url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
        if url.startswith("data:"):
            return "data", media.from_data(url, what, CODE, MAX_BYTES)
        if url.startswith("file://"):
            return "path", unquote(urlparse(url).path)
        if url.startswith("/"):
            return "path", url
        raise _bad(f"{what}: only data:, file:// or absolute-path image URLs are accepted (no network)")
    raise _bad(f"{what}: not an image part")


Source = media.Source


def source(part, index: int = 0) -> Source:
    what = f"image {index + 1}"
    kind, value = _locate(part, what)
    if kind == "data":
        return media.data_source(value)
    return media.file_source(value, what, CODE, MAX_BYTES)


def decode(data: bytes, index: int = 0, digest: str = "") -> LoadedImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    what = f"image {index + 1}"
    if not data:
        raise _bad(f"{what}: empty")
    try:
        img = Image.open(io.BytesIO(data), formats=sorted(FORMATS))
    except UnidentifiedImageError:
        raise _bad(f"{what}: not a PNG, JPEG, WebP or GIF image")
    except Exception as exc:  # truncated headers and friends
        raise _bad(f"{what}: unreadable image ({exc})")
    w, h = img.size
    if w < 1 or h < 1 or max(w, h) > MAX_SIDE or w * h > MAX_PIXELS:
        raise _bad(f"{what}: {w}x{h} is outside the accepted size (at most {MAX_SIDE} px a side "
                   f"and {MAX_PIXELS // 1_000_000} megapixels)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.seek(0)  # GIF / animated WebP: the first frame
            img.load()
            img = ImageOps.exif_transpose(img)  # like mlx-vlm's load_image
            rgb = img.convert("RGB")
    except Exception as exc:
        raise _bad(f"{what}: could not decode the {img.format} data ({exc})")
    return LoadedImage(digest or hashlib.sha256(data).hexdigest(), rgb, (w, h))

