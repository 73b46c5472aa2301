"""The floor plan of worker/ (docs/ARCHITECTURE.md): which room may import which, and no import cycles.

Read from the source with ``ast`` (nothing is imported), every import counted, the lazy ones inside functions too:
a lazy import is still a dependency, only a later one.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "worker"

# room -> the rooms it may import (besides itself). "process" is the top level: __main__, server, scheduler,
# engine, writer (it may import every room). Rooms not listed here fail the test until they are placed.
ALLOWED = {
    "protocol": set(),
    "boot": {"protocol"},
    "cuda": set(),
    "distributed": {"protocol"},
    "cache": {"protocol"},
    "prompting": {"protocol", "cache"},
    "patches": {"protocol"},
    "loading": {"protocol", "cache", "prompting", "patches", "addons"},
    "addons": {"protocol", "prompting", "loading", "patches"},
    "generation": {"protocol", "cache", "prompting", "loading", "cuda", "patches"},
    "process": {"protocol", "boot", "cuda", "cache", "prompting", "patches", "loading", "addons", "generation",
                "distributed"},
}
# Finer rules, as (importer prefix, forbidden prefix, why).
FORBIDDEN = [
    ("worker.loading", "worker.addons.", "loading reaches an add-on only through worker.addons.load_addon"),
    ("worker.", "model_prep", "model preparation is not the runtime (pip install . runs without it)"),
    ("worker.", "gguf", "gguf is model preparation's dependency, not the runtime's"),
    ("worker.generation", "worker.generation.solo", "the batch does not import the solo driver"),
]


def module_name(path: Path, root: Path = WORKER) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, level: int, name: str) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(path: Path, modules: set, root: Path = WORKER) -> set:
    """Every module ``path`` imports: ``import a.b``, ``from a import b`` (b a module when it is one), relative
    imports resolved."""
    me, is_pkg = module_name(path, root), path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(me, is_pkg, node.level, node.module or "") if node.level else node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else base)
    return found


def graph(root: Path = WORKER) -> dict:
    files = [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imports_of(p, modules, root) for p in files}


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and (WORKER / parts[1]).is_dir():
        return parts[1]
    return "process"


def violations(g: dict) -> list:
    out = []
    for mod, deps in g.items():
        mine = room(mod)
        for dep in deps:
            if dep.startswith("worker.") or dep == "worker":
                theirs = room(dep) if dep != "worker" else "process"
                if dep != "worker" and theirs != mine and theirs not in ALLOWED.get(mine, set()):
                    out.append(f"{mod} imports {dep}: room {mine!r} may not import room {theirs!r}")
            for importer, forbidden, why in FORBIDDEN:
                if mod.startswith(importer) and _hits(dep, forbidden):
                    out.append(f"{mod} imports {dep}: {why}")
    return sorted(set(out))


def _hits(dep: str, forbidden: str) -> bool:
    """``forbidden`` ending in a dot names what lies under it; else the module and what lies under it."""
    if forbidden.endswith("."):
        return dep.startswith(forbidden)
    return dep == forbidden or dep.startswith(forbidden + ".")


def cycles(g: dict) -> list:
    """Each import cycle among worker's modules once, as a list of modules (Tarjan's strongly connected parts)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    internal = {m: [d for d in deps if d in g and d != m] for m, deps in g.items()}

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in internal[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in internal:
        if v not in index:
            visit(v)
    return out


def test_every_room_is_placed():
    rooms = {room(m) for m in graph()}
    assert rooms <= set(ALLOWED), f"rooms without rules (add them to ALLOWED and docs/ARCHITECTURE.md): " \
                                  f"{sorted(rooms - set(ALLOWED))}"


def test_no_room_imports_across_the_rules():
    assert violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_process_modules_are_only_the_top_level():
    top = sorted(m for m in graph() if room(m) == "process")
    assert top == ["worker", "worker.__main__", "worker.engine", "worker.follower", "worker.scheduler", "worker.server",
                   "worker.writer"], top


@pytest.mark.parametrize("importer,line,expect", [
    ("generation/batcher.py", "from ..server import Server", "room 'generation' may not import room 'process'"),
    ("cache/store.py", "from ..prompting.prefix_tokens import common_prefix", "room 'cache' may not import"),
    ("loading/model.py", "from ..addons.gemma4 import install_inputs", "loading reaches an add-on only"),
    ("generation/batcher.py", "from .solo import run", "the batch does not import the solo driver"),
    ("protocol/messages.py", "from ..engine import Engine", "room 'protocol' may not import room 'process'"),
    ("boot/ready.py", "import gguf", "gguf is model preparation's dependency"),
])
def test_a_forbidden_import_is_caught(tmp_path, importer, line, expect):
    """The checker itself: a copy of worker/ with one forbidden import added fails the rules."""
    import shutil

    copy = tmp_path / "worker"
    shutil.copytree(WORKER, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / importer
    target.write_text(target.read_text() + f"\n{line}\n")
    found = violations(graph(copy))
    assert any(expect in v for v in found), found


def test_a_cycle_is_caught():
    g = {"worker.a": {"worker.b"}, "worker.b": {"worker.c"}, "worker.c": {"worker.a"}, "worker.d": {"worker.a"}}
    assert cycles(g) == [["worker.a", "worker.b", "worker.c"]]


def test_rooms_stay_small():
    """Modules under ~400 lines, functions under ~60 (the developers' guide)."""
    big = []
    for p in sorted(WORKER.rglob("*.py")):
        src = p.read_text()
        if src.count("\n") > 420:
            big.append(f"{p.relative_to(REPO)}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                big.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert big == []
