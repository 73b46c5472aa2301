"""worker/boot/blas.py: candidate search, the one-time re-exec, and reading /proc/self/maps.

Run as a module (``python -m tests.unit.test_blas_unit``) it is the re-exec target of the
subprocess tests: it calls ``maybe_reexec`` like ``python -m worker`` does, then imports mlx,
does a matmul and prints one JSON line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.boot import blas

from worker.boot import blas_find
from worker.boot.blas import Candidate

REPO = Path(__file__).resolve().parents[2]
MLX_REF = "/venv/lib/python3.11/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"
DEB_OB = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so"
AVX512 = frozenset({"fpu", "avx2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})


def _maps(tmp_path, *paths, name="maps"):
    """A synthetic /proc/<pid>/maps with one r-xp line per path (plus noise lines)."""
    lines = ["55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 131 /usr/bin/python3.11",
             "7ffd4a1e0000-7ffd4a201000 rw-p 00000000 00:00 0                          [stack]",
             "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 "]
    for i, p in enumerate(paths):
        lines.append(f"7f{i:02x}00000000-7f{i:02x}00100000 r-xp 00001000 08:01 {1000 + i}    {p}")
        lines.append(f"7f{i:02x}00100000-7f{i:02x}00200000 r--p 00101000 08:01 {1000 + i}    {p}")
    f = tmp_path / name
    f.write_text("\n".join(lines) + "\n")
    return str(f)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF")
    return path


@pytest.fixture
def clean_env(monkeypatch):
    """The BLAS variables removed; the whole environment put back afterwards: the re-exec code sets
    LD_PRELOAD and its marker in os.environ itself (a faked execv leaves them), which monkeypatch cannot
    undo for variables that were absent, and every later test's worker would inherit them."""
    saved = dict(os.environ)
    for k in ("MLX_WORKER_BLAS", "MLX_WORKER_BLAS_REEXEC", "MLX_WORKER_DEVICE", "LD_PRELOAD",
              "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE",
              "MKL_NUM_THREADS", "MKL_THREADING_LAYER", "BLIS_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


# ------------------------------------------------------------------ classify


@pytest.mark.parametrize("path,kind", [
    (MLX_REF, "reference"),
    ("/usr/lib/x86_64-linux-gnu/blas/libblas.so.3", "reference"),
    (DEB_OB, "openblas"),
    ("/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3", "openblas"),
    ("/usr/lib64/libopenblasp.so.0", "openblas"),
    ("/venv/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so", "unknown"),
    ("/venv/lib/python3.11/site-packages/scipy.libs/libopenblasp-r0-23e5df77.3.21.dev.so", "unknown"),
    ("/venv/lib/python3.11/site-packages/scipy_openblas32/lib/libscipy_openblas.so", "unknown"),
    ("/venv/lib/libmkl_rt.so.3", "mkl"),
    ("/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4", "blis"),
    ("/usr/lib/x86_64-linux-gnu/blis-openmp/libblas.so.3", "blis"),
    ("/home/openblas-fan/venv/site-packages/mlx_cpu.libs/libblas-x.so.3", "reference"),
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", "unknown"),
])
def test_classify(path, kind):
    assert blas.classify(path) == kind


# ------------------------------------------------------------------ candidates


@pytest.fixture
def fake_tree(tmp_path):
    root = tmp_path / "root"
    lib = root / "usr/lib/x86_64-linux-gnu"
    _touch(lib / "openblas-pthread/libopenblas.so.0")
    _touch(lib / "blis-pthread/libblis.so.4")
    _touch(lib / "blas/libblas.so.3")
    (lib / "libblas.so.3").symlink_to(lib / "blas/libblas.so.3")  # Netlib: never a candidate
    _touch(root / "usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0")
    sp = tmp_path / "venv/lib/python3.11/site-packages"
    _touch(sp / "ngsolve_openblas/libopenblasp-r0.3.33.so")
    _touch(sp / "cmeel.prefix/lib/libopenblas.so.0")
    _touch(sp / "scipy_openblas32/lib/libscipy_openblas.so")
    prefix = tmp_path / "venv"
    _touch(prefix / "lib/libmkl_rt.so.3")
    return dict(root=str(root), site_dirs=[str(sp)], prefix=str(prefix))


def _names(cands, tree):
    strip = (tree["root"], tree["prefix"])
    out = []
    for c in cands:
        p = c.path
        for s in strip:
            if p.startswith(s + "/"):
                p = p[len(s):]
        out.append((p, c.kind, c.source))
    return out


def test_candidates_order_and_sources(fake_tree):
    got = _names(blas.candidates({}, machine="x86_64", cpu_flags=AVX512, **fake_tree), fake_tree)
    assert got == [
        ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0", "openblas", "system"),
        ("/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4", "blis", "system"),
        ("/lib/python3.11/site-packages/ngsolve_openblas/libopenblasp-r0.3.33.so", "openblas", "pip"),
        ("/lib/python3.11/site-packages/cmeel.prefix/lib/libopenblas.so.0", "openblas", "pip"),
        ("/lib/libmkl_rt.so.3", "mkl", "pip"),
    ]


def test_candidates_cmeel_needs_avx512(fake_tree):
    got = _names(blas.candidates({}, machine="x86_64", cpu_flags=frozenset({"avx2"}), **fake_tree),
                 fake_tree)
    assert not any("cmeel" in p for p, _, _ in got)


def test_candidates_aarch64_multiarch(fake_tree):
    got = _names(blas.candidates({}, machine="aarch64", cpu_flags=frozenset(), **fake_tree), fake_tree)
    # aarch64 dir only; no MKL off x86; cmeel's aarch64 wheel is generic
    assert got == [
        ("/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0", "openblas", "system"),
        ("/lib/python3.11/site-packages/ngsolve_openblas/libopenblasp-r0.3.33.so", "openblas", "pip"),
        ("/lib/python3.11/site-packages/cmeel.prefix/lib/libopenblas.so.0", "openblas", "pip"),
    ]


@pytest.mark.parametrize("value", ["off", "OFF", "0", "none", "reference", " off "])
def test_candidates_opt_out(fake_tree, value):
    assert blas.candidates({"MLX_WORKER_BLAS": value}, machine="x86_64", **fake_tree) == []


@pytest.mark.parametrize("kind", ["blis", "mkl", "openblas"])
def test_candidates_kind_filter(fake_tree, kind):
    got = blas.candidates({"MLX_WORKER_BLAS": kind}, machine="x86_64", cpu_flags=AVX512, **fake_tree)
    assert got and {c.kind for c in got} == {kind}


def test_candidates_user_path(fake_tree, tmp_path):
    mine = _touch(tmp_path / "opt/libopenblas.so.0")
    got = blas.candidates({"MLX_WORKER_BLAS": str(mine)}, machine="x86_64", **fake_tree)
    assert got == [Candidate(str(mine), "openblas", "env")]
    # a named path that does not exist: nothing (no silent fall-back to the search)
    assert blas.candidates({"MLX_WORKER_BLAS": str(tmp_path / "nope.so")}, machine="x86_64",
                           **fake_tree) == []


def test_libblas_alternative_accepted_when_optimized(tmp_path):
    root = tmp_path / "root"
    lib = root / "usr/lib/x86_64-linux-gnu"
    _touch(lib / "blis-openmp/libblas.so.3")
    (lib / "libblas.so.3").symlink_to(lib / "blis-openmp/libblas.so.3")
    got = blas.candidates({}, machine="x86_64", root=str(root), site_dirs=[], prefix=str(tmp_path),
                          cpu_flags=frozenset())
    assert [(c.kind, c.source) for c in got] == [("blis", "system")]
    assert got[0].path.endswith("/libblas.so.3")


# ------------------------------------------------------------------ blas_info


def test_blas_info_reference(tmp_path):
    m = _maps(tmp_path, "/usr/lib/x86_64-linux-gnu/libc.so.6", MLX_REF)
    assert blas.blas_info(m, env={}) == {"name": "reference", "path": MLX_REF, "preloaded": False,
                                         "source": None}


def test_blas_info_preloaded_openblas(tmp_path):
    # ld.so maps LD_PRELOAD first; numpy's prefixed copy must not count
    m = _maps(tmp_path, DEB_OB, "/usr/lib/x86_64-linux-gnu/libgfortran.so.5.0.0", MLX_REF,
              "/venv/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so")
    info = blas.blas_info(m, env={"LD_PRELOAD": f"/x/libfoo.so:{DEB_OB}"})
    assert info == {"name": "openblas", "path": DEB_OB, "preloaded": True, "source": "system"}
    assert blas.blas_info(m, env={})["preloaded"] is False


def test_blas_info_preload_by_bare_name(tmp_path, monkeypatch):
    lib = tmp_path / "sys/openblas-pthread/libopenblasp-r0.3.21.so"
    _touch(lib)
    (tmp_path / "sys/libopenblas.so.0").symlink_to(lib)
    monkeypatch.setattr(blas_find, "_lib_dirs", lambda: [str(tmp_path / "sys")])
    monkeypatch.setattr(blas, "_lib_dirs", lambda: [str(tmp_path / "sys")])
    m = _maps(tmp_path, str(lib), MLX_REF)
    info = blas.blas_info(m, env={"LD_PRELOAD": "libopenblas.so.0"})
    assert info["name"] == "openblas" and info["preloaded"] is True


def test_blas_info_numpy_copy_is_not_openblas(tmp_path):
    m = _maps(tmp_path, MLX_REF,
              "/venv/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so")
    assert blas.blas_info(m, env={})["name"] == "reference"


def test_blas_info_pip_mkl_and_deleted(tmp_path):
    core = "/venv/lib/libmkl_core.so.3"
    m = _maps(tmp_path, core + " (deleted)", MLX_REF)
    info = blas.blas_info(m, env={"LD_PRELOAD": core})
    assert info["name"] == "mkl" and info["path"] == core and info["preloaded"]
    mkl = "/venv/lib/python3.11/site-packages/mkl/libmkl_rt.so.3"
    m2 = _maps(tmp_path, mkl, name="maps2")
    assert blas.blas_info(m2, env={})["source"] == "pip"


def test_blas_info_mapped_but_not_preloaded(tmp_path):
    # e.g. the ctypes probe before an exec that failed: it does not serve MLX, the reference does
    m = _maps(tmp_path, DEB_OB, MLX_REF)
    assert blas.blas_info(m, env={})["name"] == "reference"
    # ... but with no reference mapped at all, the one that is mapped is the best answer
    m2 = _maps(tmp_path, DEB_OB, name="maps2")
    assert blas.blas_info(m2, env={}) == {"name": "openblas", "path": DEB_OB, "preloaded": False,
                                          "source": "system"}


def test_blas_info_env_named_library(tmp_path):
    lib = "/opt/vendor/libvendorblas.so"
    m = _maps(tmp_path, lib, MLX_REF)
    info = blas.blas_info(m, env={"MLX_WORKER_BLAS": lib, "LD_PRELOAD": lib})
    assert info == {"name": "unknown", "path": lib, "preloaded": True, "source": "env"}


def test_blas_info_nothing_mapped_and_missing_file(tmp_path):
    assert blas.blas_info(_maps(tmp_path), env={})["name"] == "unknown"
    assert blas.blas_info(str(tmp_path / "absent"), env={}) == {
        "name": "unknown", "path": None, "preloaded": False, "source": None}


def test_blas_info_macos(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert blas.blas_info()["name"] == "accelerate"


def test_blas_info_live_process_is_cheap(monkeypatch):
    """It reads this process's own maps and spawns nothing (a timing would be flaky on a loaded machine)."""
    import subprocess

    def refuse(*a, **k):
        raise AssertionError("blas_info must not spawn a process")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    info = blas.blas_info()
    assert set(info) >= {"name", "path", "preloaded", "source"}


# ------------------------------------------------------------------ maybe_reexec


class _Exec(BaseException):  # like a real exec, not caught by maybe_reexec
    pass


@pytest.fixture
def fake_exec(clean_env, tmp_path):
    """os.execv recorded instead of run; find_blas answers a fixed OpenBLAS candidate."""
    calls = []

    def execv(path, args):
        calls.append((path, list(args), dict(os.environ)))
        raise _Exec()

    lib = str(_touch(tmp_path / "lib/openblas-pthread/libopenblas.so.0"))
    clean_env.setattr(os, "execv", execv)
    clean_env.setattr(blas, "find_blas", lambda env=None, **kw: (
        Candidate(lib, "openblas", "system"),
        {"ok": True, "why": "", "config": "OpenBLAS 0.3.21 DYNAMIC_ARCH", "core": "Cooperlake"}))
    return calls, lib, _maps(tmp_path, "/usr/lib/x86_64-linux-gnu/libc.so.6")


def _run(argv, maps, **kw):
    try:
        blas.maybe_reexec(argv, maps_path=maps, **kw)
    except _Exec:
        return True
    return False


def test_reexec_sets_preload_marker_and_argv(fake_exec, capsys, clean_env):
    calls, lib, maps = fake_exec
    clean_env.setenv("LD_PRELOAD", "/usr/lib/libkeep.so")
    assert _run(["--max-line-bytes", "99"], maps)
    (path, args, env), = calls
    assert path == sys.executable
    assert args[0] == sys.executable and args[-4:] == ["-m", "worker", "--max-line-bytes", "99"]
    assert env["LD_PRELOAD"] == f"{lib}:/usr/lib/libkeep.so"  # prepended, existing kept
    assert env["MLX_WORKER_BLAS_REEXEC"] == "1"
    assert env["OPENBLAS_NUM_THREADS"] == str(blas.effective_cpus())
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "re-executing" in err and lib in err


def test_reexec_keeps_user_thread_count(fake_exec, clean_env):
    calls, _, maps = fake_exec
    clean_env.setenv("OMP_NUM_THREADS", "1")
    assert _run([], maps)
    assert "OPENBLAS_NUM_THREADS" not in calls[0][2]


def test_no_reexec_when_marker_set(fake_exec, clean_env, capsys):
    calls, lib, maps = fake_exec
    clean_env.setenv("MLX_WORKER_BLAS_REEXEC", "1")
    assert not _run([], maps)
    assert calls == []
    # ... and it says so when the preload did not take
    assert "did not map an optimized BLAS" in capsys.readouterr().err
    ok_maps = _maps(Path(maps).parent, lib, name="maps_ok")
    clean_env.setenv("LD_PRELOAD", lib)
    assert not _run([], ok_maps)
    assert calls == [] and capsys.readouterr() == ("", "")


@pytest.mark.parametrize("var,value", [("MLX_WORKER_BLAS", "off"), ("MLX_WORKER_BLAS", "none"),
                                       ("MLX_WORKER_BLAS", "reference"), ("MLX_WORKER_BLAS", "0"),
                                       ("MLX_WORKER_DEVICE", "gpu")])
def test_no_reexec_when_opted_out(fake_exec, clean_env, var, value):
    calls, _, maps = fake_exec
    clean_env.setenv(var, value)
    clean_env.setattr(blas, "find_blas", lambda *a, **k: pytest.fail("searched"))
    assert not _run([], maps)
    assert calls == []


def test_no_reexec_on_macos(fake_exec, clean_env):
    calls, _, maps = fake_exec
    clean_env.setattr(sys, "platform", "darwin")
    assert not _run([], maps) and calls == []


def test_no_reexec_when_user_preloaded_one(fake_exec, tmp_path, clean_env):
    calls, _, _ = fake_exec
    clean_env.setenv("LD_PRELOAD", DEB_OB)
    assert not _run([], _maps(tmp_path, DEB_OB, name="maps_ob"))
    assert calls == []


def test_no_reexec_when_nothing_found(clean_env, tmp_path, capsys):
    clean_env.setattr(os, "execv", lambda *a: pytest.fail("exec"))
    clean_env.setattr(blas, "find_blas", lambda env=None, **kw: (None, "no optimized BLAS found"))
    assert not _run([], _maps(tmp_path))
    assert capsys.readouterr() == ("", "")


def test_exec_failure_restores_env_and_carries_on(clean_env, tmp_path, capsys):
    lib = str(_touch(tmp_path / "libopenblas.so.0"))
    clean_env.setattr(blas, "find_blas", lambda env=None, **kw: (
        Candidate(lib, "openblas", "system"), {"ok": True, "config": None, "core": None}))

    def execv(path, args):
        raise OSError(8, "Exec format error")

    clean_env.setattr(os, "execv", execv)
    clean_env.setenv("LD_PRELOAD", "/usr/lib/libkeep.so")
    assert not _run([], _maps(tmp_path))
    assert os.environ["LD_PRELOAD"] == "/usr/lib/libkeep.so"
    assert "MLX_WORKER_BLAS_REEXEC" not in os.environ and "OPENBLAS_NUM_THREADS" not in os.environ
    out, err = capsys.readouterr()
    assert out == "" and "re-exec failed" in err


def test_user_named_missing_library_is_reported(clean_env, tmp_path, capsys):
    clean_env.setattr(os, "execv", lambda *a: pytest.fail("exec"))
    clean_env.setenv("MLX_WORKER_BLAS", str(tmp_path / "libnope.so"))
    assert not _run([], _maps(tmp_path))
    out, err = capsys.readouterr()
    assert out == "" and "libnope.so" in err


# ------------------------------------------------------------------ tuning


def test_tuning_openblas_threads_only(clean_env):
    c = Candidate("/x/libopenblas.so.0", "openblas", "system")
    assert blas._tuning_env(c, {}) == ({"OPENBLAS_NUM_THREADS": str(blas.effective_cpus())}, [])
    for var in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        assert blas._tuning_env(c, {var: "1"}) == ({}, [])
    # OPENBLAS_CORETYPE is never touched
    assert "OPENBLAS_CORETYPE" not in blas._tuning_env(c, {"OPENBLAS_CORETYPE": "Haswell"})[0]


def test_local_ranks_share_the_cpus(clean_env, monkeypatch):
    """``--ranks N`` sets MLX_WORKER_LOCAL_RANKS: each of the N ranks gets its part of the CPUs (at least 1)."""
    c = Candidate("/x/libopenblas.so.0", "openblas", "system")
    monkeypatch.setattr(blas_find, "effective_cpus", lambda: 8)
    assert blas._tuning_env(c, {"MLX_WORKER_LOCAL_RANKS": "2"})[0] == {"OPENBLAS_NUM_THREADS": "4"}
    assert blas._tuning_env(c, {"MLX_WORKER_LOCAL_RANKS": "3"})[0] == {"OPENBLAS_NUM_THREADS": "2"}
    assert blas._tuning_env(c, {"MLX_WORKER_LOCAL_RANKS": "16"})[0] == {"OPENBLAS_NUM_THREADS": "1"}
    assert blas._tuning_env(c, {"MLX_WORKER_LOCAL_RANKS": "x"})[0] == {"OPENBLAS_NUM_THREADS": "8"}
    env = {}
    from worker.__main__ import _local_ranks
    _local_ranks(["--max-line-bytes", "99", "--ranks", "2"], env)
    assert env == {"MLX_WORKER_LOCAL_RANKS": "2"}
    _local_ranks(["--ranks=4"], env)
    assert env == {"MLX_WORKER_LOCAL_RANKS": "2"}  # a value already set is kept (the re-exec, the host's)


def test_tuning_blis_threads(clean_env):
    c = Candidate("/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4", "blis", "system")
    assert blas._tuning_env(c, {})[0] == {"BLIS_NUM_THREADS": str(blas.effective_cpus())}
    assert blas._tuning_env(c, {"BLIS_NUM_THREADS": "1"})[0] == {}


def test_tuning_mkl_threading_layer(clean_env, tmp_path):
    lib = _touch(tmp_path / "lib/libmkl_rt.so.3")
    c = Candidate(str(lib), "mkl", "pip")
    clean_env.setattr(blas_find, "_lib_dirs", lambda: [str(tmp_path / "nolibs")])
    assert blas._tuning_env(c, {})[0]["MKL_THREADING_LAYER"] == "SEQUENTIAL"
    iomp = _touch(tmp_path / "lib/libiomp5.so")
    ch, extra = blas._tuning_env(c, {})
    assert "MKL_THREADING_LAYER" not in ch and extra == [str(iomp)]
    _touch(tmp_path / "sys/libgomp.so.1")
    clean_env.setattr(blas_find, "_lib_dirs", lambda: [str(tmp_path / "sys")])
    assert blas._tuning_env(c, {})[0]["MKL_THREADING_LAYER"] == "GNU"
    assert "MKL_THREADING_LAYER" not in blas._tuning_env(c, {"MKL_THREADING_LAYER": "INTEL"})[0]


def test_effective_cpus_positive():
    assert 1 <= blas.effective_cpus() <= (os.cpu_count() or 1)


# ------------------------------------------------------------------ status line


def test_log_blas_status_once(clean_env, capsys):
    clean_env.setattr(blas, "_logged_status", False)
    ref = {"name": "reference", "path": MLX_REF, "preloaded": False, "source": None}
    blas.log_blas_status(ref)
    blas.log_blas_status(ref)
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "reference BLAS" in err and "libopenblas0-pthread" in err


def test_log_blas_status_quiet_when_fast(clean_env, capsys):
    clean_env.setattr(blas, "_logged_status", False)
    blas.log_blas_status({"name": "openblas", "path": DEB_OB, "preloaded": True, "source": "system"})
    clean_env.setenv("MLX_WORKER_DEVICE", "gpu")
    blas.log_blas_status({"name": "reference", "path": MLX_REF, "preloaded": False, "source": None})
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------ real processes


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLX_WORKER_BLAS", "OPENBLAS_NUM_THREADS")) and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run_child(**extra):
    code = ("from worker.boot import blas; blas.maybe_reexec(['--flag'], module='tests.unit.test_blas_unit');"
            "import tests.unit.test_blas_unit as t; t.child_main(reexeced=False)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_child_env(**extra),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout  # nothing else on stdout
    return json.loads(lines[0]), p.stderr


@pytest.fixture(scope="module")
def system_blas():
    if not sys.platform.startswith("linux"):
        pytest.skip("LD_PRELOAD re-exec is Linux only")
    cands = blas.candidates({})
    if not cands:
        pytest.skip("no optimized BLAS installed: apt-get install libopenblas0-pthread")
    return cands[0]


@pytest.fixture(scope="module")
def children(system_blas):
    """One child with the default search, one with MLX_WORKER_BLAS=off."""
    return {"fast": _run_child(), "off": _run_child(MLX_WORKER_BLAS="off")}


def test_subprocess_reexec_maps_blas(system_blas, children):
    out, err = children["fast"]
    assert out["reexeced"] is True and out["argv"] == ["--flag"]
    info = out["info"]
    assert info["name"] == system_blas.kind and info["preloaded"] is True
    assert os.path.realpath(info["path"]) == os.path.realpath(system_blas.path)
    assert err.count("re-executing") == 1  # once, and no loop in the child
    assert out["rel_err"] < 1e-4


def test_subprocess_opt_out_stays_on_reference(children):
    out, err = children["off"]
    assert out["reexeced"] is False and out["info"]["name"] == "reference"
    assert "re-executing" not in err
    assert out["rel_err"] < 1e-4


def test_subprocess_same_result_with_and_without(children):
    fast, ref = children["fast"][0], children["off"][0]
    assert fast["argmax"] == ref["argmax"]
    assert abs(fast["checksum"] - ref["checksum"]) <= 1e-4 * abs(ref["checksum"]) + 1e-3


def child_main(reexeced: bool) -> None:
    """In the child: what python -m worker does first, then a matmul; one JSON line on stdout."""
    blas.maybe_reexec(sys.argv[1:], module="tests.unit.test_blas_unit")  # must not exec again
    import mlx.core as mx
    import numpy as np

    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 320), dtype=np.float32)
    b = rng.standard_normal((320, 192), dtype=np.float32)
    c = np.array(mx.matmul(mx.array(a), mx.array(b)))
    ref = a.astype(np.float64) @ b.astype(np.float64)
    print(json.dumps({
        "reexeced": reexeced,
        "argv": sys.argv[1:],
        "info": blas.blas_info(),
        "rel_err": float(np.abs(c - ref).max() / np.abs(ref).max()),
        "checksum": float(c.astype(np.float64).sum()),
        "argmax": c.argmax(axis=1).tolist(),
    }))


if __name__ == "__main__":
    child_main(reexeced=bool(os.environ.get("MLX_WORKER_BLAS_REEXEC")))
