"""The VisionAddOn interface and the machinery shared by every family.

An add-on owns mlx-vlm's vision tower + projector for one checkpoint (only those weights are
loaded), the family's processor (loaded with the worker's trust_remote_code option, never mlx-vlm's
default), and a memo of encoded images. For a request it turns the prompt plus images into
``PromptPlan(ids, key, embeddings, state)``: the ids the processor expands (image placeholders ->
image tokens), the embeddings mlx-vlm's own merge code builds from the mlx-lm model's
``embed_tokens`` and the image features, and a cache key whose image positions are image-specific.
"""

import abc
import functools
import glob
import importlib
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..prompting.prefix_tokens import PrefixTokenizer, detokenizer, probe_texts
from ..prompting.prompt import PromptInput, PromptPlan
from ..protocol import WorkerError, failing_as
from ..loading.weights import stored_dtype
from . import images as imgs


VISION_KEYS = ("vision_tower", "visual", "multi_modal_projector", "vision_encoder", "vision_projection")
MEMO_ENTRIES = 64
MEMO_BYTES = 512 << 20


@dataclass(frozen=True)
class ImageItem:
    """What a request needs of one image, kept in the memo by the sha256 of its encoded bytes."""

    digest: str
    expansion: str  # the text the processor put in place of this image's placeholder
    feats: mx.array  # the encoded image, as mlx-vlm's cached_image_features
    extras: dict  # split()'s extras for this image (e.g. image_grid_thw)
    count: int  # image-token positions it fills

    @functools.cached_property
    def keys(self) -> tuple:
        """The cache-key tokens of its image-token positions."""
        return tuple(image_key(self.digest, j) for j in range(self.count))

    @property
    def nbytes(self) -> int:
        return self.feats.nbytes


class FeatureMemo:
    """LRU of encoded images keyed by the encoded bytes' sha256."""

    def __init__(self, max_entries=MEMO_ENTRIES, max_bytes=MEMO_BYTES):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.items: "OrderedDict[str, ImageItem]" = OrderedDict()

    def get(self, digest):
        feats = self.items.get(digest)
        if feats is not None:
            self.items.move_to_end(digest)
        return feats

    def put(self, digest, feats):
        self.items[digest] = feats
        self.items.move_to_end(digest)
        while self.items and (len(self.items) > self.max_entries
                              or sum(it.nbytes for it in self.items.values()) > self.max_bytes):
            self.items.popitem(last=False)


class VisionParts(nn.Module):
    """What mlx-vlm's get_input_embeddings needs from ``self``: vision tower, projector, config and a
    ``language_model.model.embed_tokens`` that is the mlx-lm text model's embedding."""


def find_embed_tokens(text_model):
    for path in ("language_model.model.embed_tokens", "model.embed_tokens", "language_model.embed_tokens",
                 "model.language_model.embed_tokens"):
        obj = text_model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise WorkerError("model_load_failed", "the text model has no token embedding the vision add-on can use")


def image_key(digest: str, j: int) -> int:
    """A negative cache-key token for the j-th image token of an image: never equal to a real id."""
    return -(1 + ((int(digest[:15], 16) * 1_000_003 + j) % (1 << 62)))


class VisionAddOn(abc.ABC):
    """One vision family: mlx-vlm's vision tower + projector beside the mlx-lm text model.

    Class attributes a family sets: ``family`` (config model_type), ``module`` (mlx_vlm.models.<module>),
    ``processor_path`` ("module:Class" of mlx-vlm's processor), ``placeholder`` (the text of one image in a
    prompt), ``token_attr`` (the ModelConfig field of the image token id), ``add_special_tokens_for_chat``.

    Hooks (called on the engine thread, in this order for a request):
    - ``build_modules(parts)`` (abstract, at load): attach the mlx-vlm modules to ``parts``;
    - ``split(inputs, n)`` (abstract): per-image ``(pixel_values, extras)`` from the processor's output;
    - ``encode(pixel_values, extras)`` (abstract): one image's features, as mlx-vlm's
      ``cached_image_features``; memoized by the image's sha256;
    - ``join(feats)`` / ``count(feats)``: concatenate the images' features / how many image-token
      positions one image fills;
    - ``embed_kwargs(extras)``: extra keyword arguments of mlx-vlm's ``get_input_embeddings`` for the
      images (their ``split`` extras) whose tokens are embedded;
    - ``make_state(ids, items)``: per-request state for the whole prompt (``items``: its ImageItems),
      a context manager entered around the request's generation (Qwen's M-RoPE positions), or None.

    Each image is processed alone (the processor's text for its placeholder is recorded), so a
    family's processor must expand one image independently of the others, and tokenize the expanded
    prompt with ``self.tokenizer(text, ...)``, as every mlx-vlm processor of these families does.

    What mlx-vlm's ``Model.get_input_embeddings`` (called with ``self.parts`` as its ``self``) reads, so
    ``parts`` must carry it: ``config`` (``image_token_index`` / ``image_token_id``, ``video_token_id``,
    ``pad_token_id``, ``hidden_size``), ``vision_tower`` (Qwen: ``patch_embed.proj.weight.dtype``),
    ``multi_modal_projector``, ``vision_feature_layer`` (pixtral, mistral3: set it in ``build_modules``),
    ``language_model.model.embed_tokens`` (the text model's embedding; Qwen also
    ``language_model.get_rope_index``), and the family's static merge helpers
    (``prepare_inputs_for_multimodal``, ``merge_input_ids_with_image_features``), copied onto ``parts``.
    """

    family = ""
    module = ""
    processor_path = ""
    placeholder = ""
    token_attr = "image_token_index"
    add_special_tokens_for_chat = False  # the chat template already wrote BOS etc.
    weight_keys = VISION_KEYS  # checkpoint tensors loaded into ``parts`` (names containing one of these)
    tower_attr = "vision_tower"  # the ``parts`` module whose ``sanitize`` the weights go through
    cached_pixels = None  # pixel_values beside cached features (None: _PIXELS_CACHED; idefics3 needs 5-D)

    def __init__(self, path: Path, config: dict, text_model, options):
        self.path = Path(path)
        self.options = options
        self.mod = importlib.import_module(f"mlx_vlm.models.{self.module}")
        self.mc = self._model_config(config)
        self.image_token_id = getattr(self.mc, self.token_attr)
        self.parts = self._load_parts(config, text_model)
        self.parts.language_model = self._language_stub(find_embed_tokens(text_model))
        self.processor = self._load_processor()
        self.memo = FeatureMemo()
        self._tok_kwargs = {}  # what the processor passes its tokenizer (recorded at the first image)
        self._encoder = None

    # ---- family hooks -------------------------------------------------------------------------
    @abc.abstractmethod
    def build_modules(self, parts: VisionParts) -> None:
        """Attach ``vision_tower`` / ``multi_modal_projector`` (mlx-vlm classes) to ``parts``."""

    @abc.abstractmethod
    def split(self, inputs: dict, n: int) -> list:
        """Per-image (pixel_values, extras) from the processor's output for n images."""

    @abc.abstractmethod
    def encode(self, pixel_values, extras):
        """Features of one image in the form mlx-vlm passes as ``cached_image_features``."""

    def join(self, feats: list):
        return mx.concatenate(feats, axis=0)

    def count(self, feats) -> int:
        """How many image-token positions one image's features fill."""
        return int(feats.shape[-2]) if feats.ndim == 3 else int(feats.shape[0])

    def embed_kwargs(self, extras: list) -> dict:
        """Extra keyword arguments of ``get_input_embeddings`` for images with these extras."""
        return {}

    def make_state(self, ids: list, items: list):
        return None

    def batch_positions(self, states: list):
        """A context manager for one batched decode step whose rows have these ``make_state`` states
        (None for a row without), or None when the family needs none."""
        return None

    # ---- loading ------------------------------------------------------------------------------
    def _model_config(self, config: dict):
        import json

        from mlx_vlm.utils import update_module_configs

        c = json.loads(json.dumps(config))
        c.setdefault("text_config", {})
        c.setdefault("vision_config", {})
        mc = self.mod.ModelConfig.from_dict(c)
        return update_module_configs(mc, self.mod, c, ["text", "vision", "projector"])

    def _language_stub(self, embed):
        return types.SimpleNamespace(model=types.SimpleNamespace(embed_tokens=embed))

    def _load_parts(self, config: dict, text_model) -> VisionParts:
        parts = VisionParts()
        parts.config = self.mc
        for name, value in vars(self.mod.Model).items():  # merge helpers are static methods
            if isinstance(value, staticmethod):
                object.__setattr__(parts, name, getattr(self.mod.Model, name))
        self.build_modules(parts)
        weights = {}
        for wf in sorted(glob.glob(str(self.path / "*.safetensors"))):
            if wf.endswith("consolidated.safetensors"):
                continue
            for k, v in mx.load(wf).items():
                if any(s in k for s in self.weight_keys):
                    weights[k] = v
        if not weights:
            raise WorkerError("model_load_failed", "the checkpoint has no vision tower weights")
        if hasattr(self.mod.Model, "sanitize"):
            weights = self.mod.Model.sanitize(parts, weights)
        weights = getattr(parts, self.tower_attr).sanitize(weights)
        weights = {k: v for k, v in weights.items() if not k.startswith("language_model")}
        quant = config.get("quantization") or config.get("quantization_config")
        if quant and any(k.endswith(".scales") for k in weights):
            def wanted(p, m):
                return hasattr(m, "to_quantized") and f"{p}.scales" in weights

            nn.quantize(parts, group_size=quant.get("group_size", 64), bits=quant.get("bits", 4),
                        mode=quant.get("mode", "affine"), class_predicate=wanted)
        try:
            parts.load_weights(list(weights.items()), strict=True)
        except ValueError as exc:
            raise WorkerError("model_load_failed", f"vision weights do not fit {self.family}: {exc}")
        target = stored_dtype(text_model)
        parts.set_dtype(target, lambda d: mx.issubdtype(d, mx.floating))
        mx.eval(parts.parameters())
        parts.eval()
        return parts

    def _load_processor(self):
        mod_name, cls_name = self.processor_path.split(":")
        cls = getattr(importlib.import_module(f"mlx_vlm.models.{mod_name}"), cls_name)
        with failing_as("model_load_failed", "could not load the image processor"):
            return cls.from_pretrained(str(self.path), trust_remote_code=self.options.trust_remote_code)

    # ---- a request ----------------------------------------------------------------------------
    def build_prompt(self, kit, inp: PromptInput) -> PromptPlan:
        """The plan for a validated prompt with images (``worker.prompting.prompt.normalise`` made ``inp``).

        A memoized image (same bytes) is neither decoded nor processed nor encoded again: its
        placeholder expands to the text the processor gave it the first time, the whole prompt is
        tokenized as the processor would, and ``plan.embed`` builds embeddings only for the part
        of the prompt the cache does not hold.
        """
        found = inp.text.count(self.placeholder)
        if found != len(inp.images):
            raise WorkerError("invalid_params", f"the prompt has {found} image placeholders "
                              f"({self.placeholder!r}) for {len(inp.images)} images")
        items = [self._image(imgs.source(p, i), i) for i, p in enumerate(inp.images)]
        pieces = inp.text.split(self.placeholder)
        text = pieces[0] + "".join(it.expansion + after for it, after in zip(items, pieces[1:]))
        ids = self._tokenize(text, inp.add_special_tokens)
        if not ids:
            raise WorkerError("invalid_params", "the prompt is empty")
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if sum(it.count for it in items) != len(positions):
            raise WorkerError("invalid_params", f"{len(positions)} image tokens in the prompt for "
                              f"{sum(it.count for it in items)} image features: do not write image tokens "
                              "yourself")
        key, spans, at = list(ids), [], 0
        for it in items:
            for j, k in enumerate(it.keys):
                key[positions[at + j]] = k
            spans.append((positions[at], positions[at + it.count - 1] + 1))
            at += it.count
        embed = functools.partial(self._embed, ids, items, spans)
        return PromptPlan(ids=ids, key=key, embed=embed, state=self.make_state(ids, items),
                          remember=self._remember(kit, text, inp.add_special_tokens, ids))

    def _remember(self, kit, text: str, special: bool, ids: list):
        """The plan's ``remember``: the model's output after this prompt, told to the tokenizer that made ``ids``
        (none when the processor's own tokenizer call made them)."""
        if self._encoder is None:
            return None
        return functools.partial(self._encoder.remember_output, text, special, ids,
                                 detokenize=detokenizer(kit.tokenizer))

    def _image(self, src: imgs.Source, index: int) -> ImageItem:
        """One image's memo entry: on a miss it is decoded, processed alone and encoded, once."""
        item = self.memo.get(src.digest)
        if item is not None:
            return item
        digest = src.digest
        image = imgs.decode(src.read(), index, digest)
        recorder = _TextRecorder(self.processor.tokenizer)
        self.processor.tokenizer = recorder
        try:
            inputs = self._process(self.placeholder, [image.image])
        finally:
            self.processor.tokenizer = recorder.tok
        if recorder.text is None:
            raise WorkerError("internal", f"the {self.family} processor did not tokenize as expected")
        self._tok_kwargs = recorder.kwargs
        pv, extras = self.split(inputs, 1)[0]
        feats = self.encode(pv, extras)
        mx.eval(feats)
        item = ImageItem(digest, recorder.text, feats, extras, self.count(feats))
        self.memo.put(digest, item)
        return item

    def _tokenize(self, text: str, add_special: bool) -> list:
        """The prompt's ids, tokenized exactly as the family's processor tokenizes its expanded text
        (through a PrefixTokenizer when the processor passes its tokenizer nothing else)."""
        kwargs = {k: v for k, v in self._tok_kwargs.items() if k not in _NOT_TOKENIZER_KWARGS}
        if not kwargs:
            if self._encoder is None:
                self._encoder = PrefixTokenizer(self.processor.tokenizer, probe_texts(self.processor.tokenizer))
            return self._encoder.encode(text, add_special)
        out = self.processor.tokenizer([text], add_special_tokens=add_special, **kwargs)
        ids = out["input_ids"]
        return [int(t) for t in (ids[0] if len(ids) and not isinstance(ids[0], int) else ids)]

    def _embed(self, ids: list, items: list, spans: list, reused: int):
        """Input embeddings of ``ids[reused:]``, from mlx-vlm's merge code over the smallest suffix
        that starts outside an image (an image cut by the cache boundary is merged whole)."""
        start = min([b for b, e in spans if b < reused < e] + [reused])
        sel = [it for it, (b, _) in zip(items, spans) if b >= start]
        ids_arr = mx.array(ids[start:])[None]
        if not sel:  # what every family's get_input_embeddings does without pixels (left lazy: the
            return self.parts.language_model.model.embed_tokens(ids_arr)[0]  # first forward evaluates it)
        extra = self.embed_kwargs([it.extras for it in sel]) if sel else {}
        pixels = _PIXELS_CACHED if self.cached_pixels is None else self.cached_pixels
        embedded = self.mod.Model.get_input_embeddings(
            self.parts, ids_arr, pixels if sel else None, mask=mx.ones(ids_arr.shape, mx.int32),
            cached_image_features=self.join([it.feats for it in sel]) if sel else None, **extra)
        emb = embedded.inputs_embeds[0][reused - start:]
        mx.eval(emb)
        return emb

    def _process(self, text: str, images: list) -> dict:
        from mlx_vlm.utils import prepare_inputs

        with failing_as("invalid_image", "the image processor refused the input"):
            return prepare_inputs(self.processor, images=images, prompts=text,
                                  image_token_index=self.image_token_id, add_special_tokens=False)


# mlx-vlm's get_input_embeddings only checks that pixels were given when cached features are passed
_PIXELS_CACHED = mx.zeros((1, 1, 1, 1))
_NOT_TOKENIZER_KWARGS = ("add_special_tokens", "return_tensors", "padding", "padding_side")


class _TextRecorder:
    """Stands in for a processor's tokenizer for one call: records the expanded text it is given."""

    def __init__(self, tok):
        self.tok, self.text, self.kwargs = tok, None, {}

    def __call__(self, text, **kwargs):
        self.text = text[0] if isinstance(text, list) else text
        self.kwargs = kwargs
        return self.tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)
