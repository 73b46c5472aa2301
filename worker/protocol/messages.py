"""Every message on the wire, as msgspec Structs: the single definition of the protocol.

Requests are a tagged union on ``type``; events carry ``type``, ``id`` and ``seq``. The writer
thread assigns ``seq`` just before encoding, so events are built with ``seq=0``.
"""

from typing import Literal, Optional, Union

import msgspec
from msgspec import Meta, Struct
from typing_extensions import Annotated

PROTOCOL_VERSION = "1.0"

NonNeg = Annotated[int, Meta(ge=0)]
Pos = Annotated[int, Meta(ge=1)]
RequestId = Annotated[str, Meta(min_length=1, max_length=256)]


# ---------------------------------------------------------------- requests


class Request(Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    id: RequestId


class LoadOptions(Struct, forbid_unknown_fields=True, kw_only=True):
    max_kv_size: Optional[Pos] = None
    prefill_step_size: Optional[Annotated[int, Meta(ge=1, le=65536)]] = None  # null: per device
    trust_remote_code: bool = False
    seed: Optional[NonNeg] = None
    dtype: Literal["auto", "stored", "float32", "float16", "bfloat16"] = "auto"
    cache_max_bytes: NonNeg = 2 << 30
    cache_max_entries: NonNeg = 8
    cache_dir: Optional[str] = None
    cache_disk_bytes: NonNeg = 8 << 30
    kv_bits: Optional[Literal[4, 8]] = None
    kv_group_size: Literal[32, 64, 128] = 64
    quantized_kv_start: NonNeg = 0
    draft_model_path: Optional[Annotated[str, Meta(min_length=1)]] = None
    max_memory: Optional[Pos] = None
    warmup: Optional[bool] = None  # null: on a GPU only


class Load(Request, tag="load", kw_only=True):
    model_path: Annotated[str, Meta(min_length=1)]
    options: LoadOptions = msgspec.field(default_factory=LoadOptions)


class TextPart(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: str


class ImagePart(Struct, tag="image", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """An image: exactly one of an absolute file ``path`` or base64 ``data`` (a data: URL is fine)."""

    path: Optional[str] = None
    data: Optional[str] = None


class ImageUrl(Struct, forbid_unknown_fields=True):
    url: str
    detail: Optional[str] = None


class ImageUrlPart(Struct, tag="image_url", tag_field="type", forbid_unknown_fields=True):
    """OpenAI's form: ``url`` is a data: URL or a file path / file:// URL (never fetched over a network)."""

    image_url: Union[str, ImageUrl]


ContentPart = Union[TextPart, ImagePart, ImageUrlPart]


class Message(Struct, forbid_unknown_fields=True, kw_only=True):
    role: Annotated[str, Meta(min_length=1)]
    content: Union[str, list[ContentPart]] = ""


class Prompt(Struct, forbid_unknown_fields=True, kw_only=True):
    """Exactly one of ``text``, ``tokens`` or ``messages``."""

    text: Optional[str] = None
    tokens: Optional[list[NonNeg]] = None
    messages: Optional[list[Message]] = None
    images: Optional[list[ImagePart]] = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class GenerateParams(Struct, forbid_unknown_fields=True, kw_only=True):
    max_tokens: Annotated[int, Meta(ge=0, le=1_000_000)] = 512
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0)] = 0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    seed: Optional[NonNeg] = None
    stop: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=16)] = []
    stop_token_ids: Annotated[list[NonNeg], Meta(max_length=64)] = []
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] = 0
    repetition_penalty: Optional[Annotated[float, Meta(gt=0.0, le=10.0)]] = None
    repetition_context_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 20
    presence_penalty: Annotated[float, Meta(ge=-10.0, le=10.0)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-10.0, le=10.0)] = 0.0
    logit_bias: dict[NonNeg, Annotated[float, Meta(ge=-100.0, le=100.0)]] = {}
    json_schema: Optional[Union[dict, bool]] = None
    speculative: bool = True
    num_draft_tokens: Annotated[int, Meta(ge=1, le=32)] = 3


class Generate(Request, tag="generate", kw_only=True):
    prompt: Prompt
    cache_key: Optional[Annotated[str, Meta(min_length=1, max_length=256)]] = None
    params: GenerateParams = msgspec.field(default_factory=GenerateParams)


class LoadDraft(Request, tag="load_draft", kw_only=True):
    """Load (or with ``model_path: null`` drop) the draft model for speculative decoding."""

    model_path: Optional[Annotated[str, Meta(min_length=1)]]


class Cancel(Request, tag="cancel", kw_only=True):
    target: str


class Unload(Request, tag="unload", kw_only=True):
    pass


class Tokenize(Request, tag="tokenize", kw_only=True):
    text: str
    add_special_tokens: bool = True


class Status(Request, tag="status", kw_only=True):
    pass


class CacheClear(Request, tag="cache_clear", kw_only=True):
    pass


class Shutdown(Request, tag="shutdown", kw_only=True):
    pass


AnyRequest = Union[Load, LoadDraft, Generate, Cancel, Unload, Tokenize, Status, CacheClear, Shutdown]
REQUEST_TYPES = {cls.__struct_config__.tag: cls for cls in AnyRequest.__args__}


# ---------------------------------------------------------------- events


class Event(Struct, tag_field="type", omit_defaults=True, kw_only=True):
    id: Optional[str]
    seq: int = 0


class DeviceInfo(Struct, omit_defaults=True, kw_only=True):
    type: Literal["cpu", "gpu"]
    name: str = ""
    compute_dtype: str
    blas: Optional[dict] = None


class Limits(Struct, kw_only=True):
    max_line_bytes: int
    max_queue: int


class Ready(Event, tag="ready", kw_only=True):
    protocol_version: str
    versions: dict[str, str]
    device: DeviceInfo
    pid: int
    capabilities: list[str]
    limits: Limits


class Progress(Event, tag="progress", kw_only=True):
    stage: Literal["load", "prompt"]
    fraction: float
    total: Optional[int] = None
    cached: Optional[int] = None
    processed: Optional[int] = None


class TopLogprob(Struct, kw_only=True):
    id: int
    text: str
    logprob: float


class TokenLogprob(Struct, kw_only=True):
    id: int
    logprob: float
    top: list[TopLogprob] = []


class Token(Event, tag="token", kw_only=True):
    text: str
    tokens: list[int]
    logprobs: Optional[list[TokenLogprob]] = None  # with params.top_logprobs > 0: one per id in `tokens`
    from_draft: Optional[list[bool]] = None  # with a draft model: one per id in `tokens`


class Stats(Event, tag="stats", kw_only=True):
    prompt_tokens: int
    cached_tokens: int
    cache_miss_reason: Optional[str] = None
    generated_tokens: int
    ttft_s: float
    prompt_tps: float
    generation_tps: float
    peak_memory_bytes: int
    total_s: float
    speculative: Optional[str] = None  # "on", or "off: <why>" when a draft model is loaded
    draft_tokens_accepted: Optional[int] = None
    draft_tokens_proposed: Optional[int] = None


class CacheStats(Struct, kw_only=True):
    entries: int
    tokens: int
    bytes: int
    disk_entries: int
    max_bytes: int
    max_entries: int


class ModelInfo(Struct, omit_defaults=True, kw_only=True):
    path: str
    model_type: str
    context_length: Optional[int] = None
    vocab_size: int
    vision: bool = False
    eos_token_ids: list[int]
    chat_template: bool
    compute_dtype: str
    stored_dtype: str
    prefill_step_size: int
    parameters: int
    load_s: float
    warmup_s: Optional[float] = None


StopReason = Literal["eos", "stop_string", "stop_token", "max_tokens", "context_full", "cancelled"]


class Done(Event, tag="done", kw_only=True):
    """The terminal success event. Which fields are present depends on the request type."""

    request: str
    # generate (and a cancelled request of any type)
    stop_reason: Optional[StopReason] = None
    stop_string: Optional[str] = None
    stop_token: Optional[int] = None
    text: Optional[str] = None
    cached_tokens: Optional[int] = None
    cache_miss_reason: Optional[str] = None
    # load, status
    model: Optional[ModelInfo] = None
    draft: Optional[ModelInfo] = None
    warnings: Optional[list[str]] = None
    # tokenize
    tokens: Optional[list[int]] = None
    # cancel
    cancelled: Optional[bool] = None
    # status
    state: Optional[str] = None
    active: Optional[str] = None
    queue: Optional[list[str]] = None
    engine_alive: Optional[bool] = None
    # status, cache_clear (for cache_clear: what was dropped)
    cache: Optional[CacheStats] = None


class Error(Event, tag="error", kw_only=True):
    code: str
    number: int
    message: str


class Fatal(Event, tag="fatal", kw_only=True):
    """The last line before the worker exits on a failure it cannot survive (exit status 70)."""

    reason: str


class Log(Event, tag="log", kw_only=True):
    level: Literal["debug", "info", "warning", "error"]
    message: str


AnyEvent = Union[Ready, Progress, Token, Stats, Done, Error, Fatal, Log]
