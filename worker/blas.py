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
from collections import namedtuple

ENV_CHOICE = "MLX_WORKER_BLAS"
ENV_MARKER = "MLX_WORKER_BLAS_REEXEC"
ENV_DEVICE = "MLX_WORKER_DEVICE"

OFF_VALUES = frozenset({"off", "0", "none", "reference", "no", "false", "disable", "disabled"})
KINDS = ("openblas", "mkl", "blis")
GPU_DEVICES = frozenset({"gpu", "cuda", "metal"})

LOG_PREFIX = "mlx-worker blas:"
INSTALL_HINT = "apt-get install libopenblas0-pthread"

# what cmeel-openblas's x86_64 build (TARGET=SKYLAKEX, no DYNAMIC_ARCH) needs
_AVX512_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})

_MULTIARCH = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
              "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}

_logged_status = False


# kind: "openblas" | "mkl" | "blis" | "unknown"; source: "env" | "system" | "pip"
Candidate = namedtuple("Candidate", "path kind source")


def _log(msg: str) -> None:
    try:
        sys.stderr.write(f"{LOG_PREFIX} {msg}\n")
        sys.stderr.flush()
    except Exception:
        pass


# ------------------------------------------------------------------ classification


def classify(path: str) -> str:
    """Which BLAS a library file is, from its name and folder: openblas/mkl/blis/reference/unknown.

    Copies vendored by other wheels (``numpy.libs/``, ``scipy.libs/``: private, often with
    prefixed symbols such as ``scipy_cblas_sgemm``) are "unknown": they do not serve MLX.
    """
    try:
        names = [path, os.path.realpath(path)]
    except OSError:
        names = [path]
    for p in names:
        base = os.path.basename(p).lower()
        parent = os.path.basename(os.path.dirname(p)).lower()
        if parent.endswith(".libs") and parent != "mlx_cpu.libs":
            return "unknown"
        if "scipy_openblas" in base or "openblas64_" in base:
            return "unknown"
        if "openblas" in base or parent.startswith("openblas"):
            return "openblas"
        if base.startswith("libmkl_"):
            return "mkl"
        if base.startswith("libblis") or parent.startswith("blis"):
            return "blis"
    for p in names:
        base = os.path.basename(p).lower()
        parent = os.path.basename(os.path.dirname(p)).lower()
        if base.startswith("libblas") and parent in ("mlx_cpu.libs", "blas"):
            return "reference"  # MLX's bundled Netlib copy, or Debian's libblas3 (Netlib)
    return "unknown"


def _source_of(path: str, env: dict | None = None) -> str:
    env = os.environ if env is None else env
    named = env.get(ENV_CHOICE, "").strip()
    if "/" in named and _same_file(named, path):
        return "env"
    if any(part in path for part in ("/site-packages/", "/dist-packages/", "/cmeel.prefix/")):
        return "pip"
    if sys.prefix != sys.base_prefix and path.startswith(sys.prefix.rstrip("/") + "/"):
        return "pip"  # e.g. pip's `mkl` puts libmkl_rt in <venv>/lib
    return "system"


def _realpath(p: str) -> str:
    try:
        return os.path.realpath(p)
    except (OSError, ValueError):
        return p


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return False


# ------------------------------------------------------------------ candidates


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags") or line.startswith("Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _machine() -> str:
    return os.uname().machine.lower()


def _site_dirs() -> list:
    dirs = []
    try:
        import site  # already imported by the interpreter at start-up

        dirs += site.getsitepackages()
        dirs.append(site.getusersitepackages())
    except Exception:
        pass
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def _system_paths(machine: str) -> list:
    """(path, kind) in order of preference; libblas.so.3 is classified when it is resolved."""
    triplet = _MULTIARCH.get(machine)
    out = []
    if triplet:
        d = f"/usr/lib/{triplet}"
        out += [
            (f"{d}/openblas-pthread/libopenblas.so.0", "openblas"),
            (f"{d}/openblas-openmp/libopenblas.so.0", "openblas"),
            (f"{d}/libopenblas.so.0", "openblas"),  # update-alternatives link
            (f"{d}/openblas-serial/libopenblas.so.0", "openblas"),
            (f"{d}/libmkl_rt.so", "mkl"),  # Debian/Ubuntu intel-mkl (x86_64 only)
            (f"{d}/blis-pthread/libblis.so.4", "blis"),
            (f"{d}/blis-openmp/libblis.so.4", "blis"),
            (f"{d}/libblis.so.4", "blis"),
            (f"{d}/libblas.so.3", None),  # alternatives: OpenBLAS / BLIS / MKL, or Netlib (skipped)
        ]
    out += [
        ("/usr/lib64/libopenblasp.so.0", "openblas"),  # Fedora/RHEL, pthreads
        ("/usr/lib64/libopenblaso.so.0", "openblas"),  # Fedora/RHEL, OpenMP
        ("/usr/lib64/libopenblas.so.0", "openblas"),  # Fedora/RHEL, serial; SUSE
        ("/usr/lib/libopenblas.so.0", "openblas"),  # Arch
        ("/usr/local/lib/libopenblas.so.0", "openblas"),  # source build, default prefix /usr/local
        ("/opt/OpenBLAS/lib/libopenblas.so.0", "openblas"),  # OpenBLAS `make install` default
    ]
    return out


def _pip_paths(machine: str, site_dirs: list, prefix: str, flags: frozenset) -> list:
    """Pip wheels that carry an unprefixed ``cblas_sgemm`` (scipy-openblas32/64 do not)."""
    import glob

    out = []
    x86 = _MULTIARCH.get(machine) == "x86_64-linux-gnu"
    for sp in site_dirs:
        # ngsolve-openblas: OpenBLAS DYNAMIC_ARCH, pthreads; needs the system's libgfortran.so.5
        out += [(p, "openblas") for p in sorted(glob.glob(f"{sp}/ngsolve_openblas/libopenblas*.so*"))]
    for sp in site_dirs:
        # cmeel-openblas: on x86_64 built for SKYLAKEX only (AVX-512): SIGILL anywhere else
        if not x86 or _AVX512_FLAGS <= flags:
            out.append((f"{sp}/cmeel.prefix/lib/libopenblas.so.0", "openblas"))
    if x86:
        for lib in (f"{prefix}/lib", *site_dirs):  # pip `mkl` puts libmkl_rt in <prefix>/lib
            out += [(f"{lib}/libmkl_rt.so.3", "mkl"), (f"{lib}/libmkl_rt.so.2", "mkl")]
    return out


def candidates(env: dict | None = None, *, machine: str | None = None,
               site_dirs: list | None = None, prefix: str | None = None,
               root: str = "", cpu_flags: frozenset | None = None) -> list:
    """The BLAS libraries worth preloading, best first, as :class:`Candidate` (existing files only).

    Honours ``MLX_WORKER_BLAS`` (off / a kind / a path). ``root`` is prefixed to system paths
    (tests); ``site_dirs``/``prefix``/``machine``/``cpu_flags`` default to this interpreter's.
    """
    env = os.environ if env is None else env
    choice = env.get(ENV_CHOICE, "").strip()
    low = choice.lower()
    if low in OFF_VALUES:
        return []
    if "/" in choice:
        return [Candidate(choice, classify(choice), "env")] if os.path.exists(choice) else []
    only = low if low in KINDS else None
    machine = _machine() if machine is None else machine.lower()
    site_dirs = _site_dirs() if site_dirs is None else site_dirs
    prefix = sys.prefix if prefix is None else prefix
    flags = _cpu_flags() if cpu_flags is None else cpu_flags

    out, seen = [], set()
    groups = (
        ([(root + p, k) for p, k in _system_paths(machine)], "system"),
        (_pip_paths(machine, site_dirs, prefix, flags), "pip"),
    )
    for paths, source in groups:
        for path, kind in paths:
            if not os.path.exists(path):
                continue
            if kind is None:
                kind = classify(path)
                if kind not in KINDS:
                    continue
            if only and kind != only:
                continue
            key = os.path.realpath(path)
            if key in seen:
                continue
            seen.add(key)
            out.append(Candidate(path, kind, source))
    return out


# ------------------------------------------------------------------ probing


def probe(path: str) -> dict:
    """Load ``path`` with ctypes (in this process; only called before an exec) and check it.

    Returns {"ok": bool, "why": str, "config": str|None, "core": str|None}. A library that fails
    to load here (missing libgfortran, wrong architecture) would be skipped by ld.so anyway.
    """
    import ctypes

    res = {"ok": False, "why": "", "config": None, "core": None}
    try:
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_LAZY", 1) | getattr(os, "RTLD_LOCAL", 0))
    except OSError as e:
        res["why"] = f"cannot load: {e}"
        return res
    if not hasattr(lib, "cblas_sgemm"):
        res["why"] = "exports no cblas_sgemm"
        return res
    for key, fn in (("config", "openblas_get_config"), ("core", "openblas_get_corename")):
        try:
            f = getattr(lib, fn)
            f.restype = ctypes.c_char_p
            v = f()
            res[key] = v.decode(errors="replace") if v else None
        except (AttributeError, OSError):
            pass
    res["ok"] = True
    return res


def effective_cpus() -> int:
    """CPUs this process may use: affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, p = f.read().split()[:2]
            if q != "max":
                quota = int(q) / int(p)
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                q = int(f.read())
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                p = int(f.read())
            if q > 0 and p > 0:
                quota = q / p
        except (OSError, ValueError):
            pass
    if quota:
        n = min(n, max(1, int(-(-quota // 1))))
    return max(1, n)


def _lib_dirs() -> list:
    m = _MULTIARCH.get(_machine())
    return [d for d in (f"/usr/lib/{m}" if m else "", f"/lib/{m}" if m else "", "/usr/lib64",
                        "/lib64", "/usr/lib", "/lib") if d]


def _tuning_env(cand: Candidate, info: dict, env) -> tuple:
    """(env changes, extra libraries to preload before ``cand``) for the chosen library."""
    changes, extra = {}, []
    threads = str(effective_cpus())
    if cand.kind == "openblas":
        if not any(env.get(k) for k in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")):
            changes["OPENBLAS_NUM_THREADS"] = threads
    elif cand.kind == "mkl":
        if not env.get("MKL_NUM_THREADS") and not env.get("OMP_NUM_THREADS"):
            changes["MKL_NUM_THREADS"] = threads
        if not env.get("MKL_THREADING_LAYER"):
            here = os.path.dirname(cand.path)
            iomp = [os.path.join(d, "libiomp5.so") for d in (here, os.path.join(sys.prefix, "lib"))]
            iomp = [p for p in iomp if os.path.exists(p)]
            if any(os.path.exists(os.path.join(d, "libgomp.so.1")) for d in _lib_dirs()):
                changes["MKL_THREADING_LAYER"] = "GNU"
            elif iomp:
                extra.append(iomp[0])  # the default INTEL layer, with its runtime preloaded
            else:
                changes["MKL_THREADING_LAYER"] = "SEQUENTIAL"
    elif cand.kind == "blis":
        if not env.get("BLIS_NUM_THREADS") and not env.get("OMP_NUM_THREADS"):
            changes["BLIS_NUM_THREADS"] = threads
    return changes, extra


def find_blas(env: dict | None = None, **kw) -> tuple:
    """First candidate that loads and exports cblas_sgemm: (Candidate, probe dict) or (None, reason)."""
    env = os.environ if env is None else env
    cands = candidates(env, **kw)
    choice = env.get(ENV_CHOICE, "").strip()
    if not cands:
        if "/" in choice:
            return None, f"{ENV_CHOICE}={choice}: no such file"
        return None, "no optimized BLAS found"
    why = []
    for c in cands:
        info = probe(c.path)
        if info["ok"]:
            return c, info
        why.append(f"{c.path}: {info['why']}")
    return None, "; ".join(why)


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
    changes, extra = _tuning_env(cand, info, env)
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


if __name__ == "__main__":  # diagnostics: python -m worker.blas
    import json

    result = {"info": blas_info(), "candidates": [], "effective_cpus": effective_cpus()}
    for c in candidates():
        result["candidates"].append({**c._asdict(), **probe(c.path)})
    print(json.dumps(result, indent=2))
