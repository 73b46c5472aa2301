"""Prompt-cache entries on disk, so a restarted worker resumes a conversation without re-prefilling.

Layout: ``<cache_dir>/<model id>/<layout id>/<entry>.safetensors`` (mlx-lm's prompt-cache format)
plus ``<entry>.json`` (the tokens it holds), written last and atomically. The model id hashes
config.json and the safetensors headers; the layout id hashes what changes the KV arrays (compute
dtype, max_kv_size). Anything unreadable, alien or inconsistent is skipped with a logged reason.
"""

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import List, Optional

from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from .store import Entry, cache_len

log = logging.getLogger("worker")

FORMAT = 1


def model_identity(model_path: Path) -> str:
    h = hashlib.sha256()
    h.update((model_path / "config.json").read_bytes())
    for f in sorted(model_path.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                h.update(fh.read(min(n, 100 << 20)))
    return h.hexdigest()[:24]


def layout_identity(**layout) -> str:
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


class DiskCache:
    def __init__(self, root: Path, model_id: str, layout_id: str, n_layers: int,
                 max_bytes: int = 8 << 30):
        self.model_dir = Path(root).expanduser() / model_id
        self.dir = self.model_dir / layout_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model_id, self.layout_id, self.n_layers = model_id, layout_id, n_layers
        self.max_bytes = max_bytes
        self.entries: List[Entry] = []
        self.unreadable: List[List[int]] = []  # token lists of our own entries found broken (and removed)

    def index(self) -> List[Entry]:
        """Entries found on disk (arrays not loaded yet)."""
        found = []
        for meta_file in sorted(self.dir.glob("*.json")):
            data_file = meta_file.with_suffix(".safetensors")
            try:
                meta = json.loads(meta_file.read_text(encoding="utf-8"))
                ok = (meta.get("format") == FORMAT and meta.get("model_id") == self.model_id
                      and meta.get("layout_id") == self.layout_id
                      and isinstance(meta.get("tokens"), list) and data_file.is_file()
                      and data_file.stat().st_size == meta.get("file_bytes"))
            except (OSError, ValueError, AttributeError) as exc:  # AttributeError: JSON but not an object
                log.warning("prompt cache: ignoring %s: unreadable (%s)", meta_file.name, exc)
                continue
            if not ok:
                ours = (isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("model_id") == self.model_id
                        and meta.get("layout_id") == self.layout_id and isinstance(meta.get("tokens"), list))
                if ours:  # our entry, but its data is missing or truncated: remove it, remember its tokens
                    log.warning("prompt cache: removing %s: its data file is missing or truncated", meta_file.name)
                    self.unreadable.append(meta["tokens"])
                    for f in (meta_file, data_file):
                        f.unlink(missing_ok=True)
                else:
                    log.warning("prompt cache: ignoring %s: another model or layout", meta_file.name)
                continue
            e = Entry(meta["tokens"], None, int(meta.get("nbytes", 0)), meta.get("key"),
                      disk_name=data_file.stem)
            e.used = data_file.stat().st_mtime - 1e10  # older than anything made in this process
            found.append(e)
        self.entries = found
        if found:
            log.info("prompt cache: %d entries on disk in %s", len(found), self.dir)
        return list(found)

    def load(self, entry: Entry) -> Optional[list]:
        path = self.dir / f"{entry.disk_name}.safetensors"
        try:
            cache = load_prompt_cache(str(path))
        except Exception as exc:  # corrupt or truncated: never crash, just recompute
            log.warning("prompt cache: ignoring %s: cannot load it (%s)", path.name, exc)
            self.remove(entry)
            return None
        if len(cache) != self.n_layers or cache_len(cache) != len(entry.tokens):
            log.warning("prompt cache: ignoring %s: it does not fit this model", path.name)
            self.remove(entry)
            return None
        return cache

    def save(self, entry: Entry) -> None:
        name = hashlib.sha256(json.dumps(entry.tokens).encode()).hexdigest()[:24]
        data, meta = self.dir / f"{name}.safetensors", self.dir / f"{name}.json"
        tmp = self.dir / f".{name}.{os.getpid()}.tmp.safetensors"
        try:
            save_prompt_cache(str(tmp), entry.cache)
            size = tmp.stat().st_size
            os.replace(tmp, data)
            info = {"format": FORMAT, "model_id": self.model_id, "layout_id": self.layout_id,
                    "tokens": entry.tokens, "key": entry.key, "nbytes": entry.nbytes,
                    "file_bytes": size}
            tmp_meta = meta.with_suffix(".json.tmp")
            tmp_meta.write_text(json.dumps(info), encoding="utf-8")
            os.replace(tmp_meta, meta)
        except OSError as exc:
            log.warning("prompt cache: could not save to %s (%s)", self.dir, exc)
            tmp.unlink(missing_ok=True)
            return
        entry.disk_name = name
        self.entries.append(entry)

    def remove(self, entry: Entry) -> None:
        for suffix in (".json", ".safetensors"):
            (self.dir / f"{entry.disk_name}{suffix}").unlink(missing_ok=True)
        if entry in self.entries:
            self.entries.remove(entry)
        entry.disk_name = None

    def enforce_budget(self, agreed=lambda sizes: sizes) -> List[Entry]:
        """Delete the oldest files beyond the disk budget; returns the entries removed. ``agreed``: the sizes
        every rank decides on (rank 0's)."""
        removed = []

        def file_size(e):
            p = self.dir / f"{e.disk_name}.safetensors"
            return p.stat().st_size if p.exists() else 0

        sizes = dict(zip([id(e) for e in self.entries], agreed([file_size(e) for e in self.entries])))
        while self.entries and sum(sizes[id(e)] for e in self.entries) > self.max_bytes:
            victim = min(self.entries, key=lambda e: e.used)
            self.remove(victim)
            removed.append(victim)
        return removed

    def clear(self) -> None:
        for e in list(self.entries):
            self.remove(e)

    def other_layouts(self) -> bool:
        return any(p.is_dir() and p.name != self.layout_id and any(p.glob("*.json"))
                   for p in self.model_dir.iterdir())
