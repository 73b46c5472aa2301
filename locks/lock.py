"""The lock files: ``make lock`` writes them with uv, ``make setup`` and ``make test`` check them.

One hash-pinned resolution per supported platform (``TARGETS``), each universal over the Python
versions ``requires-python`` allows, plus ``requirements-tools.txt`` (uv itself, used to install the others).
Every lock starts with two digests: one of the inputs it was resolved from (pyproject.toml's
dependency tables and ``build.in``) and one of its own body. ``check`` recomputes both, so a lock
that is stale against pyproject.toml, or was edited by hand, fails with the message to run
``make lock``. Standard library only: it runs before the virtual environment exists.

    python locks/lock.py write [--uv PATH]   # resolve again (network: PyPI), keeping every pin that still fits
    python locks/lock.py check               # exit 1 with a message when a lock is stale
    python locks/lock.py target [--cuda]     # the lock file for this machine
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD_IN = HERE / "build.in"
TOOLS_IN = "uv"
EXTRAS = ["test", "bench", "prep", "serve"]
TARGETS = {
    "linux-cpu": {"environment": "sys_platform == 'linux'", "extras": EXTRAS},
    # mlx-cpu and mlx-cuda-13 both install mlx/lib/libmlx.so: the CUDA environment must not hold both.
    "linux-cuda": {"environment": "sys_platform == 'linux'", "extras": EXTRAS + ["cuda"],
                   "no_emit": ["mlx-cpu"]},
    "macos": {"environment": "sys_platform == 'darwin'", "extras": EXTRAS},
}
INPUTS_TAG = "# inputs-sha256: "
BODY_TAG = "# content-sha256: "
STALE = "{name} does not match {why}: run `make lock` (it resolves again and rewrites the locks)"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def inputs_digest(target: str) -> str:
    """What a lock depends on: pyproject.toml's dependency tables and build.in (uv's: its name only)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = {"requires-python": project["project"].get("requires-python")}
    if target == "tools":
        data["tools"] = TOOLS_IN
    else:
        data.update({
            "dependencies": project["project"].get("dependencies", []),
            "optional-dependencies": project["project"].get("optional-dependencies", {}),
            "build-system": project.get("build-system", {}).get("requires", []),
            "build.in": BUILD_IN.read_text(),
            "target": TARGETS[target],
        })
    return _sha(json.dumps(data, sort_keys=True))


def lock_path(target: str) -> Path:
    return HERE / f"requirements-{target}.txt"


def _split(text: str):
    lines = text.splitlines(keepends=True)
    if len(lines) < 2 or not lines[0].startswith(INPUTS_TAG) or not lines[1].startswith(BODY_TAG):
        return None, None, text
    return lines[0][len(INPUTS_TAG):].strip(), lines[1][len(BODY_TAG):].strip(), "".join(lines[2:])


def problems():
    """Every lock that is missing, stale against its inputs, or edited by hand."""
    found = []
    for target in [*TARGETS, "tools"]:
        path = lock_path(target)
        name = f"locks/{path.name}"
        if not path.exists():
            found.append(STALE.format(name=name, why="anything (the file is missing)"))
            continue
        inputs, body_sha, body = _split(path.read_text())
        if inputs is None:
            found.append(STALE.format(name=name, why="its format (no digest header)"))
        elif inputs != inputs_digest(target):
            found.append(STALE.format(name=name, why="pyproject.toml / locks/build.in"))
        elif body_sha != _sha(body):
            found.append(STALE.format(name=name, why="its digest (it was edited by hand)"))
    return found


def _uv_compile(uv: str, sources, out: Path, python: str, environment=None, extras=(), no_emit=()):
    """uv resolves for one environment only when it is told so in a pyproject.toml: use a copy."""
    with tempfile.TemporaryDirectory() as tmp:
        sources = list(sources)
        if environment and sources and Path(sources[0]).name == "pyproject.toml":
            copy = Path(tmp) / "pyproject.toml"
            copy.write_text(Path(sources[0]).read_text()
                            + f"\n[tool.uv]\nenvironments = [{json.dumps(environment)}]\n")
            sources[0] = str(copy)
        cmd = [uv, "pip", "compile", *sources, "--universal", "--python-version", python,
               "--generate-hashes", "--no-annotate", "--quiet",
               "--custom-compile-command", "make lock", "-o", str(out)]
        cmd += [f"--extra={e}" for e in extras] + [f"--no-emit-package={p}" for p in no_emit]
        # run in the copy's folder: uv reads `[tool.uv]` from the pyproject.toml of its working directory
        subprocess.run(cmd, check=True, cwd=tmp)


def _lowest_python() -> str:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    return spec.replace(">=", "").split(",")[0].strip()


def write(uv: str) -> None:
    uv = shutil.which(uv) or uv
    uv = str(Path(uv).resolve())  # uv runs in a temporary folder
    python = _lowest_python()
    with tempfile.TemporaryDirectory() as tmp:
        tools_in = Path(tmp) / "tools.in"
        tools_in.write_text(TOOLS_IN + "\n")
        jobs = {t: ([str(ROOT / "pyproject.toml"), str(BUILD_IN)], c) for t, c in TARGETS.items()}
        jobs["tools"] = ([str(tools_in)], {})
        for target, (sources, cfg) in jobs.items():
            out = Path(tmp) / f"{target}.txt"
            if lock_path(target).exists():  # uv keeps an output file's pins where they still fit
                out.write_text(lock_path(target).read_text())
            _uv_compile(uv, sources, out, python, cfg.get("environment"), cfg.get("extras", ()),
                        cfg.get("no_emit", ()))
            body = out.read_text()
            header = f"{INPUTS_TAG}{inputs_digest(target)}\n{BODY_TAG}{_sha(body)}\n"
            lock_path(target).write_text(header + body)
            print(f"wrote {lock_path(target).relative_to(ROOT)}", file=sys.stderr)


def target(cuda: bool) -> str:
    if platform.system() == "Darwin":
        return "locks/requirements-macos.txt"
    return "locks/requirements-linux-cuda.txt" if cuda else "locks/requirements-linux-cpu.txt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--uv", default=os.environ.get("UV", "uv"))
    sub.add_parser("check")
    t = sub.add_parser("target")
    t.add_argument("--cuda", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "write":
        write(args.uv)
        return 0
    if args.cmd == "target":
        print(target(args.cuda))
        return 0
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
