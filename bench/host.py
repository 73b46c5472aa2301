"""The worker side: a host (tests.support.client.Worker) that timestamps every event as it is read."""

from __future__ import annotations

import itertools
import json
import time

from tests.support.client import Worker

_ids = itertools.count(1)


class TimedWorker(Worker):
    """Every event gets ``_t`` (time.perf_counter() when its line was read). No schema validation by
    default: the GPU machine has no jsonschema, and a bench measures, the tests check."""

    def __init__(self, *args, validate=False, **kwargs):
        super().__init__(*args, validate=validate, **kwargs)

    def _pump(self):
        for line in self.proc.stdout:
            t = time.perf_counter()
            self.raw_lines.append(line)
            ev = json.loads(line)
            ev["_t"] = t
            self.events.put(ev)
        self.events.put(None)

    def generate(self, tokens, max_tokens, cache_key=None, timeout=900, params=None) -> dict:
        """One greedy generation of ``tokens``; returns the worker's stats plus host-side times."""
        rid = f"g{next(_ids)}"
        req = {"type": "generate", "id": rid, "prompt": {"tokens": list(tokens)},
               "params": {"max_tokens": max_tokens, "temperature": 0.0, **(params or {})}}
        if cache_key is not None:
            req["cache_key"] = cache_key
        t0 = time.perf_counter()
        self.send(req)
        evs = self.collect(rid, timeout=timeout)
        end = evs[-1]
        if end["type"] != "done":
            raise RuntimeError(f"generate failed: {end}")
        stats = next(e for e in evs if e["type"] == "stats")
        toks = [e for e in evs if e["type"] == "token"]
        out = [t for e in toks for t in e["tokens"]]
        first = toks[0]["_t"] if toks else None
        # host-side decode rate: ids that arrived after the first token event / time since it
        later = sum(len(e["tokens"]) for e in toks[1:])
        span = toks[-1]["_t"] - first if len(toks) > 1 else 0.0
        return {
            "ttft_s": stats["ttft_s"],
            "decode_tps": stats["generation_tps"],
            "prompt_tps": stats["prompt_tps"],
            "prompt_tokens": stats["prompt_tokens"],
            "cached_tokens": stats["cached_tokens"],
            "cache_miss_reason": stats.get("cache_miss_reason"),
            "generated": stats["generated_tokens"],
            "total_s": stats["total_s"],
            "host_ttft_s": (first - t0) if first is not None else None,
            "host_total_s": end["_t"] - t0,
            "host_decode_tps": later / span if span > 0 else None,
            "stop_reason": end.get("stop_reason"),
            "token_events": len(toks),
            "peak_memory_bytes": stats.get("peak_memory_bytes"),
            "speculative": stats.get("speculative"),
            "draft_tokens_accepted": stats.get("draft_tokens_accepted"),
            "tokens": out,
        }

    def simple(self, type_, **kw) -> dict:
        rid = f"{type_}{next(_ids)}"
        evs = self.request({"type": type_, "id": rid, **kw}, timeout=300)
        if evs[-1]["type"] != "done":
            raise RuntimeError(f"{type_} failed: {evs[-1]}")
        return evs[-1]

    def load_model(self, path, **options) -> dict:
        return self.simple("load", model_path=str(path), options=options)["model"]

    def status(self) -> dict:
        return self.simple("status")

    def cache_clear(self) -> dict:
        return self.simple("cache_clear")

    def blas_env(self) -> dict:
        from .raw import worker_blas_env

        return worker_blas_env(self.ready["pid"])
