"""A generate request's state between its start (start.py) and its end (finish.py), shared by the solo driver
(solo.py) and the batch (batcher.py): each sampled token (``Run.accept``: stop conditions, token events, held-back
text) and the prompt's progress (``Run.prefill_reporter``). Everything request-specific lives here and dies with
the request."""

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from ..cache import Lease, cache_len
from ..cache.snapshots import Snapshot
from ..loading.model import ModelKit
from ..prompting.prompt import PromptPlan
from ..prompting.tools import wire_call
from ..protocol import Generate, Progress, Token, ToolCallEvent
from .channels import Channels
from .prefill import Cancelled  # noqa: F401  (raised by the drivers' prefill callbacks)
from .sampling import logprob_report
from .snapshot_policy import snapshot_into
from .speculation import Speculation

PROGRESS_INTERVAL_S = 0.1


@dataclass
class Outcome:
    """What the decode loop produced."""

    generated: List[int] = field(default_factory=list)
    reason: Optional[str] = None
    stop_token: Optional[int] = None
    t_first: Optional[float] = None
    marks: dict = field(default_factory=dict)  # phase name -> perf_counter, for the debug log
    from_draft: int = 0
    calls: int = 0  # tool_call events emitted


@dataclass
class Run:
    """A generate request between ``start`` and ``finish``."""

    kit: ModelKit
    req: Generate
    emit: Callable
    cancelled: Callable[[], bool]
    tic: float  # perf_counter at the start
    plan: PromptPlan
    budget: int  # most tokens it may generate (max_tokens, or what the context has left)
    constraint: Optional[Callable]  # its grammar, a logits processor (constraints.py), or None
    spec: Speculation
    sampler: Callable
    quant: dict  # generate_step's kv_bits / kv_group_size / quantized_kv_start
    lease: Lease  # the prompt cache it took
    snapshots: List[Snapshot]  # of its bounded layers, up to the prompt's end
    stream: Channels
    out: Outcome
    decode_snaps: List[Snapshot] = field(default_factory=list)  # taken while decoding (snapshot_policy.py)
    extras: collections.deque = field(default_factory=collections.deque)  # (logprob report, from_draft)
    batching: Optional[str] = None  # what stats.batching says
    peers: int = 1  # most sequences decoded together while this one decoded
    proposed: int = 0  # speculative / prompt lookup: tokens proposed
    on_first: Callable = lambda: None  # noqa: E731

    def __post_init__(self):
        self.eos, self.stop_ids = frozenset(self.kit.info.eos_token_ids), frozenset(self.req.params.stop_token_ids)

    @property
    def n_prompt(self) -> int:
        return len(self.plan.ids)

    @property
    def want_lp(self) -> bool:
        return self.req.params.top_logprobs > 0

    def accept(self, token: int, logprobs, from_draft: bool = False) -> bool:
        """One sampled token: stop conditions and token events. True when the request ends with it."""
        out, params = self.out, self.req.params
        if out.t_first is None:
            out.t_first = time.perf_counter()
            self.on_first()
        out.from_draft += bool(from_draft)
        out.generated.append(token)
        if token in self.eos or token in self.stop_ids:
            out.reason = "eos" if token in self.eos else "stop_token"
            out.stop_token = token
            return True
        if self.want_lp or self.spec.proposing:
            report = logprob_report(self.kit, token, logprobs, params.top_logprobs) if self.want_lp else None
            self.extras.append((report, bool(from_draft)))
        self.release(self.stream.add(token))
        if self.stream.stop_string is not None:
            out.reason = "stop_string"
            return True
        if self.cancelled():
            out.reason = "cancelled"
            return True
        return False

    def end_stream(self) -> None:
        if self.out.reason != "stop_string":
            self.release(self.stream.finish())

    def release(self, pieces) -> None:
        req, out, extras, spec = self.req, self.out, self.extras, self.spec
        thinking = self.stream.markers.think is not None
        for piece in pieces:
            ids = piece.ids
            got = [extras.popleft() for _ in ids] if self.want_lp or spec.proposing else []
            if piece.kind == "tool_call":  # the call's ids go with its first event (no logprobs)
                for call in piece.calls:
                    self.emit(ToolCallEvent(id=req.id, index=out.calls, call=wire_call(call), tokens=ids))
                    out.calls, ids = out.calls + 1, []
                continue
            if not (piece.text or ids):
                continue
            ev = Token(id=req.id, text=piece.text, tokens=ids,
                       channel=("reasoning" if piece.kind == "reasoning" else "answer") if thinking else None)
            if got:
                ev.logprobs = [g[0] for g in got] if self.want_lp else None
                ev.from_draft = [g[1] for g in got] if spec.proposing else None
            self.emit(ev)

    def prefill_reporter(self):
        """generate_step's prompt_progress_callback: a snapshot at the prompt's end, cancel, progress."""
        cached, last, n_prompt = self.lease.reused, [0.0], self.n_prompt

        def on_prefill(processed: int, total: int):
            if processed >= total - 1 and not self.spec.solo:  # the prompt but its last token; then + the first
                snapshot_into(self.snapshots, self.lease.cache, cache_len(self.lease.cache))
            # the end of prefill is no cancel point: the first token is already being computed, and the
            # decode loop's check right after it keeps the cache consistent with the tokens (it is stored)
            if processed < total and self.cancelled():
                raise Cancelled()
            now = time.perf_counter()
            if processed in (0, total) or now - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = now
                done = cached + processed
                self.emit(Progress(id=self.req.id, stage="prompt", fraction=round(done / n_prompt, 4),
                                   total=n_prompt, cached=cached, processed=done))

        return on_prefill
