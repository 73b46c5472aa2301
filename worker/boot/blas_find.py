"""Finding an optimized BLAS: candidate libraries, probing them, and the tuning they need.

Standard library only: this runs before mlx is imported (see worker/boot/blas.py).
"""

from __future__ import annotations

import os
import sys
from collections import namedtuple

ENV_CHOICE = "MLX_WORKER_BLAS"
OFF_VALUES = frozenset({"off", "0", "none", "reference", "no", "false", "disable", "disabled"})
KINDS = ("openblas", "mkl", "blis")

# what cmeel-openblas's x86_64 build (TARGET=SKYLAKEX, no DYNAMIC_ARCH) needs
_AVX512_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})

_MULTIARCH = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
              "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}

# kind: "openblas" | "mkl" | "blis" | "unknown"; source: "env" | "system" | "pip"
Candidate = namedtuple("Candidate", "path kind source")


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


def _tuning_env(cand: Candidate, env) -> tuple:
    """(env changes, extra libraries to preload before ``cand``) for the chosen library."""
    changes, extra = {}, []
    # ranks started together on this machine (``--ranks N``) share its CPUs: each gets its part of them
    # (bench/README.md, Distributed: N ranks of all the CPUs each oversubscribe them and decode slower)
    try:
        local_ranks = max(1, int(env.get("MLX_WORKER_LOCAL_RANKS") or 1))
    except ValueError:
        local_ranks = 1
    threads = str(max(1, effective_cpus() // local_ranks))
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
