import pytest

from tests.support.client import Worker
from tests.support.fixtures import fixture_dir


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def llama_dir(fixtures_root):
    return fixture_dir("llama", fixtures_root)


@pytest.fixture(scope="session")
def qwen2_dir(fixtures_root):
    return fixture_dir("qwen2", fixtures_root)


@pytest.fixture(scope="session")
def gemma3_dir(fixtures_root):
    return fixture_dir("gemma3_text", fixtures_root)


@pytest.fixture(scope="session")
def gemma3_w64_dir(gemma3_dir, tmp_path_factory):
    """The Gemma 3 text fixture with a 64-token sliding window: prompts of a few hundred tokens wrap its
    rotating layers."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("gemma3-w64") / "model"
    shutil.copytree(gemma3_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def family_dirs(llama_dir, qwen2_dir, gemma3_dir):
    return {"llama": llama_dir, "qwen2": qwen2_dir, "gemma3_text": gemma3_dir}


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def w():
    """One worker process for a module's tests, each loading the model it needs (a load takes a fraction of a
    second, a new process one or two). A module with its own ``w`` fixture overrides this one."""
    worker = Worker()
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def llama_worker(llama_dir):
    """One worker with the llama fixture loaded, shared by a module's tests."""
    w = Worker()
    w.load(llama_dir)
    yield w
    w.close()


@pytest.fixture(scope="session")
def smollm2_dir():
    from model_prep.smollm2 import ensure_default_model

    return ensure_default_model()


# The files that take longest, measured (pytest --durations), go first: with `make test`'s two processes
# (pytest-xdist, --dist loadfile) a long file started last would leave one core idle at the end.
# (The test processes keep MLX's bundled reference BLAS: several in-process checks assert bit-exact equality
# between differently shaped computations, which holds there and not on OpenBLAS, whose blocking depends on shape.)
LONGEST_FIRST = ("test_real_gemma", "test_distributed", "test_batch_soak", "test_vision_qwen3", "test_vision_matrix", "test_tools",
                 "test_errors", "test_vision_gemma4", "test_real_model", "test_promises", "test_features",
                 "test_option_matrix", "test_cuda_batch", "test_conformance", "test_batching", "test_generate")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    # pytest-xdist (3.8 here) sorts --dist loadfile's files by their number of tests, most first, unless told not
    # to (--no-loadscope-reorder): LONGEST_FIRST's order was lost, and its files of few tests (test_real_gemma's 3,
    # test_batch_soak's 1) started last, leaving a core idle at the end
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
