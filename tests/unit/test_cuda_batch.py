"""worker/cuda/batch_kernels.py off CUDA: when its kernels apply, that the model is untouched where they do not, and
the kernels' own arithmetic: their CUDA sources compile for sm_90 (nvcc) and, run by tests/support/cuda_emulator.py
on the CPU, compute what MLX computes. On a GPU the batch-step probe checked them (bench/README.md)."""

import mlx.core as mx
import pytest

from worker.cuda import batch_kernels as cuda_batch

from worker.cuda import kernels as cuda_kernels


def _qkv(B=3, Hq=4, Hk=2, L=10, D=64):
    q = mx.zeros((B, Hq, 1, D))
    k = mx.zeros((B, Hk, L, D))
    mask = mx.ones((B, 1, 1, L), dtype=mx.bool_)
    return q, k, mask


def test_attention_kernel_takes_one_token_rows_with_a_boolean_mask():
    q, k, mask = _qkv()
    assert cuda_batch.fits(q, k, mask)
    assert not cuda_batch.fits(q, k, None)  # no mask: MLX's own fused kernel
    assert not cuda_batch.fits(q, k, "causal")
    assert not cuda_batch.fits(q, k, mask.astype(mx.float32))  # additive masks: MLX's
    assert not cuda_batch.fits(mx.zeros((3, 4, 2, 64)), k, mask)  # two queries a row (prefill)
    assert not cuda_batch.fits(*_qkv(B=1)[:2], _qkv(B=1)[2])  # one row: never masked
    assert not cuda_batch.fits(*_qkv(D=48))  # head size not a multiple of 32
    assert not cuda_batch.fits(*_qkv(D=512))
    assert not cuda_batch.fits(*_qkv(D=256))  # Gemma 3: MLX's own kernel computes rows as alone
    assert cuda_batch.fits(*_qkv(D=96)) and cuda_batch.fits(*_qkv(D=128))
    q, k, mask = _qkv()
    assert not cuda_batch.fits(q, k.astype(mx.float16), mask)  # keys of another type than the queries
    q, k, mask = _qkv(Hq=3, Hk=2)
    assert not cuda_batch.fits(q, k, mask)  # query heads not a multiple of KV heads
    q, k, _ = _qkv()
    assert not cuda_batch.fits(q, k, mx.ones((3, 1, 1, 9), dtype=mx.bool_))  # mask length differs


def _linear(n, k=2048, bits=4, dtype=mx.float16, group_size=64):
    import mlx.nn as nn

    m = nn.QuantizedLinear(k, n, bias=False, group_size=group_size, bits=bits)
    m.set_dtype(dtype)
    return m


def test_the_matrices_the_kernels_take():
    """4-bit affine matrices of K a multiple of 256 with fp16/bf16 scales; 8-bit, fp32 and other K are MLX's."""
    assert cuda_batch._matrix(_linear(4096)) is not None
    assert cuda_batch._matrix(_linear(4096, dtype=mx.bfloat16)) is not None
    assert cuda_batch._matrix(_linear(4096, bits=8)) is None
    assert cuda_batch._matrix(_linear(4096, dtype=mx.float32)) is None
    assert cuda_batch._matrix(_linear(4096, k=320)) is None
    assert cuda_batch._matrix(_linear(4096, group_size=32)) is not None
    import mlx.nn as nn
    assert cuda_batch._matrix(nn.Linear(256, 256)) is None and cuda_batch._matrix(None) is None


def test_the_rows_policy():
    """Each step's rows pick the smallest matrix rows_qmv computes: None for one row and past 8 rows."""
    assert cuda_batch.qmv_least(1) is None and cuda_batch.qmv_least(9) is None
    least = [cuda_batch.qmv_least(r) for r in range(2, 9)]
    assert all(n is not None for n in least) and least == sorted(least, reverse=True)
    assert cuda_batch._policy("2:100,6:5", None) == {2: 100, 6: 5}
    assert cuda_batch._policy("", {2: 1}) == {2: 1}


def test_no_kernels_off_cuda_and_the_model_is_unchanged(monkeypatch):
    """Off CUDA batch_kernels is None; installed, the attention wrapper is mlx-lm's function while inactive."""
    from mlx_lm.models import base, llama

    assert cuda_batch.batch_kernels(object()) is None
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64)
    mx.random.seed(0)
    model = llama.Model(args)
    ids = mx.array([[1, 2, 3, 4]])
    before = model(ids)
    monkeypatch.setattr(llama, "scaled_dot_product_attention", base.scaled_dot_product_attention)
    monkeypatch.setattr(cuda_batch, "_installed", set())
    cuda_batch._install(model)
    wrapper = llama.scaled_dot_product_attention
    assert wrapper is not base.scaled_dot_product_attention
    assert wrapper.worker_original is base.scaled_dot_product_attention
    cuda_batch._install(model)  # once per module
    assert llama.scaled_dot_product_attention is wrapper
    assert mx.array_equal(model(ids), before)


_CACHES = ("_kernel", "_qmv", "_parts", "_swiglu", "_attn_args", "_qmv_args", "_parts_args", "_swiglu_args")


def _fresh_kernels(monkeypatch, factory):
    """mx.fast.cuda_kernel replaced by ``factory`` and every kernel and argument cache emptied."""
    monkeypatch.setattr(cuda_batch, "available", lambda: True)
    monkeypatch.setattr(mx.fast, "cuda_kernel", factory)
    for name in _CACHES:
        monkeypatch.setattr(cuda_kernels, name, {} if name.endswith("args") or name == "_parts" else None)
    monkeypatch.setattr(cuda_batch, "_installed", set())


def _mlx_kernels(calls):
    """A stand-in for ``mx.fast.cuda_kernel`` whose kernels MLX computes as the model would (exactly its
    ops: quantized_matmul, swiglu, SDPA), recording each launch's kernel name."""
    from mlx_lm.models.activations import swiglu

    def factory(name, input_names, output_names, source, header="", **_):
        def call(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
            calls.append(name.rsplit("_", 1)[0])  # less the source's hash
            gs = dict(template).get("GS")
            qmm = [cuda_batch._QMM(inputs[0], *inputs[i:i + 3], transpose=True, group_size=gs, bits=4)
                   for i in range(1, len(inputs) - 2, 3)] if gs else None
            if calls[-1] == "worker_rows_qmv_swiglu":
                return [swiglu(*qmm)]
            if calls[-1].startswith("worker_rows_qmv"):
                return qmm
            q, k, v, mask, scale = inputs
            return [mx.fast.scaled_dot_product_attention(q, k, v, scale=scale.item(), mask=mask)]
        return call
    return factory


def test_a_step_patches_quantized_matmul_by_its_rows(monkeypatch):
    """The per-step context: attention active inside it only; quantized_matmul swapped only for a step of
    2-8 rows, with that size's table; everything restored after, also when the step raises."""
    import mlx.nn as nn

    _fresh_kernels(monkeypatch, _mlx_kernels([]))
    installed = []
    monkeypatch.setattr(cuda_batch, "_install", installed.append)
    model = nn.Module()
    model.big, model.small = _linear(4096), _linear(1024)  # 8M and 2M weights
    kernels = cuda_batch.batch_kernels(model)
    assert installed == [model]  # once, when made: not per step
    original = mx.quantized_matmul
    with kernels(1):
        assert cuda_batch._active.on and mx.quantized_matmul is original
    for rows in (2, 5, 8):
        with kernels(rows):
            assert mx.quantized_matmul is cuda_batch.rows_qmm
            table = cuda_batch._active.qmv
            assert id(model.big["weight"]) in table and id(model.small["weight"]) not in table
            assert table[id(model.big["weight"])][2] == (rows, 1, 2048)
    with kernels(9):
        assert mx.quantized_matmul is original
    assert installed == [model]
    with pytest.raises(RuntimeError):
        with kernels(8):
            raise RuntimeError("step failed")
    assert mx.quantized_matmul is original and not cuda_batch._active.on and cuda_batch._active.qmv == {}
    assert nn.QuantizedLinear.__call__ is cuda_batch._LINEAR
    assert cuda_batch.batch_kernels(model, attention=False, matmul=False) is None


def test_a_matrix_of_the_table_takes_the_kernel_only_for_the_step_s_rows(monkeypatch):
    """In a step of 2 rows: the big matrix's call of 2 rows is rows_qmv; other rows, another matrix
    (below the policy), or other scales than its own are MLX's, and every result is MLX's exactly."""
    import mlx.nn as nn

    calls = []
    _fresh_kernels(monkeypatch, _mlx_kernels(calls))
    model = nn.Module()
    model.big, model.small = _linear(4096), _linear(1024)
    x2, x3 = (mx.random.normal((n, 1, 2048), key=mx.random.key(n)).astype(mx.float16) for n in (2, 3))
    ref = [model.big(x2), model.big(x3), model.small(x2)]
    with cuda_batch.batch_kernels(model, attention=False)(2):
        got = [model.big(x2), model.big(x3), model.small(x2)]
        w = model.big
        other = mx.quantized_matmul(x2, w["weight"], w["scales"] * 1, w["biases"], transpose=True,
                                    group_size=64, bits=4)
    assert calls == ["worker_rows_qmv"]
    assert all(mx.array_equal(g, r) for g, r in zip(got, ref)) and mx.array_equal(other, ref[0])


def test_kernel_names_carry_their_source_s_hash():
    """MLX caches compiled kernels on disk by name: an edited source gets a new name, never an old build."""
    from worker.cuda.kernels import _named

    a, b = _named("worker_rows_qmv", "x"), _named("worker_rows_qmv", "y")
    assert a != b and a.startswith("worker_rows_qmv_") and a == _named("worker_rows_qmv", "x")


def test_the_swiglu_mlps_are_mlx_lm_s_of_that_pattern():
    """llama's and qwen2's MLP (one __call__ bytecode) are fused; Gemma 3's (gelu) and a lookalike are not."""
    import mlx.nn as nn
    from mlx_lm.models import gemma3_text, llama, qwen2  # noqa: F401

    classes = cuda_batch._swiglu_classes()
    assert llama.MLP in classes and qwen2.MLP in classes
    assert gemma3_text.MLP not in classes

    class Lookalike(nn.Module):  # not an mlx-lm module, and another computation
        def __call__(self, x):
            return self.down_proj(self.gate_proj(x) * self.up_proj(x))

    assert Lookalike not in classes


FAMILIES = ["llama", "qwen2", "gemma3_text"]


def _tiny(family, dtype=mx.float16):
    """A 2-layer 4-bit model of ``family`` (Gemma 3: a 6-token window on every other layer)."""
    import importlib

    import mlx.nn as nn

    arch = importlib.import_module(f"mlx_lm.models.{family}")
    extra = {"qwen2": {"tie_word_embeddings": False},
             "gemma3_text": {"head_dim": 64, "sliding_window": 6, "sliding_window_pattern": 2}}.get(family, {})
    args = arch.ModelArgs(model_type=family, hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96,
                          rope_theta=10000.0, **extra)
    mx.random.seed(1)
    model = arch.Model(args)
    nn.quantize(model, group_size=64, bits=4)
    model.set_dtype(dtype)
    return arch, model


def _batch(model):
    """Three prefilled sequences (3, 6 and 9 tokens: past Gemma's window) merged into batch caches."""
    from mlx_lm.models import cache as C

    caches = []
    for i in range(3):
        c = C.make_prompt_cache(model)
        model(mx.array([list(range(1, 4 + 3 * i))]), cache=c)
        caches.append(c)
    return [layer.merge([cs[i] for cs in caches]) for i, layer in enumerate(caches[0])]


# per layer with every matrix through the kernels: q/k/v, o, then the MLP (swiglu in one: llama, qwen2)
_LAUNCHES = {"llama": ["worker_rows_qmv3", "worker_rows_qmv", "worker_rows_qmv_swiglu", "worker_rows_qmv"],
             "qwen2": ["worker_rows_qmv3", "worker_rows_qmv", "worker_rows_qmv_swiglu", "worker_rows_qmv"],
             "gemma3_text": ["worker_rows_qmv3", "worker_rows_qmv"] + ["worker_rows_qmv"] * 3}


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_batched_step_s_routing_gives_the_model_s_logits(monkeypatch, family, fuse):
    """A batched step with every matrix routed to the kernels (each computed by MLX's own ops here) gives
    MLX's logits exactly, on llama, qwen2 (biased q/k/v) and Gemma 3 (gelu MLP, rotating caches past the
    window), with the launches expected per layer; the model's own modules outside the step."""
    import mlx.nn as nn

    arch, model = _tiny(family)
    calls = []
    _fresh_kernels(monkeypatch, _mlx_kernels(calls))
    monkeypatch.setattr(cuda_batch, "QMV_LEAST", {2: 0})  # every matrix, however small
    y = mx.array([[5], [6], [7]])
    ref = model(y, cache=_batch(model))
    mlp_call = arch.MLP.__call__
    kernels = cuda_batch.batch_kernels(model, attention=False, fuse=fuse)
    with kernels(3):
        got = model(y, cache=_batch(model))
    per_layer = _LAUNCHES[family] if fuse else ["worker_rows_qmv"] * 7
    assert calls == per_layer * 2 + ["worker_rows_qmv"], calls  # + the head
    assert mx.array_equal(got, ref)
    assert nn.QuantizedLinear.__call__ is cuda_batch._LINEAR and arch.MLP.__call__ is mlp_call
    with pytest.raises(RuntimeError):
        with kernels(3):
            raise RuntimeError("step failed")
    assert nn.QuantizedLinear.__call__ is cuda_batch._LINEAR and cuda_batch._active.stash is None
    assert arch.MLP.__call__ is mlp_call


def test_an_mlp_the_step_does_not_fuse_runs_as_mlx_lm_wrote_it(monkeypatch):
    """Inside a step the swiglu class is patched: an instance of it (or of a subclass) that is not in the
    step's table, e.g. not quantized, computes mlx-lm's MLP exactly."""
    import mlx.nn as nn
    from mlx_lm.models import llama

    class Sub(llama.MLP):
        pass

    args = llama.ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=1, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64)
    model = nn.Module()
    model.fused, model.plain, model.sub = llama.MLP(args), llama.MLP(args), Sub(args)
    nn.quantize(model.fused, group_size=64, bits=4)
    model.set_dtype(mx.float16)
    calls = []
    _fresh_kernels(monkeypatch, _mlx_kernels(calls))
    x = mx.random.normal((2, 1, 256), key=mx.random.key(3)).astype(mx.float16)
    ref = [model.fused(x), model.plain(x), model.sub(x)]
    with cuda_batch.batch_kernels(model, attention=False)(2):
        assert llama.MLP.__call__ is cuda_batch._mlp
        got = [model.fused(x), model.plain(x), model.sub(x)]
    assert calls[0] == "worker_rows_qmv_swiglu" and calls.count("worker_rows_qmv_swiglu") == 1
    assert all(mx.array_equal(g, r) for g, r in zip(got, ref))
    assert llama.MLP.__call__ is not cuda_batch._mlp


def test_a_fused_member_that_sees_another_input_is_computed_alone(monkeypatch):
    """k or v called on another array than q was (not the layers' pattern): MLX computes it, exactly."""
    import mlx.nn as nn

    calls = []
    _fresh_kernels(monkeypatch, _mlx_kernels(calls))
    layer = nn.Module()
    layer.q_proj, layer.k_proj, layer.v_proj = (nn.QuantizedLinear(256, n, bias=b, group_size=64, bits=4)
                                                for n, b in ((256, False), (128, True), (128, False)))
    layer.set_dtype(mx.float16)
    x, other = (mx.random.normal((2, 1, 256), key=mx.random.key(k)).astype(mx.float16) for k in (0, 1))
    ref = [layer.q_proj(x), layer.k_proj(other), layer.v_proj(x)]
    with cuda_batch.batch_kernels(layer, attention=False, fuse=True)(2):
        got = [layer.q_proj(x), layer.k_proj(other), layer.v_proj(x)]
    assert calls == ["worker_rows_qmv3"]  # q's launch computed all three; k saw another input, v took its part
    assert all(mx.array_equal(g, r) for g, r in zip(got, ref))


def _mlx_style(name, source, header, inputs, outputs, template):
    """The CUDA source MLX's ``mx.fast.cuda_kernel`` builds (mlx/backend/cuda/custom_kernel.cpp):
    inputs then outputs as pointers, ``*_shape`` / ``*_strides`` where the source names them, the
    template arguments as constexpr locals; Shape / Strides stand in for MLX's device utils."""
    params = []
    for n, t in inputs:
        params.append(f"const {t}* {n}")
        params += [f"const __grid_constant__ Shape {n}_shape"] * (f"{n}_shape" in source)
        params += [f"const __grid_constant__ Strides {n}_strides"] * (f"{n}_strides" in source)
    params += [f"{t}* {n}" for n, t in outputs]
    consts = "".join(f"  using {k} = {v};\n" if isinstance(v, str) else f"  constexpr int {k} = {v};\n"
                     for k, v in template)
    return f"{header}\n__global__ void {name}({', '.join(params)}) {{\n{consts}{source}\n}}\n"


def test_the_kernel_sources_compile_for_sm90(tmp_path):
    """Every CUDA source of cuda_batch.py compiles for an H100/H200 (nvcc, where installed): the kernels
    run only on a GPU, so a typo would otherwise first show there."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc")
    pre = ("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n#include <cuda/std/array>\n"
           "using Shape = cuda::std::array<int32_t, 8>;\nusing Strides = cuda::std::array<int64_t, 8>;\n")
    units = [pre + cuda_kernels._HEADER]
    for t in ("__nv_bfloat16", "__half", "float"):
        units.append(_mlx_style(f"attn_{t}", cuda_kernels._SOURCE, "",
                                [("q", t), ("k", t), ("v", t), ("mask", "bool"), ("scale", "float")],
                                [("out", t)], [("T", t), ("D", 128), ("BLOCK", cuda_batch.BLOCK)]))
    for t in ("__nv_bfloat16", "__half"):
        units.append(_mlx_style(f"qmv_{t}", cuda_kernels._QMV_SOURCE, "",
                                [("x", t), ("w", "uint32_t"), ("scales", t), ("biases", t)], [("out", t)],
                                [("T", t), ("M", 4), ("K", 2048), ("GS", 64), ("BLOCK", cuda_batch.BLOCK)]))
        for parts in (2, 3):
            ins = [("x", t)] + [(f"{a}{p}", "uint32_t" if a == "w" else t)
                                for p in range(parts) for a in ("w", "scales", "biases")]
            units.append(_mlx_style(f"parts{parts}_{t}", cuda_kernels._parts_source(parts), "", ins,
                                    [(f"out{p}", t) for p in range(parts)],
                                    [("T", t), ("M", 8), ("K", 2048), ("GS", 64), ("BLOCK", cuda_batch.BLOCK)]
                                    + [(f"N{p}", 512 * (p + 1)) for p in range(parts)]))
        units.append(_mlx_style(f"swiglu_{t}", cuda_kernels._SWIGLU_SOURCE, "",
                                [("x", t)] + [(f"{a}{p}", "uint32_t" if a == "w" else t)
                                              for p in ("g", "u") for a in ("w", "s", "b")], [("out", t)],
                                [("T", t), ("M", 8), ("K", 2048), ("GS", 64), ("BLOCK", cuda_batch.BLOCK)]))
    src = tmp_path / "kernels.cu"
    src.write_text("\n".join(units))
    out = subprocess.run([nvcc, "-arch=sm_90", "-c", str(src), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


# ---------------------------------------------------------------- the kernels' arithmetic, on the CPU

def _emulator():
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("no g++ for the CUDA emulator")
    from tests.support import cuda_emulator
    return cuda_emulator


def _close(got, ref, tol):
    got, ref = got.astype(mx.float32), ref.astype(mx.float32)
    err = (mx.abs(got - ref).max() / mx.abs(ref).max()).item()
    assert err < tol, err


def _quantized(n, k, dtype, seed):
    w, s, b = mx.quantize(mx.random.normal((n, k), key=mx.random.key(seed)), group_size=64, bits=4)
    return w, s.astype(dtype), b.astype(dtype)


def _qmv_ref(x, w, s, b):
    """MLX's float32 x @ dequantized(w).T, the reference the kernels' fp32 accumulation is held to."""
    deq = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=4)
    return x.astype(mx.float32) @ deq.T


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_rows_qmv_computes_the_quantized_matmul(dtype):
    """rows_qmv's source, run by the CPU emulator: 3 rows of a 4-bit matrix (N not a multiple of a block's
    8 warps: the last warps have no row)."""
    emu = _emulator()

    M, K, N = 3, 512, 100
    w, s, b = _quantized(N, K, dtype, 0)
    x = mx.random.normal((M, 1, K), key=mx.random.key(1)).astype(dtype)
    (out,) = emu.run(cuda_kernels._QMV_SOURCE, "", [("x", x), ("w", w), ("scales", s), ("biases", b)],
                     [("out", (M, 1, N), dtype)],
                     [("T", dtype), ("M", M), ("K", K), ("GS", 64), ("BLOCK", cuda_batch.BLOCK)],
                     grid=(-(-N // 8) * cuda_batch.BLOCK,), threadgroup=(cuda_batch.BLOCK,))
    _close(out, _qmv_ref(x, w, s, b), 1e-2)


@pytest.mark.parametrize("ns", [(96, 32, 32), (72, 72)])
def test_rows_qmv_parts_computes_each_matrix(ns):
    """rows_qmv_parts' source (q/k/v and gate/up shapes): every output of every matrix, none mixed up."""
    emu = _emulator()

    M, K, dtype = 4, 256, mx.bfloat16
    mats = [_quantized(n, K, dtype, i) for i, n in enumerate(ns)]
    x = mx.random.normal((M, 1, K), key=mx.random.key(7)).astype(dtype)
    ins = [("x", x)] + [(f"{a}{p}", t) for p, m in enumerate(mats) for a, t in zip(("w", "scales", "biases"), m)]
    outs = emu.run(cuda_kernels._parts_source(len(ns)), "", ins,
                   [(f"out{p}", (M, 1, n), dtype) for p, n in enumerate(ns)],
                   [("T", dtype), ("M", M), ("K", K), ("GS", 64), ("BLOCK", cuda_batch.BLOCK)]
                   + [(f"N{p}", n) for p, n in enumerate(ns)],
                   grid=(-(-sum(ns) // 8) * cuda_batch.BLOCK,), threadgroup=(cuda_batch.BLOCK,))
    for got, m in zip(outs, mats):
        _close(got, _qmv_ref(x, *m), 1e-2)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_decode_attention_is_masked_sdpa(dtype):
    """decode_attention's source: left-padded rows (one fully padded but its last key), GQA, keys and
    values read as strided views of larger cache buffers, against MLX's SDPA with the same mask."""
    emu = _emulator()

    B, Hq, Hk, L, cap, D = 3, 4, 2, 40, 64, 64
    q = mx.random.normal((B, Hq, 1, D), key=mx.random.key(0)).astype(dtype)
    kbuf, vbuf = (mx.random.normal((B, Hk, cap, D), key=mx.random.key(i)).astype(dtype) for i in (1, 2))
    pad = mx.array([0, 5, L - 1])
    mask = (mx.arange(L)[None] >= pad[:, None])[:, None, None, :]
    scale = D ** -0.5
    ref = mx.fast.scaled_dot_product_attention(q, kbuf[..., :L, :], vbuf[..., :L, :], scale=scale, mask=mask)
    view = (Hk * cap * D, cap * D, D, 1)  # [..., :L, :] of the buffers: their strides, L keys
    (out,) = emu.run(cuda_kernels._SOURCE, cuda_kernels._HEADER,
                     [("q", q), ("k", kbuf), ("v", vbuf), ("mask", mask), ("scale", mx.array([scale]))],
                     [("out", (B, Hq, 1, D), dtype)],
                     [("T", dtype), ("D", D), ("BLOCK", cuda_batch.BLOCK)],
                     grid=(B * Hq * cuda_batch.BLOCK,), threadgroup=(cuda_batch.BLOCK,),
                     strides={"k": view, "v": view}, shapes={"k": (B, Hk, L, D), "v": (B, Hk, L, D)})
    _close(out, ref, 2e-2 if dtype == mx.bfloat16 else 1e-5)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_batched_step_through_the_kernels_gives_mlx_s_logits(monkeypatch, family, fuse):
    """The whole CUDA path of a batched step (attention wrapper, rows_qmv for every matrix, the fused
    q/k/v and swiglu), its kernels run by the CPU emulator: MLX's logits and greedy tokens, on llama,
    qwen2 and Gemma 3's rotating layers."""
    from mlx_lm.models import base

    emu = _emulator()
    arch, model = _tiny(family)
    y = mx.array([[5], [6], [7]])
    ref = model(y, cache=_batch(model))
    _fresh_kernels(monkeypatch, emu.cuda_kernel)
    monkeypatch.setattr(cuda_batch, "QMV_LEAST", {2: 0})  # every matrix, however small
    monkeypatch.setattr(arch, "scaled_dot_product_attention", base.scaled_dot_product_attention)
    launched = []
    attention = cuda_batch.decode_attention
    monkeypatch.setattr(cuda_batch, "decode_attention", lambda *a: launched.append(1) or attention(*a))
    with cuda_batch.batch_kernels(model, fuse=fuse)(3):
        got = model(y, cache=_batch(model))
    assert len(launched) == 2  # every layer's attention went through the kernel
    assert (cuda_kernels._parts_args != {}) == fuse and cuda_kernels._qmv_args
    assert (cuda_kernels._swiglu_args != {}) == (fuse and family != "gemma3_text")
    _close(got, ref, 1e-2)
    assert mx.array_equal(mx.argmax(got, axis=-1), mx.argmax(ref, axis=-1))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_rows_qmv_swiglu_computes_the_mlp_activation(dtype):
    """rows_qmv_swiglu's source: silu(x Wg) * (x Wu) for 3 rows, N not a multiple of a block's warps."""
    from mlx_lm.models.activations import swiglu

    emu = _emulator()
    M, K, N = 3, 512, 100
    g, u = _quantized(N, K, dtype, 2), _quantized(N, K, dtype, 3)
    x = mx.random.normal((M, 1, K), key=mx.random.key(4)).astype(dtype)
    (out,) = emu.run(cuda_kernels._SWIGLU_SOURCE, "", [("x", x)] + [(f"{a}{p}", t) for p, m in (("g", g), ("u", u))
                                                                 for a, t in zip(("w", "s", "b"), m)],
                     [("out", (M, 1, N), dtype)],
                     [("T", dtype), ("M", M), ("K", K), ("GS", 64), ("BLOCK", cuda_batch.BLOCK)],
                     grid=(-(-N // 8) * cuda_batch.BLOCK,), threadgroup=(cuda_batch.BLOCK,))
    ref = swiglu(_qmv_ref(x, *g).astype(dtype), _qmv_ref(x, *u).astype(dtype))
    _close(out, ref, 2e-2)
