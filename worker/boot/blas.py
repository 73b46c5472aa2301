"""Put a fast BLAS under MLX's CPU matmul on Linux, by itself.

MLX's Linux CPU wheel (``mlx[cpu]``) links the reference Netlib BLAS it bundles
(``mlx_cpu.libs/libblas-*.so.3``): an fp32 1024x1024 matmul runs at ~6-9 GFLOP/s.
``libmlx.so`` takes ``cblas_sgemm`` (and LAPACK) by plain symbol name, so a BLAS put in
``LD_PRELOAD`` wins the symbol lookup; Debian's OpenBLAS runs the same matmul 30-60x faster.
``LD_PRELOAD`` is only read when a process starts, so :func:`maybe_reexec` sets it and
re-executes ``python -m worker`` once, before mlx is imported.

This module uses the standard library only and imports nothing heavy at import time: it runs
before mlx. It never writes to stdout (stdout carries the protocol); its few log lines go to
stderr.

Environment
-----------
``MLX_WORKER_BLAS``
    unset / ``auto`` (or any other word): search the candidates below.
    ``off`` / ``0`` / ``none`` / ``reference`` (also ``no``, ``false``, ``disable[d]``): never preload.
    ``openblas`` / ``mkl`` / ``blis``: search only candidates of that kind.
    a path (contains ``/``): preload exactly that library (anything exporting ``cblas_sgemm``).
``MLX_WORKER_BLAS_REEXEC``
    set to ``1`` by the re-exec; while set, :func:`maybe_reexec` never execs again.
``MLX_WORKER_DEVICE``
    ``gpu`` / ``cuda`` / ``metal``: skip (CPU BLAS is beside the point there).

Before the exec, and only where the user has not set them, it also sets
``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``BLIS_NUM_THREADS`` to the CPUs this process
may really use (affinity and cgroup quota: OpenBLAS counts the host's cores, so under a
``--cpus`` quota it oversubscribes; BLIS defaults to one thread), and ``MKL_THREADING_LAYER``
for MKL (its default Intel layer kills the process with a symbol lookup error unless libiomp5
is loaded). ``OPENBLAS_CORETYPE`` is left alone: a value in the environment (e.g. ``Haswell``
on an AVX-512 CPU) is the user's choice, and OpenBLAS's own detection is used otherwise.
"""

from __future__ import annotations

import os
import sys

from .blas_find import (  # noqa: F401  (re-exported: the search lives in blas_find)
    ENV_CHOICE, KINDS, OFF_VALUES, Candidate, _lib_dirs, _realpath, _same_file, _source_of, _tuning_env, candidates, classify,
    effective_cpus, find_blas, probe,
)

ENV_MARKER = "MLX_WORKER_BLAS_REEXEC"
ENV_DEVICE = "MLX_WORKER_DEVICE"

GPU_DEVICES = frozenset({"gpu", "cuda", "metal"})

LOG_PREFIX = "mlx-worker blas:"
INSTALL_HINT = "apt-get install libopenblas0-pthread"

_logged_status = False


def _log(msg: str) -> None:
    try:
        sys.stderr.write(f"{LOG_PREFIX} {msg}\n")
        sys.stderr.flush()
    except Exception:
        pass


# ------------------------------------------------------------------ re-exec


def _split_preload(value: str) -> list:
    return [p for p in value.replace(" ", ":").split(":") if p]


def _resolve_preload(entry: str) -> str:
    """Resolved path of an LD_PRELOAD entry; a bare name is looked up like ld.so would (roughly)."""
    if "/" in entry:
        return _realpath(entry)
    for d in _lib_dirs():
        p = os.path.join(d, entry)
        if os.path.exists(p):
            return _realpath(p)
    return entry


def _skip_reason(env) -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if env.get(ENV_DEVICE, "").strip().lower() in GPU_DEVICES:
        return f"{ENV_DEVICE}={env.get(ENV_DEVICE)}"
    if env.get(ENV_CHOICE, "").strip().lower() in OFF_VALUES:
        return f"{ENV_CHOICE}={env.get(ENV_CHOICE)}"
    return None


def maybe_reexec(argv: list | None = None, *, maps_path: str = "/proc/self/maps",
                 module: str = "worker") -> None:
    """Re-exec ``python -m worker *argv`` once with a fast BLAS in LD_PRELOAD, when one is found.

    Call first thing in main(), before mlx is imported. Returns normally when there is nothing
    to do, when the library is already mapped, after a re-exec (marker set), or when the exec
    fails; otherwise does not return. ``module`` is what ``python -m`` runs again (tests).
    """
    try:
        _maybe_reexec(sys.argv[1:] if argv is None else list(argv), maps_path, module)
    except Exception as e:  # never let BLAS set-up stop the worker
        _log(f"skipped ({type(e).__name__}: {e})")


def _maybe_reexec(argv: list, maps_path: str, module: str) -> None:
    env = os.environ
    if _skip_reason(env) or not sys.executable:
        return
    current = blas_info(maps_path, detail=False)
    if env.get(ENV_MARKER):
        if current["name"] not in KINDS and current["source"] != "env":
            _log(f"LD_PRELOAD={env.get('LD_PRELOAD', '')!r} did not map an optimized BLAS; "
                 "continuing on MLX's reference BLAS")
        return
    if current["name"] in KINDS and current["preloaded"]:
        return  # the user preloaded one already
    cand, info = find_blas(env)
    if cand is None:
        if "/" in env.get(ENV_CHOICE, ""):
            _log(f"cannot use {info}; continuing without a preload")
        return
    preload = _split_preload(env.get("LD_PRELOAD", ""))
    if _realpath(cand.path) in {_resolve_preload(p) for p in preload}:
        _log(f"LD_PRELOAD lists {cand.path} but it is not mapped; not re-executing")
        return
    changes, extra = _tuning_env(cand, env)
    old = {k: env.get(k) for k in ("LD_PRELOAD", ENV_MARKER, *changes)}
    env["LD_PRELOAD"] = ":".join([*extra, cand.path, *preload])
    env[ENV_MARKER] = "1"
    env.update(changes)
    tuned = "".join(f", {k}={v}" for k, v in changes.items())
    _log(f"re-executing with LD_PRELOAD={cand.path} ({cand.kind}, {cand.source}{tuned}) for fast "
         f"CPU matmul; {ENV_CHOICE}=off disables this")
    try:
        sys.stdout.flush()
    except Exception:
        pass
    args = [sys.executable, *_interpreter_flags(), "-m", module, *argv]
    try:
        os.execv(sys.executable, args)
    except Exception as e:  # OSError, or a bad sys.executable
        for k, v in old.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        _log(f"re-exec failed ({e}); continuing on MLX's reference BLAS")


def _interpreter_flags() -> list:
    try:
        import subprocess

        return list(subprocess._args_from_interpreter_flags())
    except Exception:
        return []


# ------------------------------------------------------------------ reporting


def _mapped_paths(maps_path: str) -> list:
    seen, out = set(), []
    with open(maps_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            path = parts[5].strip()
            if path.endswith(" (deleted)"):
                path = path[: -len(" (deleted)")]
            if path.startswith("/") and ".so" in path and path not in seen:
                seen.add(path)
                out.append(path)
    return out


def blas_info(maps_path: str = "/proc/self/maps", *, env: dict | None = None,
              detail: bool = True) -> dict:
    """Which BLAS is mapped into this process (Linux: from ``maps_path``).

    {"name": "openblas"|"mkl"|"blis"|"reference"|"unknown", "path": str|None,
     "preloaded": bool, "source": "env"|"system"|"pip"|None}; with ``detail`` and OpenBLAS
    in use, also "core" (its kernel set) and "threads". The library reported is the one that
    serves MLX: a mapped library named in LD_PRELOAD (``MLX_WORKER_BLAS``'s first), else MLX's
    bundled Netlib copy ("reference"), else any other optimized BLAS mapped. "unknown": nothing
    recognisable is mapped (e.g. before mlx is imported), or the user's own library is of no
    known kind. On macOS: {"name": "accelerate", ...}. Reads ``maps_path`` once (~0.1 ms).
    """
    env = os.environ if env is None else env
    if sys.platform == "darwin":
        return {"name": "accelerate", "path": "/System/Library/Frameworks/Accelerate.framework",
                "preloaded": False, "source": "system"}
    info = {"name": "unknown", "path": None, "preloaded": False, "source": None}
    try:
        paths = _mapped_paths(maps_path)
    except OSError:
        return info
    named = env.get(ENV_CHOICE, "").strip()
    named = _realpath(named) if "/" in named else None
    preload = {_resolve_preload(p) for p in _split_preload(env.get("LD_PRELOAD", ""))}
    fast, reference, other = [], None, []
    for p in paths:  # the kernel shows resolved paths
        kind = classify(p)
        if named and p == named:
            (fast if p in preload else other).insert(0, (kind, p))  # the user's library first
        elif kind in KINDS:
            (fast if p in preload else other).append((kind, p))
        elif kind == "reference" and reference is None:
            reference = p
    # What serves MLX's cblas_sgemm: a preloaded library (searched before libmlx's own
    # NEEDED libblas); else the bundled reference. A library mapped without LD_PRELOAD (a
    # probe before a failed exec, numpy's private copy) only counts when no reference is mapped.
    if fast:
        kind, path = fast[0]
    elif reference:
        kind, path = "reference", reference
    elif other:
        kind, path = other[0]
    else:
        return info
    info["name"], info["path"], info["preloaded"] = kind, path, path in preload
    info["source"] = None if kind == "reference" else _source_of(path, env)
    if detail and info["name"] == "openblas" and maps_path == "/proc/self/maps":
        info.update(_openblas_runtime(info["path"]))
    return info


def _openblas_runtime(path: str) -> dict:
    out = {}
    try:
        import ctypes

        lib = ctypes.CDLL(path)  # already mapped: only takes a reference
        f = lib.openblas_get_corename
        f.restype = ctypes.c_char_p
        out["core"] = (f() or b"").decode(errors="replace") or None
        out["threads"] = int(lib.openblas_get_num_threads())
    except Exception:
        pass
    return out


def log_blas_status(info: dict | None = None) -> dict:
    """Once per process: one stderr line when MLX runs on the reference BLAS. Returns the info.

    Call after ``import mlx.core`` (before it nothing is mapped yet).
    """
    global _logged_status
    info = blas_info() if info is None else info
    if (_logged_status or not sys.platform.startswith("linux")
            or os.environ.get(ENV_DEVICE, "").strip().lower() in GPU_DEVICES):
        return info
    if info["name"] not in KINDS:
        _logged_status = True
        if info["name"] == "reference":
            what = "using MLX's bundled reference BLAS"
        else:
            what = "no optimized BLAS detected"
        off = os.environ.get(ENV_CHOICE, "").strip().lower() in OFF_VALUES
        hint = f" ({ENV_CHOICE}={os.environ.get(ENV_CHOICE)})" if off else ""
        _log(f"{what}{hint}: fp32 matmul is ~30x slower; `{INSTALL_HINT}` for much faster prefill")
    return info


if __name__ == "__main__":  # diagnostics: python -m worker.boot.blas
    import json

    result = {"info": blas_info(), "candidates": [], "effective_cpus": effective_cpus()}
    for c in candidates():
        result["candidates"].append({**c._asdict(), **probe(c.path)})
    print(json.dumps(result, indent=2))
