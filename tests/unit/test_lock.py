"""The lock files: fresh against pyproject.toml, never edited by hand, and what this environment holds."""

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "locks"


def _check(root: Path):
    return subprocess.run([sys.executable, str(root / "locks" / "lock.py"), "check"],
                          capture_output=True, text=True)


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(LOCKS, tmp_path / "locks")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def pins(lock: Path):
    """{name: version} of the requirements in a lock that apply to this interpreter and platform."""
    out = {}
    for line in lock.read_text().splitlines():
        if not re.match(r"[A-Za-z0-9]", line):
            continue
        req = Requirement(line.rstrip(" \\"))
        if req.marker is None or req.marker.evaluate():
            out[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    return out


def test_locks_are_fresh():
    proc = _check(ROOT)
    assert proc.returncode == 0, proc.stderr


def test_a_hand_edited_pin_fails_the_check(tmp_path):
    root = _copy(tmp_path)
    lock = root / "locks" / "requirements-linux-cpu.txt"
    text = lock.read_text()
    edited = re.sub(r"^msgspec==[0-9.]+", "msgspec==0.19.0", text, count=1, flags=re.M)
    assert edited != text
    lock.write_text(edited)
    proc = _check(root)
    assert proc.returncode == 1
    assert "locks/requirements-linux-cpu.txt" in proc.stderr and "make lock" in proc.stderr, proc.stderr


def test_a_changed_dependency_fails_the_check(tmp_path):
    root = _copy(tmp_path)
    project = root / "pyproject.toml"
    text = project.read_text()
    project.write_text(text.replace('"pillow>=10"', '"pillow>=11"'))
    assert project.read_text() != text
    proc = _check(root)
    assert proc.returncode == 1
    assert "pyproject.toml" in proc.stderr and "make lock" in proc.stderr, proc.stderr
    assert proc.stderr.count("make lock") == 3  # every platform's lock, not the tools lock


def test_every_direct_dependency_is_satisfied_by_each_lock():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [Requirement(r) for r in project["dependencies"]]
    for extra in ("test", "bench"):
        direct += [Requirement(r) for r in project["optional-dependencies"][extra]]
    for lock, platform in (("linux-cpu", "linux"), ("linux-cuda", "linux"), ("macos", "darwin")):
        env = {"sys_platform": platform, "platform_system": platform.capitalize()}
        locked = {}
        for line in (LOCKS / f"requirements-{lock}.txt").read_text().splitlines():
            if re.match(r"[A-Za-z0-9]", line):
                req = Requirement(line.rstrip(" \\"))
                if req.marker is None or req.marker.evaluate(env):
                    locked[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
        for req in direct:
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            assert name in locked, f"{lock}: {name} missing"
            assert req.specifier.contains(locked[name], prereleases=True), (lock, name, locked[name])
    assert "mlx-cpu" not in (LOCKS / "requirements-linux-cuda.txt").read_text()  # it would overwrite libmlx


def test_this_environment_is_exactly_the_lock():
    """What `make setup` installed: every pin at its version, and nothing the lock does not name."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    installed.pop("mlx-worker", None)
    cmd = [sys.executable, str(LOCKS / "lock.py"), "target"] + (["--cuda"] if "mlx-cuda-13" in installed else [])
    target = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    wanted = pins(ROOT / target)
    mismatched = {n: (v, installed.get(n)) for n, v in wanted.items() if installed.get(n) != v}
    assert not mismatched, f"installed versions differ from {target} (run make setup): {mismatched}"
    extra = sorted(set(installed) - set(wanted))
    assert not extra, f"installed but not in {target}: {extra}"
