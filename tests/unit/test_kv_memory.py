"""The KV memory ledger (worker/generation/memory.py): its arithmetic, and its measured layouts against the bytes
mlx-lm's own caches hold once filled (full attention, kv_bits, a sliding window)."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, make_prompt_cache

from tests.support import reference as ref
from tests.support.fixtures import fixture_dir
from worker.generation.memory import Layout, Ledger, measure
from worker.protocol import KvMemory, WorkerError

KIB = 1024


def test_a_layout_counts_allocation_steps_windows_and_fixed_state():
    lay = Layout(per_token=2 * KIB, windows=((KIB, 600),), fixed=100)
    assert lay.nbytes(1) == 256 * 2 * KIB + 256 * KIB + 100  # layers allocate 256 tokens at a time
    assert lay.nbytes(300) == 555 * 2 * KIB + 555 * KIB + 100  # (from wherever a prefill chunk ended)
    assert lay.nbytes(5000) == 5255 * 2 * KIB + 600 * KIB + 100  # the window stops growing
    assert Layout(per_token=1, exact=4, exact_until=256).nbytes(1000) == 1255 + 4 * 256


def _kib(tokens):  # per_token=KIB: the bytes of one row of ``tokens``
    return (tokens + 255) * KIB


def test_rows_held_together_count_at_the_longest_size():
    led = Ledger(Layout(per_token=KIB), ceiling=2000 * KIB)
    assert led.figures == KvMemory(ceiling=2000 * KIB, reserved=0, free=2000 * KIB)
    led.reserve("long", 600)
    assert led.figures.reserved == _kib(600) and led.figures.free == 2000 * KIB - _kib(600)
    assert led.fits(1) and not led.fits(800)  # 2 rows of 855 tokens fit, of 1055 not
    led.reserve("a", 10)
    assert not led.fits(1)  # alone 256 tokens, but padded to the long row: 3 x 855
    led.release("long")
    led.reserve("b", 200)
    assert led.figures.reserved == 2 * _kib(200)
    assert led.fits(300) and not led.fits(500)  # 3 rows of 555 fit; of 755 not
    led.release("a")
    led.release("a")  # twice: nothing
    assert led.figures.reserved == _kib(200)
    led.clear()
    assert led.figures.reserved == 0 and led.fits(1745) and not led.fits(1746)


def test_the_draft_model_adds_its_own_rows():
    led = Ledger(Layout(per_token=KIB), ceiling=10 ** 9, draft=Layout(per_token=100))
    assert led.need(10, draft=True) == _kib(10) + 265 * 100
    led.reserve("a", 10, draft=True)
    led.reserve("b", 300)
    assert led.figures.reserved == 2 * _kib(300) + 265 * 100


def test_a_request_that_cannot_fit_alone_is_refused_with_the_figures_and_the_ways_out():
    led = Ledger(Layout(per_token=KIB), ceiling=_kib(256), chosen=True)
    led.check(6, 250)  # exactly the ceiling
    with pytest.raises(WorkerError) as err:
        led.check(6, 251)
    assert err.value.code == "out_of_memory"
    msg = err.value.message
    assert "512.00 KiB" in msg and "511.00 KiB" in msg and "6 prompt tokens + 251" in msg, msg
    assert "max_tokens" in msg and "options.kv_memory" in msg and "kv_bits" in msg, msg


@pytest.fixture(scope="module")
def dirs(fixtures_root):
    return {f: fixture_dir(f, fixtures_root) for f in ("llama", "gemma3_text")}


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_measured_layout_holds_what_mlx_lm_allocates(dirs, family):
    """Filled by mlx-lm's own prefill in 512-token chunks, a cache holds at most what the layout says (less than
    one allocation step less where no layer is a window); quantized (its full-attention layers, as generate_step
    does), likewise."""
    model, _ = ref.load_model(dirs[family])
    layout = measure(model, make_prompt_cache(model), chunk=512)
    quantized = {bits: measure(model, make_prompt_cache(model), kv_bits=bits, kv_group_size=32, chunk=512)
                 for bits in (4, 8)}
    cache, n = make_prompt_cache(model), 0
    for size in (3, 509, 88):  # 3, 512 (a window full), 600 tokens (past it)
        model(mx.array([list(range(5, 5 + size))]), cache=cache)
        mx.eval([c.state for c in cache])
        n += size
        for bits, lay in ((None, layout), *quantized.items()):
            held = sum((c.to_quantized(32, bits) if bits and type(c) is KVCache else c).nbytes for c in cache)
            assert held <= lay.nbytes(n), (bits, n, held, lay)
            if not lay.windows:  # within one allocation step
                assert lay.nbytes(n) - held < 256 * lay.per_token, (bits, n, held, lay)
    assert quantized[4].per_token < layout.per_token / 3 and quantized[8].per_token < layout.per_token / 1.7
