"""Stable error codes. Every error a host can cause is a ``WorkerError`` carrying one of these."""

from contextlib import contextmanager

# code -> JSON-RPC style number (the standard ones where they fit, -32000.. for ours)
CODES = {
    "parse_error": -32700,  # the line is not valid JSON (or not UTF-8)
    "invalid_request": -32600,  # JSON, but not a request object (no id, no type, duplicate id...)
    "unknown_type": -32601,  # a request type this worker does not know
    "invalid_params": -32602,  # a field has the wrong type or an out-of-range value
    "internal": -32603,  # a bug or an unexpected failure inside the worker
    "line_too_long": -32001,  # the line exceeded limits.max_line_bytes; it was skipped
    "no_model": -32002,  # generate/tokenize without a loaded model
    "model_not_found": -32003,  # load: the path does not exist or is not a model directory
    "model_load_failed": -32004,  # load: the checkpoint could not be read or built
    "remote_code_refused": -32005,  # load: the checkpoint wants custom code, trust_remote_code is false
    "queue_full": -32006,  # too many queued work requests
    "context_overflow": -32007,  # the prompt alone is longer than the context window
    "shutting_down": -32008,  # the worker is exiting and takes no new work
    "invalid_image": -32009,  # an image part is unreadable, not an image, too large or a decompression bomb
    "draft_incompatible": -32010,  # load_draft: the draft model does not share the main model's vocabulary
    # load: the model needs more memory than options.max_memory (or the machine) has; generate: its KV cannot fit
    # options.kv_memory even alone (refused before any compute), or an allocation failed while it ran
    "out_of_memory": -32011,
    "invalid_audio": -32012,  # an audio part is unreadable, not WAV/FLAC/MP3, too large or too long
    "rank_lost": -32013,  # with several ranks: a rank died or stopped answering; the worker exits (fatal)
}


class WorkerError(Exception):
    def __init__(self, code: str, message: str):
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def number(self) -> int:
        return CODES[self.code]


@contextmanager
def failing_as(code: str, what: str):
    """Turn any failure inside the block into ``WorkerError(code, "<what>: <the failure>")``.

    For library calls (mlx-lm, transformers, mlx-vlm) that fail with whatever exception a bad
    checkpoint or input provokes; a ``WorkerError`` from inside passes through unchanged.
    """
    try:
        yield
    except WorkerError:
        raise
    except MemoryError as exc:
        raise WorkerError("out_of_memory", f"{what}: ran out of memory: {exc}") from exc
    except Exception as exc:
        raise WorkerError(code, f"{what}: {exc}") from exc
