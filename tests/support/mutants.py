"""`make mutants`: small plausible bugs put into a copy of the repo, each run against the tests that should catch it.

Each mutant (tests/support/mutants_list.py) replaces one exact string of a file under worker/ or openai_server/ (it must occur exactly once,
else the mutant is stale: an error) in a throwaway copy of the working tree, then runs
``pytest -x`` on its targets there, with the copy as cwd and PYTHONPATH, so pytest and every worker process the
tests spawn (``python -m worker`` with cwd = the copy) import the mutated code. The repo itself is never touched.

killed: the targets failed (pytest exit 1); SURVIVED: they passed; error: anything else (a stale mutant, a
collection error, a timeout, a baseline that fails unmutated). Before the mutants, a probe checks that the copy's
code is what runs, and the targets run once unmutated (the baseline must pass; its durations set each mutant's
timeout). Exit status 1 when any mutant survived or errored.

    python -m tests.support.mutants                 # all (make mutants)
    python -m tests.support.mutants NAME... -k SUB  # some: by name, or names containing SUB
    python -m tests.support.mutants --list
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.mutants_list import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
IGNORE = shutil.ignore_patterns("__pycache__", ".pytest_tmp", ".hypothesis", ".pytest_cache")

# Loaded into every pytest run (-p): one JSON line per test phase, for the killer's node id and the durations;
# and the tests run in the order of the targets (narrowest first), whatever order conftest.py prefers.
PLUGIN = '''
import json, os
import pytest

def pytest_runtest_logreport(report):
    with open(os.environ["MUTANTS_REPORT"], "a") as f:
        f.write(json.dumps({"node": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "s": report.duration}) + "\\n")

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, t in enumerate(config.args) if item.nodeid == t
                     or item.nodeid.startswith((t + "::", t + "["))), len(config.args))
    items.sort(key=rank)
'''

# The isolation probe: the copy's worker/__init__.py records where it was imported from, in pytest and in the
# worker process a test spawns; every recorded path must lie inside the copy.
PROBE = Mutant("isolation-probe", "worker/__init__.py", '__version__ = "0.1.0"\n',
               '__version__ = "0.1.0"\nimport os as _os\nif _os.environ.get("MUTANTS_PROBE"):\n'
               '    open(_os.environ["MUTANTS_PROBE"], "a").write(__file__ + "\\n")\n', ())
PROBE_TEST = '''
import worker
from tests.support.client import Worker

def test_probe():
    w = Worker()
    w.close()
'''


def snapshot(dest: Path) -> Path:
    """The working tree as git sees it (tracked and untracked, not ignored), copied to ``dest``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if (ROOT / ".venv").exists():
        (dest / ".venv").symlink_to(ROOT / ".venv")  # for tests that look for the venv beside the repo
    (dest / ".mutants").mkdir()
    (dest / ".mutants" / "mutants_plugin.py").write_text(PLUGIN)
    return dest


def stale(base: Path, m: Mutant) -> str:
    """Why a mutant no longer applies to the tree ("" when it does)."""
    if not m.file.startswith(("worker/", "openai_server/")):
        return f"{m.file} is not under worker/ or openai_server/"
    path = base / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    n = path.read_text().count(m.old)
    if n != 1:
        return f"`old` occurs {n} times in {m.file}"
    if m.old == m.new:
        return "`new` equals `old`"
    missing = [t for t in m.targets if not (base / t.split("::")[0]).is_file()]
    return f"target {missing[0]} does not exist" if missing else ""


def copy_with(base: Path, work: Path, m: Mutant = None, extra: dict = None) -> Path:
    shutil.copytree(base, work, symlinks=True, ignore=IGNORE)
    if m is not None:
        path = work / m.file
        path.write_text(path.read_text().replace(m.old, m.new, 1))
    for rel, text in (extra or {}).items():
        (work / rel).write_text(text)
    return work


_procs, _procs_lock, _stopping = set(), threading.Lock(), threading.Event()


def stop_all() -> None:
    """Ctrl-C: start nothing more, kill every pytest running (with the workers its tests spawned)."""
    _stopping.set()
    with _procs_lock:
        for p in _procs:
            os.killpg(p.pid, signal.SIGKILL)


def pytest(work: Path, targets, timeout: float, first_failure=True, extra_env=None):
    """Run pytest on ``targets`` in ``work``: (exit code or None on timeout, seconds, report rows, output)."""
    report = work / ".mutants" / "report.jsonl"
    report.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MLX_WORKER_CMD"}
    env.update(PYTHONPATH=f"{work}{os.pathsep}{work / '.mutants'}", MUTANTS_REPORT=str(report),
               PYTHONDONTWRITEBYTECODE="1", **(extra_env or {}))
    cmd = [str(PYTHON if PYTHON.exists() else sys.executable), "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
           "-p", "mutants_plugin", f"--basetemp={work / '.pytest_tmp'}", *(["-x"] if first_failure else []),
           *targets]
    tic = time.monotonic()
    with _procs_lock:
        if _stopping.is_set():
            return None, 0.0, [], "interrupted"
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _procs.add(proc)
    try:
        out, code = proc.communicate(timeout=timeout)[0], proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and the workers its tests spawned
        out, code = proc.communicate()[0], None
    finally:
        with _procs_lock:
            _procs.discard(proc)
    rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    return code, time.monotonic() - tic, rows, out.decode("utf-8", "replace")


def pool_map(fn, items, jobs: int) -> list:
    pool = ThreadPoolExecutor(jobs)
    try:
        return list(pool.map(fn, items))
    except BaseException:
        stop_all()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def failures(rows) -> list:
    return [r["node"] for r in rows if r["outcome"] == "failed"]


def tail(out: str, n=3) -> str:
    lines = [line for line in out.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-300:]


def check_isolation(base: Path, tmp: Path) -> str:
    """"" when the probe saw only the copy's worker package, in pytest and in the spawned worker; else why not."""
    work = copy_with(base, tmp / "probe", PROBE, {"tests/test_mutants_probe.py": PROBE_TEST})
    probe = work / ".mutants" / "probe.txt"
    code, _, _, out = pytest(work, ["tests/test_mutants_probe.py"], 300, extra_env={"MUTANTS_PROBE": str(probe)})
    seen = probe.read_text().split() if probe.exists() else []
    shutil.rmtree(work, ignore_errors=True)
    if code != 0:
        return f"the probe test failed (exit {code}): {tail(out)}"
    if len(seen) < 2:
        return f"the probe recorded {len(seen)} imports of worker (pytest and the worker process expected)"
    outside = [p for p in seen if not p.startswith(str(work) + os.sep)]
    return f"worker was imported from outside the copy: {outside}" if outside else ""


def baseline(base: Path, tmp: Path, mutants, jobs: int) -> tuple:
    """Run every target once unmutated, a pytest process per test file, ``jobs`` at once: (failed node ids or
    unusable files, targets not found, seconds per node id)."""
    targets = {t for m in mutants for t in m.targets}
    by_file = {}  # a whole file covers its node ids
    for t in sorted(targets):
        f = t.split("::")[0]
        if f == t or f not in targets:
            by_file.setdefault(f, []).append(t)

    missing = set()  # node ids pytest does not find (a renamed test): their mutants are stale

    def run(f):
        work, wanted = copy_with(base, tmp / f"baseline-{f.replace('/', '-')}"), by_file[f]
        try:
            while True:
                res = pytest(work, wanted, 3600, first_failure=False)
                lost = [line for line in res[3].splitlines() if line.startswith("ERROR: not found: ")]
                gone = [t for t in wanted if any(line.endswith("/" + t) for line in lost)]
                missing.update(gone)
                if res[0] != 4 or not gone or len(gone) == len(wanted):
                    return res
                wanted = [t for t in wanted if t not in gone]
        finally:
            shutil.rmtree(work, ignore_errors=True)

    tic = time.monotonic()
    runs = pool_map(run, sorted(by_file), jobs)
    rows = [r for run_ in runs for r in run_[2]]
    durations = {}
    for r in rows:
        durations[r["node"]] = durations.get(r["node"], 0.0) + r["s"]
    print(f"baseline: {len(durations)} tests in {len(runs)} files, {time.monotonic() - tic:.0f} s", flush=True)
    bad = failures(rows)
    for f, (code, _, _, out) in zip(sorted(by_file), runs):
        if code not in (0, 1) and not set(by_file[f]) <= missing:  # a collection error, a timeout: every target in the file is unusable
            bad.append(f)
            print(f"error: baseline {f}: pytest exit {code}: {tail(out)}", flush=True)
    for node in failures(rows):
        print(f"error: baseline fails unmutated: {node}", flush=True)
    return bad, missing, durations


def covers(target: str, node: str) -> bool:
    return node == target or node.startswith(target + "::") or node.startswith(target + "[")


def run_mutant(base: Path, tmp: Path, m: Mutant, bad: list, missing: set, durations: dict, args) -> tuple:
    """(status, seconds, detail) for one mutant."""
    why = stale(base, m) or next((f"target {t} not found" for t in m.targets if t in missing), "")
    if why:
        return "error", 0.0, f"stale: {why}"
    broken = [n for n in bad if any(covers(t, n) or covers(n, t) for t in m.targets)]
    if broken:
        return "error", 0.0, f"baseline fails: {broken[0]}"
    expected = sum(s for n, s in durations.items() if any(covers(t, n) for t in m.targets))
    timeout = m.timeout or args.timeout or max(180.0, 3 * expected + 60)
    work = copy_with(base, tmp / f"m-{m.name}", m)
    try:
        code, secs, rows, out = pytest(work, list(m.targets), timeout)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    failed = failures(rows)
    if code == 1 and failed:
        return "killed", secs, failed[0]
    if code == 0:
        return "SURVIVED", secs, f"{len({r['node'] for r in rows})} tests passed"
    if code is None:
        return "error", secs, f"timeout after {timeout:.0f} s"
    return "error", secs, f"pytest exit {code}: {tail(out)}"


def select(args) -> list:
    picked = args.names or args.k
    chosen = [m for m in MUTANTS if not picked or m.name in args.names or any(k in m.name for k in args.k)]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"unknown mutants: {', '.join(sorted(unknown))} (--list lists them)")
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.mutants", description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("-k", action="append", default=[], help="run the mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and their targets")
    ap.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MUTANTS_JOBS", "2")),
                    help="pytest processes at once (default 2, or $MUTANTS_JOBS; 2 beat 1 by ~20%% on 2 cores)")
    ap.add_argument("--timeout", type=float, help="seconds per mutant (default: 3x its baseline + 60, >= 180)")
    ap.add_argument("--keep", action="store_true", help="keep each mutant's copy (printed) for a post-mortem")
    args = ap.parse_args(argv)
    chosen = select(args)
    if args.list:
        for m in chosen:
            why = stale(ROOT, m)
            print(f"{m.name:34} {m.file:28} {' '.join(m.targets)}" + (f"  STALE: {why}" if why else ""))
        print(f"{len(chosen)} mutants")
        return 0
    names = [m.name for m in MUTANTS]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        sys.exit(f"duplicate mutant names: {sorted(dupes)}")
    tic = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="mutants-"))
    try:
        base = snapshot(tmp / "base")
        why = check_isolation(base, tmp)
        if why:
            print(f"error: isolation probe: {why}")
            return 1
        print(f"isolation: pytest and the spawned worker import the copy's worker/ ({time.monotonic() - tic:.0f} s)",
              flush=True)
        live = [m for m in chosen if not stale(base, m)]
        bad, missing, durations = baseline(base, tmp, live, max(1, args.jobs))
        results = {}

        def one(m):
            res = run_mutant(base, tmp, m, bad, missing, durations, args)
            results[m.name] = res
            status, secs, detail = res
            print(f"{status:8} {secs:6.0f} s  {m.name:34} {detail}", flush=True)
            if args.keep:
                print(f"         copy: {tmp / f'm-{m.name}'}", flush=True)

        pool_map(one, chosen, max(1, args.jobs))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    counts = {s: sum(r[0] == s for r in results.values()) for s in ("killed", "SURVIVED", "error")}
    print(f"\n{len(chosen)} mutants: {counts['killed']} killed, {counts['SURVIVED']} survived, "
          f"{counts['error']} errors ({time.monotonic() - tic:.0f} s, {max(1, args.jobs)} at a time)")
    for m in chosen:
        status, _, detail = results[m.name]
        if status != "killed":
            print(f"  {status:8} {m.name}: {m.file}; should be killed by {' '.join(m.targets)} ({detail})")
    return 0 if counts["killed"] == len(chosen) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
