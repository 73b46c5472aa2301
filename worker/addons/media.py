"""Reading one media source from the wire (images and audio clips alike): base64 or a data: URL, or an
absolute file path, with a size limit checked before anything is decoded or read. Errors carry the
kind's code (``invalid_image``, ``invalid_audio``); ``what`` ("image 2", "audio 1") starts each message.
A source is its content hash and a way to read its bytes (``Source``); a file unchanged since it was
hashed is not read again (``file_source``).
"""

import base64
import binascii
import functools
import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote

from ..protocol import WorkerError


def from_data(data: str, what: str, code: str, max_bytes: int, base64_only: str = "") -> bytes:
    """The bytes of a base64 string or data: URL. ``base64_only``: the message refusing a data: URL that
    is not base64 (or has no comma); empty: such a URL's payload is taken percent-decoded."""
    data = data.strip()
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep:
            raise WorkerError(code, f"{what}: {base64_only or 'a data: URL needs a comma before its payload'}")
        if ";base64" not in head:
            if base64_only:
                raise WorkerError(code, f"{what}: {base64_only}")
            return unquote(data).encode("latin-1", "replace")
    if len(data) > max_bytes * 4 // 3 + 16:
        raise WorkerError(code, f"{what}: larger than {max_bytes >> 20} MiB")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WorkerError(code, f"{what}: `data` is not valid base64 ({exc})")


def stat_file(path: str, what: str, code: str, max_bytes: int) -> os.stat_result:
    """The file's stat, once it is known to be absolute, readable and at most ``max_bytes``."""
    if not os.path.isabs(path):
        raise WorkerError(code, f"{what}: `path` must be absolute: {path!r}")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise WorkerError(code, f"{what}: cannot read {path}: {exc.strerror or exc}")
    if st.st_size > max_bytes:
        raise WorkerError(code, f"{what}: {path} is larger than {max_bytes >> 20} MiB")
    return st


def read_file(path: str, what: str, code: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise WorkerError(code, f"{what}: cannot read {path}: {exc.strerror or exc}")


def from_part(part, what: str, code: str, max_bytes: int, base64_only: str = ""):
    """("path", path) or ("data", bytes) for a part with exactly one of ``path`` and ``data``."""
    if (part.path is None) == (part.data is None):
        raise WorkerError(code, f"{what}: give exactly one of `path` or `data`")
    if part.path is not None:
        return "path", part.path
    return "data", from_data(part.data, what, code, max_bytes, base64_only)


@dataclass(frozen=True)
class Source:
    digest: str  # sha256 of the encoded bytes
    read: Callable[[], bytes]  # the bytes (read again from the file if they were not needed to hash)


def data_source(data: bytes) -> Source:
    return Source(hashlib.sha256(data).hexdigest(), lambda: data)


# path -> ((inode, size, mtime_ns), digest): a file unchanged since it was hashed is not read again.
# Like git's index, only files whose mtime was already RACY_NS old when hashed are remembered, so a
# rewrite within one timestamp tick cannot go unnoticed.
_DIGESTS: "OrderedDict[str, tuple]" = OrderedDict()
MAX_DIGESTS = 1024
RACY_NS = 2_000_000_000


def file_source(path: str, what: str, code: str, max_bytes: int) -> Source:
    st = stat_file(path, what, code, max_bytes)
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    known = _DIGESTS.get(path)
    if known is not None and known[0] == sig:
        _DIGESTS.move_to_end(path)
        return Source(known[1], functools.partial(read_file, path, what, code))
    data = read_file(path, what, code)
    digest = hashlib.sha256(data).hexdigest()
    if time.time_ns() - st.st_mtime_ns > RACY_NS:
        _DIGESTS[path] = (sig, digest)
        while len(_DIGESTS) > MAX_DIGESTS:
            _DIGESTS.popitem(last=False)
    return Source(digest, lambda: data)
