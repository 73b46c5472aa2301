"""python -m bench.gpu.fetch_wheels: the locked wheels the GPU machine lacks, split into two carries.

The GPU machine has Python 3.12 on x86-64 Linux and no package index; a call to it carries at most 64 MiB
(the working tree included). This downloads, on any machine with pip, the wheels of PACKAGES pinned in
locks/requirements-linux-cuda.txt for manylinux x86-64 / CPython 3.12 (their hashes checked against the
lock), and splits them into two git-ignored folders, one per call:

    bench/gpu/wheels/part1/   every small wheel + the first half of mlx-cuda-13 (``<wheel>.part1``), SHA256SUMS
    bench/gpu/wheels/part2/   the second half (``<wheel>.part2``)

On the GPU machine, ``. bench/gpu/install.sh`` joins the halves, checks SHA256SUMS, installs everything
with ``pip install --no-deps --target bench/gpu/wheels/site`` once, and puts it on PYTHONPATH
(bench/README.md, *Running on the GPU machine*).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "locks" / "requirements-linux-cuda.txt"
WHEELS = ROOT / "bench" / "gpu" / "wheels"
PACKAGES = ("mlx", "mlx-cuda-13", "mlx-lm", "mlx-vlm", "msgspec", "llguidance")
SPLIT = "mlx-cuda-13"  # the one wheel over the limit (~86 MiB)
LIMIT = 64 * 2**20
PYTHON = "3.12"
# pip matches a manylinux tag exactly: every glibc the machine's (2.39) can run
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(17, 40)]


def locked(lock: Path, names=PACKAGES) -> dict:
    """{name: "name==version --hash=sha256:... ..."} for ``names``, markers dropped (they describe this
    machine, not the target)."""
    found, entry = {}, None
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)", line)
        if m:
            entry = m.group(1).lower() if m.group(1).lower() in names else None
            if entry:
                found[entry] = [f"{entry}=={m.group(2)}"]
        elif entry and line.strip().startswith("--hash="):
            found[entry].append(line.strip().rstrip("\\").strip())
    missing = set(names) - set(found)
    if missing:
        raise SystemExit(f"not in {lock}: {', '.join(sorted(missing))}")
    return {k: " ".join(v) for k, v in found.items()}


def download(reqs: dict, dest: Path) -> list:
    """pip download of the pinned wheels (hashes required) for the GPU machine's platform."""
    req_file = dest / "requirements.txt"
    req_file.write_text("\n".join(reqs.values()) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--python-version", PYTHON, "--implementation", "cp", "-d", str(dest), "-r", str(req_file)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split(wheels: list, out: Path) -> tuple:
    """Move the wheels into out/part1 and out/part2, the big one cut in two; returns both folders."""
    p1, p2 = out / "part1", out / "part2"
    for d in (p1, p2):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    sums = []
    for whl in wheels:
        if whl.name.lower().startswith(SPLIT.replace("-", "_") + "-"):
            data = whl.read_bytes()
            half = (len(data) + 1) // 2
            (p1 / f"{whl.name}.part1").write_bytes(data[:half])
            (p2 / f"{whl.name}.part2").write_bytes(data[half:])
            sums.append(f"{sha256(whl)}  {whl.name}")  # joined beside the parts by install.sh
        else:
            shutil.copy2(whl, p1 / whl.name)
            sums.append(f"{sha256(whl)}  part1/{whl.name}")
    (p1 / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return p1, p2


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lock", type=Path, default=LOCK)
    ap.add_argument("--out", type=Path, default=WHEELS, help="default: bench/gpu/wheels (git-ignored)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.out) as tmp:
        wheels = download(locked(a.lock), Path(tmp))
        p1, p2 = split(wheels, a.out)
    for d in (p1, p2):
        mib = size(d) / 2**20
        print(f"{d.relative_to(ROOT) if d.is_relative_to(ROOT) else d}: {mib:.1f} MiB"
              + ("  (over the 64 MiB of one call!)" if size(d) >= LIMIT else ""))
    print("carry each folder in its own call (with the working tree, under 64 MiB); bench/README.md says how")
    return 0


if __name__ == "__main__":
    sys.exit(main())
