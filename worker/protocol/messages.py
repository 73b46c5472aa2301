"""Every message on the wire, as msgspec Structs: the single definition of the protocol.

Requests are a tagged union on ``type``; events carry ``type``, ``id`` and ``seq``. The writer
thread assigns ``seq`` just before encoding, so events are built with ``seq=0``.
"""

from typing import Any, Literal, Optional, Union

import msgspec
from msgspec import Meta, Struct
from typing_extensions import Annotated

from .errors import CODES

PROTOCOL_VERSION = "1.8"

from .ranks import RankInfo, Ranks, doc  # noqa: F401  (the world of several ranks; doc lives there)
from .kv_memory import KvMemory  # noqa: E402  (status.kv_memory)


NonNeg = Annotated[int, Meta(ge=0)]
Pos = Annotated[int, Meta(ge=1)]
RequestId = Annotated[str, Meta(min_length=1, max_length=256)]


# ---------------------------------------------------------------- requests


class Request(Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    id: doc(RequestId, "the host's name for this request; every event about it carries it")


class LoadOptions(Struct, forbid_unknown_fields=True, kw_only=True):
    max_kv_size: doc(Optional[Pos], "keep at most this many tokens of KV (a rotating window); null: unbounded") = None
    prefill_step_size: doc(Optional[Annotated[int, Meta(ge=1, le=65536)]],
                           "prompt tokens per prefill chunk; null: 256 on a CPU, 2048 on a GPU") = None
    trust_remote_code: doc(bool, "allow a checkpoint that asks to run its own Python code") = False
    seed: doc(Optional[NonNeg], "seed MLX's random generator at load") = None
    dtype: doc(Literal["auto", "stored", "float32", "float16", "bfloat16"],
               "compute dtype; auto: float32 on a CPU for half-precision checkpoints, else stored") = "auto"
    cache_max_bytes: doc(Optional[NonNeg], "prompt-cache byte budget in memory; null: 2 GiB on a CPU, a quarter "
                         "of the GPU's memory (2-64 GiB) on a GPU") = None
    cache_max_entries: doc(NonNeg, "prompt-cache entries kept in memory") = 8
    cache_dir: doc(Optional[str], "folder where prompt-cache entries persist across restarts") = None
    cache_disk_bytes: doc(NonNeg, "byte budget of cache_dir") = 8 << 30
    kv_bits: doc(Optional[Literal[4, 8]], "quantize the KV cache to this many bits") = None
    kv_group_size: doc(Literal[32, 64, 128], "KV quantization group size (must divide the head size)") = 64
    quantized_kv_start: doc(NonNeg, "quantize the KV cache once it holds this many tokens or joins the batch") = 0
    draft_model_path: doc(Optional[Annotated[str, Meta(min_length=1)]], "a draft model, loaded with it") = None
    max_memory: doc(Optional[Pos], "refuse to load when all weights (model, tower, draft) exceed it") = None
    kv_memory: doc(Optional[Pos], "KV bytes the running generates may reserve (each its prompt + max_tokens); "
                   "null: 0.75 of what the device leaves after the weights and the prompt cache") = None
    warmup: doc(Optional[bool], "compile the decode kernels at load; null: on a GPU only") = None
    max_concurrent: doc(Optional[Annotated[int, Meta(ge=1, le=64)]],
                        "most generate requests decoded together in one batch; null: 8 on a GPU, 1 on a CPU "
                        "(where batching does not pay)") = None
    parallel: doc(Optional[Literal["tensor", "pipeline"]],
                  "with several ranks (Distributed): how the model is split; null: tensor when the model "
                  "has mlx-lm's shard(), else pipeline; ignored with one rank") = None


class Load(Request, tag="load", kw_only=True):
    model_path: doc(Annotated[str, Meta(min_length=1)], "a local mlx-lm / mlx-vlm model directory")
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


class AudioPart(Struct, tag="audio", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """An audio clip (WAV, FLAC or MP3): exactly one of an absolute file ``path`` or base64 ``data``
    (a data: URL is fine)."""

    path: Optional[str] = None
    data: Optional[str] = None


ContentPart = Union[TextPart, ImagePart, ImageUrlPart, AudioPart]


FunctionName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class FunctionCall(Struct, forbid_unknown_fields=True, kw_only=True):
    name: doc(FunctionName, "the function called")
    arguments: doc(Union[str, dict], "its arguments: JSON text (OpenAI's form; events always send this) "
                   "or, in a request, an object") = "{}"


class ToolCall(Struct, forbid_unknown_fields=True, kw_only=True):
    """A call the model made, in OpenAI's form: append it to the assistant message as it is."""

    id: doc(Annotated[str, Meta(min_length=1, max_length=256)], "the call's id; a tool message answers it")
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Struct, forbid_unknown_fields=True, kw_only=True):
    role: Annotated[str, Meta(min_length=1)]
    content: Union[str, list[ContentPart], None] = ""
    tool_calls: doc(Optional[list[ToolCall]], "assistant: the calls it made (from done.tool_calls)") = None
    tool_call_id: doc(Optional[Annotated[str, Meta(min_length=1, max_length=256)]],
                      "tool: the id of the call this message answers (required for role tool)") = None
    name: doc(Optional[str], "tool: the function's name (for templates that show it)") = None


class FunctionDef(Struct, forbid_unknown_fields=True, kw_only=True):
    name: doc(FunctionName, "letters, digits, _ . -; at most 64")
    description: doc(Optional[str], "what it does, for the model") = None
    parameters: doc(dict, "a JSON Schema (type object) for its arguments; {}: no arguments") = {}
    strict: doc(Optional[bool], "accepted for OpenAI compatibility; the schema is used as it is") = None


class Tool(Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolChoiceFunction(Struct, forbid_unknown_fields=True, kw_only=True):
    name: FunctionName


class NamedToolChoice(Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class Prompt(Struct, forbid_unknown_fields=True, kw_only=True):
    """Exactly one of ``text``, ``tokens`` or ``messages``."""

    text: doc(Optional[str], "raw text, tokenized as it is") = None
    tokens: doc(Optional[list[NonNeg]], "token ids, used as they are") = None
    messages: doc(Optional[list[Message]], "a chat, rendered through the model's chat template") = None
    images: doc(Optional[list[ImagePart]], "images for a text or tokens prompt, one per placeholder") = None
    audio: doc(Optional[list[AudioPart]], "audio clips for a text or tokens prompt, one per audio placeholder") = None
    add_generation_prompt: doc(bool, "messages: end with the assistant's turn header") = True
    add_special_tokens: doc(bool, "text: let the tokenizer add BOS etc.") = True
    tools: doc(Optional[Annotated[list[Tool], Meta(max_length=128)]],
               "messages: functions the model may call, rendered by the chat template") = None
    tool_choice: doc(Union[Literal["auto", "none", "required"], NamedToolChoice],
                     "auto: the model decides; none: tools are not offered; required / a named function: the "
                     "output is constrained to one valid call") = "auto"
    template_kwargs: doc(Optional[dict], "messages: extra chat-template variables, e.g. {\"enable_thinking\": "
                         "false}") = None


class GenerateParams(Struct, forbid_unknown_fields=True, kw_only=True):
    max_tokens: doc(Annotated[int, Meta(ge=0, le=1_000_000)], "most tokens to generate") = 512
    temperature: doc(Annotated[float, Meta(ge=0.0, le=100.0)], "0: greedy") = 0.0
    top_p: doc(Annotated[float, Meta(gt=0.0, le=1.0)], "nucleus sampling") = 1.0
    top_k: doc(Annotated[int, Meta(ge=0)], "0: off") = 0
    min_p: doc(Annotated[float, Meta(ge=0.0, le=1.0)], "0: off") = 0.0
    seed: doc(Optional[NonNeg], "seed for sampling, for repeatable samples") = None
    stop: doc(Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=16)],
              "stop strings: generation ends before the first one, which is not in the text") = []
    stop_token_ids: doc(Annotated[list[NonNeg], Meta(max_length=64)], "token ids that end generation") = []
    top_logprobs: doc(Annotated[int, Meta(ge=0, le=20)], "report each token's logprob and this many "
                      "alternatives") = 0
    repetition_penalty: doc(Optional[Annotated[float, Meta(gt=0.0, le=10.0)]],
                            "divide the logits of recent tokens (cached ones included)") = None
    repetition_context_size: doc(Annotated[int, Meta(ge=1, le=1_000_000)],
                                 "how many recent tokens the penalties look at") = 20
    presence_penalty: doc(Annotated[float, Meta(ge=-10.0, le=10.0)], "subtracted once per seen token") = 0.0
    frequency_penalty: doc(Annotated[float, Meta(ge=-10.0, le=10.0)], "subtracted per occurrence") = 0.0
    logit_bias: doc(dict[NonNeg, Annotated[float, Meta(ge=-100.0, le=100.0)]],
                    "token id (a decimal string key) -> added to its logit") = {}
    json_schema: doc(Optional[Union[dict, bool]], "constrain the output to JSON valid for this schema "
                     "(true: any JSON)") = None
    speculative: doc(bool, "use the draft model when one is loaded") = True
    num_draft_tokens: doc(Annotated[int, Meta(ge=1, le=32)], "tokens the draft proposes per step") = 3
    prompt_lookup: doc(Optional[bool], "draft-free speculation from n-grams of the prompt and output (greedy "
                       "output unchanged); null: greedy ones in the batch, while it pays (PROTOCOL.md)") = None
    prompt_lookup_tokens: doc(Annotated[int, Meta(ge=1, le=32)], "prompt lookup: most tokens per step") = 8


class Generate(Request, tag="generate", kw_only=True):
    prompt: Prompt
    cache_key: doc(Optional[Annotated[str, Meta(min_length=1, max_length=256)]],
                   "the conversation this request belongs to: one prompt-cache entry per key, its newest "
                   "(PROTOCOL.md, The prompt cache)") = None
    params: GenerateParams = msgspec.field(default_factory=GenerateParams)


class LoadDraft(Request, tag="load_draft", kw_only=True):
    """Load (or with ``model_path: null`` drop) the draft model for speculative decoding."""

    model_path: Optional[Annotated[str, Meta(min_length=1)]]


class Cancel(Request, tag="cancel", kw_only=True):
    target: doc(str, "the id of the request to cancel")


class Unload(Request, tag="unload", kw_only=True):
    pass


class Tokenize(Request, tag="tokenize", kw_only=True):
    text: doc(str, "the text to tokenize")
    add_special_tokens: doc(bool, "let the tokenizer add BOS etc.") = True


class Status(Request, tag="status", kw_only=True):
    pass


class CacheClear(Request, tag="cache_clear", kw_only=True):
    pass


class Shutdown(Request, tag="shutdown", kw_only=True):
    pass


AnyRequest = Union[Load, LoadDraft, Generate, Cancel, Unload, Tokenize, Status, CacheClear, Shutdown]
REQUEST_TYPES = {cls.__struct_config__.tag: cls for cls in AnyRequest.__args__}


# ---------------------------------------------------------------- events


RequestKind = Literal[tuple(REQUEST_TYPES)]
ErrorCode = Literal[tuple(CODES)]
State = Literal["empty", "idle", "loading", "generating", "busy"]


class Event(Struct, tag_field="type", omit_defaults=True, forbid_unknown_fields=True, kw_only=True):
    id: doc(Optional[str], "the request this event belongs to; null for ready, fatal and unattributable errors")
    seq: doc(int, "1 for ready, then +1 per line: a gap means a lost line") = 0


class DeviceInfo(Struct, omit_defaults=True, kw_only=True):
    type: doc(Literal["cpu", "gpu"], "where MLX runs")
    name: doc(str, "MLX's name of the device") = ""
    compute_dtype: doc(str, "float32 on a CPU (half precision is computed in float32), else auto")
    blas: doc(Optional[dict], "CPU: the BLAS library mapped into the process (name, path, preloaded, source)") = None


class Limits(Struct, kw_only=True):
    max_line_bytes: doc(int, "longest request line read, in bytes (its `\\n` or `\\r\\n` not counted)")
    max_queue: doc(int, "most work requests waiting; more get queue_full")


class Ready(Event, tag="ready", kw_only=True):
    protocol_version: doc(str, "major.minor: a host supports one major; minors only add")
    versions: doc(dict[str, str], "worker, mlx, mlx-lm, mlx-vlm and python versions")
    device: DeviceInfo
    pid: doc(int, "the worker's process id")
    capabilities: doc(list[str], "request types and features this worker has (PROTOCOL.md, Capabilities)")
    limits: Limits
    ranks: doc(Optional[Ranks], "with several ranks (Distributed): the world") = None


class Progress(Event, tag="progress", kw_only=True):
    stage: doc(Literal["load", "prompt"], "a load's stages, or a generate's prefill")
    fraction: doc(float, "0..1, never decreasing within a request")
    total: doc(Optional[int], "prompt: tokens in the prompt") = None
    cached: doc(Optional[int], "prompt: tokens served from the prompt cache") = None
    processed: doc(Optional[int], "prompt: tokens in the KV cache so far, the cached ones included") = None


class TopLogprob(Struct, kw_only=True):
    id: doc(int, "a token id")
    text: doc(str, "its text alone")
    logprob: doc(float, "its log-probability (finite)")


class TokenLogprob(Struct, kw_only=True):
    id: doc(int, "the generated token id")
    logprob: doc(float, "its log-probability (finite)")
    top: doc(list[TopLogprob], "the most likely alternatives, best first; tokens with probability 0 "
             "(masked by json_schema) are left out, so it may be shorter than top_logprobs") = []


class Token(Event, tag="token", kw_only=True):
    text: doc(str, "new text: complete UTF-8, stop strings held back until they cannot match")
    tokens: doc(list[int], "the token ids this event releases (possibly more than one, or none)")
    logprobs: doc(Optional[list[TokenLogprob]], "with params.top_logprobs > 0: one per id in `tokens`") = None
    from_draft: doc(Optional[list[bool]], "with a draft model or prompt lookup: one per id in `tokens`, true "
                    "for an accepted proposal") = None
    channel: doc(Optional[Literal["reasoning", "answer"]], "for models with thinking markers: which part of the "
                 "output `text` belongs to (markers are not in it)") = None


class ToolCallEvent(Event, tag="tool_call", kw_only=True):
    """A complete tool call, parsed by mlx-lm's parser for the model's format (ModelInfo.tool_parser)."""

    index: doc(int, "0, 1, ... within the request")
    call: ToolCall
    tokens: doc(list[int], "the ids of the call's tokens, markers included")


class Stats(Event, tag="stats", kw_only=True):
    prompt_tokens: doc(int, "tokens in the prompt")
    cached_tokens: doc(int, "of them, served from the prompt cache")
    cache_miss_reason: doc(Optional[str], "why fewer tokens than possible were reused") = None
    generated_tokens: doc(int, "tokens sampled, a final EOS / stop token included")
    ttft_s: doc(Optional[float], "request start to first token, in the engine; absent without a token") = None
    prompt_tps: doc(Optional[float], "uncached prompt tokens / ttft_s; absent without a token") = None
    generation_tps: doc(Optional[float], "tokens per second after the first; absent with fewer than 2") = None
    peak_memory_bytes: doc(int, "MLX's peak memory during the request")
    total_s: doc(float, "the whole request, in the engine")
    speculative: doc(Optional[str], "with a draft model loaded: \"on\", or \"off: <why>\"") = None
    prompt_lookup: doc(Optional[str], "prompt lookup asked for (or auto): \"on\", or \"off: <why>\"") = None
    draft_tokens_accepted: doc(Optional[int], "speculative / prompt lookup: tokens proposed and accepted") = None
    draft_tokens_proposed: doc(Optional[int], "speculative / prompt lookup: tokens proposed") = None
    reasoning_tokens: doc(Optional[int], "models with thinking markers: generated tokens of the reasoning") = None
    batching: doc(Optional[str], "with max_concurrent > 1: \"on\" (decoded in the batch), or \"off: <why>\" "
                  "(it ran alone)") = None
    concurrent: doc(Optional[int], "with batching: the most sequences decoded together while it decoded") = None


class CacheStats(Struct, kw_only=True):
    entries: doc(int, "prompt-cache entries in memory")
    tokens: doc(int, "tokens they hold")
    bytes: doc(int, "bytes they hold")
    disk_entries: doc(int, "entries in cache_dir")
    max_bytes: doc(int, "the memory byte budget")
    max_entries: doc(int, "the memory entry budget")


class ModelInfo(Struct, omit_defaults=True, kw_only=True):
    path: doc(str, "the model directory, resolved")
    model_type: doc(str, "config.json's model_type")
    context_length: doc(Optional[int], "the context window the config declares") = None
    vocab_size: doc(int, "token ids are below this")
    vision: doc(bool, "accepts images (a vision add-on is loaded); omitted when false") = False
    audio: doc(bool, "accepts audio (the add-on has an audio tower); omitted when false") = False
    eos_token_ids: doc(list[int], "ids that end generation as eos")
    chat_template: doc(bool, "prompt.messages can be used")
    compute_dtype: doc(str, "the dtype the model computes in")
    stored_dtype: doc(str, "the dtype of the checkpoint's weights")
    prefill_step_size: doc(int, "prompt tokens per prefill chunk (the option, or the device default)")
    parameters: doc(int, "parameters of the text model")
    load_s: doc(float, "seconds the load took")
    warmup_s: doc(Optional[float], "seconds the warm-up took (with warmup)") = None
    tool_parser: doc(Optional[str], "mlx-lm's tool-call parser for this model's format (json_tools, mistral, "
                     "...); omitted when tools are not parsed") = None
    tool_prompt: doc(Optional[Literal["template", "worker"]], "who renders tools: the chat template, or the "
                     "worker's own system prompt (templates that ignore tools)") = None
    reasoning_markers: doc(Optional[list[str]], "the thinking markers [start, end], for reasoning models") = None
    max_concurrent: doc(Optional[int], "most generate requests decoded together (the load option or the "
                        "device default; 1 when the model cannot batch)") = None
    ranks: doc(Optional[Ranks], "with several ranks: the split (parallel) and each rank's share") = None


StopReason = Literal["eos", "stop_string", "stop_token", "max_tokens", "context_full", "cancelled", "tool_calls"]


class Done(Event, tag="done", kw_only=True):
    """The terminal success event. Which fields are present depends on the request type."""

    request: doc(RequestKind, "the type of the request this ends")
    # generate (and a cancelled request of any type)
    stop_reason: doc(Optional[StopReason], "generate: why it ended; any request: cancelled") = None
    stop_string: doc(Optional[str], "generate: the stop string that ended it") = None
    stop_token: doc(Optional[int], "generate: the EOS or stop token that ended it") = None
    text: doc(Optional[str], "generate: the whole generated answer text (\"\" when none; without the "
              "reasoning and the tool calls)") = None
    reasoning: doc(Optional[str], "generate, models with thinking markers: the reasoning text") = None
    tool_calls: doc(Optional[list[ToolCall]], "generate: the calls the model made, in order") = None
    cached_tokens: doc(Optional[int], "generate: as in stats (absent when it never ran)") = None
    cache_miss_reason: doc(Optional[str], "generate: as in stats") = None
    # load, status
    model: Optional[ModelInfo] = None
    draft: Optional[ModelInfo] = None
    warnings: Optional[list[str]] = None
    # tokenize
    tokens: Optional[list[int]] = None
    # cancel
    cancelled: doc(Optional[bool], "cancel: the target was found and will end cancelled") = None
    # status
    state: doc(Optional[State], "status: what the engine does now") = None
    active: doc(Optional[str], "status: the running request's id (the oldest, when several generate)") = None
    running: doc(Optional[list[str]], "status: every request the engine has started and not ended, oldest "
                 "first (several with batching)") = None
    queue: doc(Optional[list[str]], "status: queued request ids, in order") = None
    engine_alive: doc(Optional[bool], "status: the MLX thread is running") = None
    ranks: doc(Optional[Ranks], "status, with several ranks: the world (and the loaded model's split)") = None
    # status, cache_clear (for cache_clear: what was dropped)
    cache: Optional[CacheStats] = None
    # status: the draft model's own prompt cache (with a draft loaded)
    draft_cache: Optional[CacheStats] = None
    kv_memory: doc(Optional[KvMemory], "status, with a model loaded: the KV cache reserved and free") = None


class Error(Event, tag="error", kw_only=True):
    code: doc(ErrorCode, "stable: match on this")
    number: doc(int, "JSON-RPC style number of the code")
    message: doc(str, "for people; may change between versions")
    refused_id: doc(Optional[str], "the id of a refused line that is not this error's `id`: a request with that "
                    "id is still in progress (so `id` is null and this error ends nothing)") = None


class Fatal(Event, tag="fatal", kw_only=True):
    """The last line before the worker exits on a failure it cannot survive (exit status 70)."""

    reason: doc(str, "what failed")


AnyEvent = Union[Ready, Progress, Token, ToolCallEvent, Stats, Done, Error, Fatal]
