"""bench/ by purpose (bench/README.md): no import cycle, no numbered files, the worker reached only through its
process and a few public modules, no one machine's folders in the code, and every bench path or module the
docs cite exists. Read from the source (``ast``, text); nothing is imported, no MLX."""

import re
from pathlib import Path

from tests.unit.test_architecture import cycles, imports_of, module_name

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
SKIP = ("results", "wheels", "__pycache__")  # measured data and carried wheels, not code
# what bench may import of the worker: the wire types, the process's engine and writer, the BLAS report, the
# model loader; never a room whose files move (generation/, cuda/, cache/, prompting/...)
PUBLIC = ("worker.protocol", "worker.engine", "worker.writer", "worker.boot.blas", "worker.loading.model")
MACHINE_PATH = re.compile(r"/root\b|/tmp/|/home/|/Users/|/opt/|/mnt/")
DOCS = ("bench/README.md", "README.md", "RELIABILITY.md", "PROTOCOL.md")


def code_files(exts=(".py", ".sh")):
    return [p for p in BENCH.rglob("*") if p.suffix in exts and not set(SKIP) & set(p.relative_to(BENCH).parts)]


def bench_graph() -> dict:
    files = code_files((".py",))
    modules = {module_name(p, BENCH) for p in files}
    return {module_name(p, BENCH): imports_of(p, modules, BENCH) for p in files}


def test_no_import_cycle():
    assert cycles(bench_graph()) == []


def test_no_numbered_files():
    numbered = [str(p.relative_to(REPO)) for p in code_files() if re.search(r"\d$", p.stem)]
    assert numbered == [], "name a module for what it measures, not its order"


def test_worker_only_through_public_modules():
    bad = sorted(f"{mod} imports {dep}" for mod, deps in bench_graph().items() for dep in deps
                 if (dep == "worker" or dep.startswith("worker.")) and not dep.startswith(PUBLIC))
    assert bad == [], "bench uses the worker's process and protocol (or " + ", ".join(PUBLIC) + ")"


def test_no_machine_folders():
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in code_files()
             for i, line in enumerate(p.read_text().splitlines(), 1) if MACHINE_PATH.search(line)]
    assert found == [], "models go in bench.common.models_dir() ($MLX_WORKER_MODELS), scratch in bench/results/tmp"


def _expand(path: str) -> list:
    """``results/x.{json,log}`` -> both; a trailing sentence dot dropped."""
    path = path.rstrip(".")
    m = re.match(r"(.*)\{([\w,]+)\}(.*)", path)
    return [m.group(1) + alt + m.group(3) for alt in m.group(2).split(",")] if m else [path]


def _module_exists(name: str) -> bool:
    base = REPO / Path(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__main__.py").exists()


def cited(text: str, where: Path) -> list:
    """Every bench file path and ``python -m bench...`` module in ``text`` that does not exist."""
    missing = []
    for m in re.finditer(r"(?<![\w:/.-])bench/[\w/.-]+\.(?:py|sh|md|json|log|png)(?:\{[\w,]+\})?", text):
        missing += [p for p in _expand(m.group(0)) if not (REPO / p).exists()]
    if where == BENCH:  # bench/README.md names its files relative to bench/
        for m in re.finditer(r"(?<![\w/.-])(?:results|cpu|gpu|probes|reliability)/[\w/.-]+\.(?:py|sh|md|json|log|png)"
                             r"(?:\{[\w,]+\})?", text):
            missing += [p for p in _expand(m.group(0)) if not (BENCH / p).exists()]
    for m in re.finditer(r"python3? -m (bench(?:\.\w+)*)", text):
        if not _module_exists(m.group(1)):
            missing.append(m.group(1))
    return missing


def test_cited_paths_and_modules_exist():
    missing = {doc: cited((REPO / doc).read_text(), (REPO / doc).parent) for doc in DOCS}
    assert {k: v for k, v in missing.items() if v} == {}


def test_every_probe_is_cited():
    readme = (BENCH / "README.md").read_text()
    uncited = [p.name for p in (BENCH / "probes").glob("*.py") if p.name != "__init__.py"
               and f"probes/{p.name}" not in readme]
    assert uncited == [], "a probe bench/README.md does not cite is deleted (its figures stay in the README)"
