"""Audio inputs: wire parts -> validated mono samples, and the AudioAddOn mixin for families with an
audio tower.

Sources: ``{"type": "audio", "path": ...}`` (absolute) or ``{"type": "audio", "data": <base64 or
data: URL>}``. WAV, FLAC and MP3 are accepted, recognised by their first bytes and decoded by
miniaudio (through mlx-audio's reader, as mlx-vlm's ``load_audio`` does: no ffmpeg is ever run).
The size is checked before reading and the duration from the header before any sample is decoded.
Clips are downmixed to mono and resampled to the feature extractor's rate exactly like
``mlx_vlm.utils.load_audio``.

A family with audio mixes ``AudioAddOn`` in before ``VisionAddOn`` (``class F(AudioAddOn,
VisionAddOn)``) and implements ``encode_audio`` (one clip's features, memoized by the sha256 of its
encoded bytes) and ``merge`` (the input embeddings of a prompt with images and clips). Each clip is
processed alone; its placeholder expands to the text the processor gave it, and its audio-token
positions get content-specific cache keys, as images do. (mlx-vlm 0.7.10 processes a prompt's clips as
one batch padded to the longest: on Gemma 3n the last audio token of a shorter clip then differs from
the clip alone; on Gemma 4 it merges the flattened padded batch, so a clip after a shorter one reads
that clip's padding frames throughout. tests/families/test_audio_*.py pin both.)
"""

import functools
import inspect
import io
import re

import mlx.core as mx

from ..prompting.prompt import PromptInput, PromptPlan
from ..protocol import AudioPart, WorkerError, failing_as
from . import images as imgs
from . import media
from .base import FeatureMemo, ImageItem, _TextRecorder

CODE = "invalid_audio"
MAX_BYTES = 64 << 20  # encoded size of one clip
MAX_SECONDS = 600.0  # longest clip any family takes (max_audio_seconds lowers it)
BASE64_ONLY = "a data: URL must be base64 (data:audio/wav;base64,...)"


def _bad(msg: str) -> WorkerError:
    return WorkerError(CODE, msg)


def source(part, index: int = 0) -> imgs.Source:
    what = f"audio {index + 1}"
    if not isinstance(part, AudioPart):
        raise _bad(f"{what}: not an audio part")
    kind, value = media.from_part(part, what, CODE, MAX_BYTES, BASE64_ONLY)
    if kind == "path":
        return media.file_source(value, what, CODE, MAX_BYTES)
    return media.data_source(value)


def sniff(data: bytes):
    """'wav', 'flac', 'mp3' or None, from the first bytes."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and data[1] & 6):
        return "mp3"
    return None


def duration(data: bytes, what: str) -> float:
    """Seconds of audio in the clip, from its header (nothing is decoded); refuses other formats."""
    import miniaudio

    fmt = sniff(data)
    if fmt is None:
        raise _bad(f"{what}: not a WAV, FLAC or MP3 file")
    get_info = {"wav": miniaudio.wav_get_info, "flac": miniaudio.flac_get_info, "mp3": miniaudio.mp3_get_info}
    try:
        info = get_info[fmt](data)
    except Exception as exc:  # miniaudio.DecodeError and friends: a truncated or corrupt header
        raise _bad(f"{what}: unreadable {fmt.upper()} data ({exc})")
    if info.num_frames <= 0 or info.sample_rate <= 0:
        raise _bad(f"{what}: the {fmt.upper()} file holds no audio")
    return info.num_frames / info.sample_rate


def decode(data: bytes, rate: int, index: int = 0, max_seconds: float = MAX_SECONDS):
    """Mono float32 samples at ``rate``, as mlx-vlm's ``load_audio`` makes them."""
    import numpy as np
    from mlx_audio.audio_io import read
    from mlx_audio.utils import resample_audio

    what = f"audio {index + 1}"
    if not data:
        raise _bad(f"{what}: empty")
    seconds = duration(data, what)
    if seconds > max_seconds:
        raise _bad(f"{what}: {seconds:.1f} s long; this model takes clips of at most {max_seconds:g} s")
    with failing_as("invalid_audio", f"{what}: could not decode the {sniff(data).upper()} data"):
        samples, sr = read(io.BytesIO(data), dtype="float32")
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim > 1:
            samples = samples.mean(axis=1)
        if sr != rate:
            samples = resample_audio(samples, sr, rate)
    if samples.size == 0:
        raise _bad(f"{what}: the file holds no audio")
    return np.asarray(samples, dtype=np.float32)


def _expand(text: str, expansions: dict) -> str:
    """``text`` with each placeholder (a key) replaced by the next expansion of its iterator."""
    pattern = "|".join(re.escape(p) for p in expansions)
    return re.sub(pattern, lambda m: next(expansions[m.group(0)]), text)


class AudioAddOn:
    """Audio clips beside images for a VisionAddOn family (mix in first). The family sets
    ``audio_placeholder`` (one clip's text in a prompt) and ``audio_token_attr`` (the ModelConfig
    field of the audio token id), and implements:

    - ``encode_audio(inputs, index)``: one clip's features ``[1, count, hidden]`` from the processor's
      output for it alone (``count``: the audio-token positions the clip's expansion fills);
    - ``merge(ids, image_feats, audio_feats)``: input embeddings ``[1, L, hidden]`` of ``ids`` ``[1, L]``
      with the joined features of the images / clips whose tokens it holds (each None when none);
    - optionally ``max_audio_seconds()`` (when the default below does not fit) and ``accepts_audio =
      False`` (a checkpoint without the tower).
    """

    audio_placeholder = ""
    audio_token_attr = "audio_token_id"
    accepts_audio = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.audio_memo = FeatureMemo()
        self.audio_token_id = getattr(self.mc, self.audio_token_attr)

    def encode_audio(self, inputs: dict, index: int):
        raise NotImplementedError

    def merge(self, ids, image_feats, audio_feats):
        raise NotImplementedError

    def max_audio_seconds(self) -> float:
        """The feature extractor's ``max_length`` samples, where its ``__call__`` has one (Gemma 3n's and
        4's: 30 s), since it cuts clips there: longer ones are refused rather than silently shortened."""
        fe = getattr(self.processor, "feature_extractor", None)
        limit = inspect.signature(fe.__call__).parameters.get("max_length") if fe is not None else None
        samples = limit.default if limit is not None and isinstance(limit.default, int) else None
        return min(MAX_SECONDS, samples / self.sampling_rate) if samples else MAX_SECONDS

    @property
    def sampling_rate(self) -> int:
        return int(getattr(self.processor.feature_extractor, "sampling_rate", 16000))

    # ---- a request ----------------------------------------------------------------------------
    def build_prompt(self, kit, inp: PromptInput) -> PromptPlan:
        """Like ``VisionAddOn.build_prompt``, over images and clips (each kind in its own order)."""
        for ph, parts, kind in ((self.placeholder, inp.images, "image"), (self.audio_placeholder, inp.audio,
                                                                           "audio")):
            found = inp.text.count(ph)
            if found != len(parts):
                raise WorkerError("invalid_params", f"the prompt has {found} {kind} placeholders ({ph!r}) "
                                  f"for {len(parts)} {kind} inputs")
        images = [self._image(imgs.source(p, i), i) for i, p in enumerate(inp.images)]
        clips = [self._audio(source(p, i), i) for i, p in enumerate(inp.audio)]
        text = _expand(inp.text, {self.placeholder: (it.expansion for it in images),
                                  self.audio_placeholder: (it.expansion for it in clips)})
        ids = self._tokenize(text, inp.add_special_tokens)
        if not ids:
            raise WorkerError("invalid_params", "the prompt is empty")
        key, spans = list(ids), []
        for token, items, kind in ((self.image_token_id, images, "image"), (self.audio_token_id, clips, "audio")):
            positions = [i for i, t in enumerate(ids) if t == token]
            if sum(it.count for it in items) != len(positions):
                raise WorkerError("invalid_params", f"{len(positions)} {kind} tokens in the prompt for "
                                  f"{sum(it.count for it in items)} {kind} features: do not write {kind} "
                                  "tokens yourself")
            at = 0
            for it in items:
                for j, k in enumerate(it.keys):
                    key[positions[at + j]] = k
                spans.append((positions[at], positions[at + it.count - 1] + 1, kind, it))
                at += it.count
        spans.sort(key=lambda s: s[0])
        embed = functools.partial(self._embed_media, ids, spans)
        return PromptPlan(ids=ids, key=key, embed=embed, state=self.make_state(ids, images),
                          remember=self._remember(kit, text, inp.add_special_tokens, ids))

    def _audio(self, src: imgs.Source, index: int) -> ImageItem:
        """One clip's memo entry: on a miss it is decoded, processed alone and encoded, once."""
        item = self.audio_memo.get(src.digest)
        if item is not None:
            return item
        samples = decode(src.read(), self.sampling_rate, index, self.max_audio_seconds())
        recorder = _TextRecorder(self.processor.tokenizer)
        self.processor.tokenizer = recorder
        try:
            inputs = self._process_audio(self.audio_placeholder, samples, index)
        finally:
            self.processor.tokenizer = recorder.tok
        if recorder.text is None:
            raise WorkerError("internal", f"the {self.family} processor did not tokenize as expected")
        self._tok_kwargs = recorder.kwargs
        with failing_as("invalid_audio", f"audio {index + 1}: the audio tower could not encode it"):
            feats = self.encode_audio(inputs, index)
            mx.eval(feats)
        item = ImageItem(src.digest, recorder.text, feats, {}, self.count(feats))
        self.audio_memo.put(src.digest, item)
        return item

    def _process_audio(self, text: str, samples, index: int) -> dict:
        from mlx_vlm.utils import prepare_inputs

        with failing_as("invalid_audio", f"audio {index + 1}: the audio processor refused it"):
            return prepare_inputs(self.processor, audio=[samples], prompts=text, add_special_tokens=False)

    def _embed_media(self, ids: list, spans: list, reused: int):
        """Input embeddings of ``ids[reused:]`` over the smallest suffix that starts outside an image or
        clip (one cut by the cache boundary is merged whole)."""
        start = min([b for b, e, _, _ in spans if b < reused < e] + [reused])
        sel = [(kind, it) for b, _, kind, it in spans if b >= start]
        feats = {kind: [it.feats for k, it in sel if k == kind] for kind in ("image", "audio")}
        emb = self.merge(mx.array(ids[start:])[None], self.join(feats["image"]) if feats["image"] else None,
                         self.join(feats["audio"]) if feats["audio"] else None)[0][reused - start:]
        mx.eval(emb)
        return emb
