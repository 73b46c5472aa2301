"""worker/patches/: each workaround pinned by running the upstream library directly and asserting its bug, so
that the pin fails once upstream fixes it (its message names the module to delete). Whether each patch makes
the worker exact is checked where its family is (tests/families/, tests/process/test_kv_layouts.py)."""

import importlib
import json
import os
import pkgutil
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import worker.patches  # noqa: E402
from tests.support import reference  # noqa: E402
from tests.support.prompts import assert_varied, random_ids  # noqa: E402
from tests.support.shard_ranks import logits_of  # noqa: E402
from tests.support.vlm_fixtures import vlm_fixture_dir  # noqa: E402
from tests.support.vlm_fixtures_gemma3n import _UNSCALED, gemma3n_fixture_dir, patch_mlx_vlm  # noqa: E402
from tests.support.vlm_fixtures_gemma4 import gemma4_fixture_dir  # noqa: E402
from tests.support.vlm_fixtures_idefics3 import FAMILIES, idefics3_fixture_dir  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
PATCHES = sorted(m.name for m in pkgutil.iter_modules(worker.patches.__path__))


def fixed(bug: str, module: str) -> str:
    return f"upstream fixed {bug}: remove worker/patches/{module}.py (and its call sites)"


@pytest.mark.parametrize("name", PATCHES)
def test_each_patch_names_its_bug_and_its_pin(name):
    """The module's docstring names the library and version, and a test that exists and names the module."""
    doc = importlib.import_module(f"worker.patches.{name}").__doc__ or ""
    assert re.match(r"(mlx-lm|mlx-vlm|mlx|transformers) \d+\.\d+\.\d+", doc), f"{name}: name the upstream bug first"
    pin = re.search(r"Pinned by (tests/\S+\.py)::(test_\w+)", doc)
    assert pin, f"{name}: say which test pins it"
    source = (TESTS.parent / pin.group(1)).read_text()
    assert f"def {pin.group(2)}(" in source, pin.group(0)
    assert f'"{name}"' in source, f"{pin.group(1)} should name worker/patches/{name}.py in its failure message"


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_lm_has_no_idefics3_text_model(fixtures_root, family):
    """mlx-lm's own load refuses an idefics3 / smolvlm checkpoint (the worker loads its text model as llama)."""
    from mlx_lm.utils import load_model

    path, bug = idefics3_fixture_dir(family, fixtures_root), f"mlx-lm's missing {family} text model"
    try:
        load_model(path)
    except Exception as exc:  # noqa: BLE001 - whatever else it raises, upstream has changed
        assert str(exc) == f"Model type {family} not supported.", \
            f"{fixed(bug, 'idefics3_llama')} ({type(exc).__name__}: {exc})"
    else:
        pytest.fail(fixed(f"{bug} (it loads now)", "idefics3_llama"))


def test_mlx_lm_gemma4_kv_bits_fails_on_kv_shared_layers(fixtures_root):
    """mlx-lm's Gemma 4 with its full-attention caches quantized: the KV-shared layers run the float kernel on
    the quantized K/V and raise TypeError. With the patch the same call runs."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache
    from mlx_lm.utils import load_model

    from worker.patches import gemma4_shared_kv
    from worker.protocol import LoadOptions

    model, config = load_model(gemma4_fixture_dir(fixtures_root))
    assert model.args.text_config["num_kv_shared_layers"] > 0

    def quantized():
        return [QuantizedKVCache(group_size=32, bits=8) if type(c) is KVCache else c for c in make_prompt_cache(model)]

    ids = mx.array([[5, 6, 7, 8, 9, 10]])
    try:
        mx.eval(model(ids, cache=quantized()))
    except TypeError as exc:
        assert "scaled_dot_product_attention" in str(exc), fixed("mlx-lm's Gemma 4 kv_bits", "gemma4_shared_kv")
    else:
        pytest.fail(fixed("mlx-lm's Gemma 4 KV-shared layers with kv_bits", "gemma4_shared_kv"))
    gemma4_shared_kv.fit(model, config, LoadOptions(kv_bits=8, kv_group_size=32))
    mx.eval(model(ids, cache=quantized()))


def test_mlx_lm_speculative_cache_split_misplaces_the_draft_caches(fixtures_root):
    """mlx-lm's ``speculative_generate_step`` on Gemma 4 (its cache list shorter than its layers) with the main
    and draft caches in one list: the split at ``len(model.layers)`` hands the draft's first caches to the main
    model, so it raises or its tokens differ from plain greedy ``generate_step``. With the main cache padded as
    the patch pads it, it gives plain greedy's tokens."""
    from mlx_lm.generate import generate_step, speculative_generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from worker.patches.speculative_cache_split import pad_main_cache

    path, bug, n = gemma4_fixture_dir(fixtures_root), "mlx-lm's speculative cache split", 16
    (model, _), (draft, _) = load_model(path), load_model(path)
    assert len(make_prompt_cache(model)) < len(model.layers)
    prompt = mx.array(random_ids(40, 6))
    want = [t for t, _ in generate_step(prompt, model, max_tokens=n)]
    assert_varied(want, 3, "mlx-lm greedy Gemma 4")

    def speculate(main_cache):
        return [t for t, _, _ in speculative_generate_step(prompt, model, draft, num_draft_tokens=2, max_tokens=n,
                                                            prompt_cache=main_cache + make_prompt_cache(draft))]

    try:
        got = speculate(make_prompt_cache(model))
    except Exception:  # noqa: BLE001 - any failure is the bug
        pass
    else:
        assert got != want, fixed(bug, "speculative_cache_split")
    assert speculate(pad_main_cache(model, make_prompt_cache(model))) == want

def test_mlx_vlm_gemma3n_text_embeddings_are_unscaled(fixtures_root):
    """mlx-vlm's Gemma 3n on a text prompt differs from mlx-lm's (its text embeddings are not scaled by
    sqrt(hidden_size)); with the text positions scaled as the patch scales them, it equals mlx-lm exactly."""
    from mlx_vlm import load
    from mlx_vlm.models.gemma3n import gemma3n as G

    from worker.patches.gemma3n_text_scale import scale_text

    path = gemma3n_fixture_dir(fixtures_root)
    patch_mlx_vlm()  # the tiny tower (and the tests' scaled reference: ``_UNSCALED`` keeps mlx-vlm's own)
    model, _ = load(str(path))
    ids = mx.array(reference.chat_ids(path, [{"role": "user", "content": "What is in the picture?"}]))[None]
    want = reference.load_model(path)[0](ids)
    scaled, G.Model.get_input_embeddings = G.Model.get_input_embeddings, _UNSCALED["fn"]
    try:
        upstream = model(ids).logits  # mlx-vlm as it is
        out = model.get_input_embeddings(ids)
    finally:
        G.Model.get_input_embeddings = scaled
    assert mx.abs(upstream - want).max().item() > 0, fixed("mlx-vlm's Gemma 3n text-embedding scale",
                                                            "gemma3n_text_scale")
    emb = scale_text(out.inputs_embeds, ids, model.embed_vision.vocab_offset, model.language_model.model.hidden_size)
    got = model.language_model(inputs_embeds=emb, per_layer_inputs=out.per_layer_inputs).logits
    assert mx.abs(got - want).max().item() == 0.0


def test_mlx_lm_gemma3_text_has_no_shard():
    """mlx-lm's gemma3_text and gemma3 ``Model`` have no ``shard()`` of their own (only the patch's, if it ran)."""
    from mlx_lm.models import gemma3, gemma3_text

    from worker.patches import gemma3_text_shard

    for cls in (gemma3_text.Model, gemma3.Model):
        shard = getattr(cls, "shard", None)
        assert shard is None or shard.__module__ == gemma3_text_shard.__name__, \
            fixed(f"the missing {cls.__module__}.Model.shard", "gemma3_text_shard")


def _free_ports(n: int) -> list:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run_ring(argv: list[str], n: int, tmp_path: Path, timeout: float) -> str:
    """Run ``argv`` as ``n`` ring ranks on this machine, set up as ``mlx.launch --backend ring`` sets them up
    (``MLX_HOSTFILE``: one ``ip:port`` per rank; ``MLX_RANK``), but started here: mlx.launch's I/O relay threads
    spin ~1.3 cores while the ranks run. Their output (each rank's own file); every rank killed past ``timeout``."""
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent), MLX_HOSTFILE=str(hostfile))
    logs = [tmp_path / f"rank{r}.log" for r in range(n)]
    procs = []
    try:
        for r in range(n):
            with open(logs[r], "w") as out:
                procs.append(subprocess.Popen(argv, cwd=TESTS.parent, env={**env, "MLX_RANK": str(r)},
                                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks ran past {timeout} s:\n" + "".join(f.read_text()[-3000:] for f in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return "".join(f"--- rank {r} (exit {p.returncode})\n{logs[r].read_text()[-3000:]}" for r, p in enumerate(procs))


def test_gemma3_sharded_over_two_ranks_gives_the_unsharded_logits(tmp_path, gemma3_dir, fixtures_root):
    """gemma3_text and the Gemma 3 VLM wrapper (its text model), sharded by the patch over two ring ranks: each
    rank's logits of a random prompt beyond the sliding window (one prefill, then 3 decode steps with the model's
    own cache) equal mlx-lm's unsharded logits, and each rank holds half the heads."""
    from mlx_lm.utils import load_model

    paths = {"gemma3_text": gemma3_dir, "gemma3": vlm_fixture_dir("gemma3", fixtures_root)}
    jobs = []
    for i, (name, path) in enumerate(paths.items()):
        cfg = json.loads((path / "config.json").read_text())
        text = cfg.get("text_config") or cfg
        ids = random_ids(text["sliding_window"] + 40, 30 + i)
        jobs.append(dict(name=name, path=str(path), ids=ids, decode=3, out=str(tmp_path / name), text=text))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    log = _run_ring([sys.executable, str(TESTS / "support" / "shard_ranks.py"), str(tmp_path / "jobs.json")], 2,
                    tmp_path, timeout=120)
    for job in jobs:
        want = logits_of(load_model(Path(job["path"]))[0], job["ids"], job["decode"])
        assert_varied(want.argmax(-1).tolist(), 5, f"mlx-lm {job['name']} argmax")
        halves = [job["text"]["num_attention_heads"] // 2, job["text"]["num_key_value_heads"] // 2]
        for rank in (0, 1):
            assert Path(f"{job['out']}-rank{rank}.json").exists(), f"rank {rank} wrote nothing:\n{log}"
            got = np.load(f"{job['out']}-rank{rank}.npy")
            info = json.loads(Path(f"{job['out']}-rank{rank}.json").read_text())
            assert info["size"] == 2 and all(h == halves for h in info["heads"]), (job["name"], rank, info)
            assert got.shape == want.shape
            diff = float(np.abs(got - want).max())
            assert diff < 1e-4, f"{job['name']} rank {rank}: max |sharded - unsharded| = {diff}"


def test_gemma3_shard_refuses_heads_not_divisible_by_the_group():
    """Three ranks cannot split 4 query / 2 KV heads: a ValueError names them, before any layer is touched."""
    from mlx_lm.models import gemma3_text

    from worker.patches import gemma3_text_shard

    gemma3_text_shard.ensure()
    args = gemma3_text.ModelArgs(model_type="gemma3_text", hidden_size=64, num_hidden_layers=2,
                                 intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 vocab_size=32)
    model = gemma3_text.Model(args)

    class Three:
        def size(self):
            return 3

    with pytest.raises(ValueError, match="num_attention_heads=4, num_key_value_heads=2 not divisible by 3"):
        model.shard(Three())
    assert model.layers[0].self_attn.n_heads == 4
