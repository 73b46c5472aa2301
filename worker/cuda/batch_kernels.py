"""A batched decode step (worker/generation/decode_batch.py) through worker/cuda/kernels.py on CUDA, where MLX 0.32's own
kernels are slow or many.

A step of B one-token rows is bound by the host (bench/README.md, H200): Python building the graph, then
MLX encoding one CUDA kernel per operation (~6 us each), so what pays is fewer operations and cheap
calls. Inside a step of 2-8 rows:
- **attention** takes ``decode_attention`` (MLX's SDPA falls back to matmul + softmax + matmul with the
  left-padded batch's array mask);
- **4-bit matrices of ``qmv_least(rows)`` weights or more** (the MLP's and the head) take ``rows_qmv``
  (MLX's GEMM for 2+ rows costs nearly rows times one row);
- with ``FUSE`` (``MLX_WORKER_FUSE=0`` turns it off), a layer's **q, k and v** are one launch, and an
  mlx-lm **MLP of the swiglu pattern** (``down(swiglu(gate(x), up(x)))``, checked on its bytecode) is
  two: gate, up and the activation in one, then down.

Which module takes which kernel is decided once per model and batch size (``batch_kernels``), so a call in
the step costs a dictionary lookup and the launch. Outside a step the model runs exactly as mlx-lm wrote it.
"""

import contextlib
import os
import sys
import threading

import mlx.core as mx
import mlx.nn as nn

from .kernels import (BLOCK, decode_attention, fits, parts_launch, qmv_launch, rows_qmv,  # noqa: F401
                           rows_qmv_parts, rows_qmv_swiglu, swiglu_launch)


def _policy(text, default):
    """``"2:67108864,5:8388608"`` -> {2: 67108864, 5: 8388608} (MLX_WORKER_QMV_LEAST, for benchmarks)."""
    if not text:
        return default
    return {int(r): int(n) for r, n in (item.split(":") for item in text.split(","))}


# Rows of a step -> the fewest weights of a matrix that rows_qmv computes in it (MLX's GEMM below; the
# entry with the most rows <= the step's applies). Measured on an H200 (bench/README.md): from 2 to 8 rows
# the MLP and head matrices (8M+ weights) gain more GPU time than the kernel's call costs the host; the
# attention projections (1-4M) do not, there MLX's GEMM is cheaper for the host (unless fused).
QMV_LEAST = _policy(os.environ.get("MLX_WORKER_QMV_LEAST"), {2: 1 << 23})
FUSE = os.environ.get("MLX_WORKER_FUSE", "1") != "0"
FUSED = ("q_proj", "k_proj", "v_proj")  # linears an attention layer applies to one x


def qmv_least(rows: int):
    """The fewest weights of a matrix rows_qmv computes in a step of ``rows`` sequences, or None."""
    least = None
    for r, n in sorted(QMV_LEAST.items()):
        if rows >= r:
            least = n
    return least if rows <= 8 else None


def _matrix(m):
    """(weight, scales, biases, group size) of a 4-bit affine quantized module the kernels compute, else None."""
    if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or m.bits != 4 or m.mode != "affine":
        return None
    if "biases" not in m or m.group_size not in (32, 64, 128):
        return None
    w, s = m["weight"], m["scales"]
    if (w.ndim != 2 or (w.shape[1] * 8) % 256 or s.dtype not in (mx.bfloat16, mx.float16)
            or m["biases"].dtype != s.dtype):
        return None
    return w, s, m["biases"], m.group_size


def _swiglu_classes() -> set:
    """mlx-lm MLP classes whose __call__ is llama's ``down_proj(swiglu(gate_proj(x), up_proj(x)))``."""
    from mlx_lm.models import activations, llama

    ref = llama.MLP.__call__.__code__
    out = set()
    for name, mod in list(sys.modules.items()):
        if not name.startswith("mlx_lm.models.") or getattr(mod, "swiglu", None) is not activations.swiglu:
            continue
        for cls in vars(mod).values():
            code = getattr(getattr(cls, "__call__", None), "__code__", None)
            if (isinstance(cls, type) and issubclass(cls, nn.Module) and code is not None
                    and code.co_code == ref.co_code and code.co_names == ref.co_names):
                out.add(cls)
    return out


def plan(model, fuse: bool):
    """What the kernels compute in this model: its eligible matrices, its q/k/v groups and its swiglu MLPs."""
    mats, groups, mlps = [], [], []
    swiglu = _swiglu_classes() if fuse else set()
    for module in model.modules():
        q = _matrix(module)
        if q is not None:
            mats.append(q)
        if not fuse:
            continue
        if type(module) in swiglu:
            g, u = _matrix(module.get("gate_proj")), _matrix(module.get("up_proj"))
            if (g and u and g[0].shape == u[0].shape and g[3] == u[3] and g[1].dtype == u[1].dtype
                    and not {"bias"} & (set(module.gate_proj) | set(module.up_proj))):
                mlps.append((module, g, u))
        mods = tuple(module.get(n) for n in FUSED)
        parts = [_matrix(m) for m in mods]
        if all(parts) and len({(p[0].shape[1], p[3], p[1].dtype) for p in parts}) == 1:
            groups.append((mods, parts))
    return mats, groups, mlps


def _tables(plan_, rows: int, least):
    """Per step of ``rows`` rows: id -> what a call computes (see rows_qmm, _linear, _mlp)."""
    mats, groups, mlps = plan_
    qmv = {}
    for w, s, b, gs in mats:
        K, N = w.shape[1] * 8, w.shape[0]
        if N * K >= least:
            qmv[id(w)] = (w, s, (rows, 1, K), s.dtype, *qmv_launch(rows, K, N, gs, s.dtype))
    linear = {}
    for mods, parts in groups:
        K, gs, dtype = parts[0][0].shape[1] * 8, parts[0][3], parts[0][1].dtype
        kernel, kw = parts_launch(rows, K, tuple(p[0].shape[0] for p in parts), gs, dtype)
        inputs = [a for p in parts for a in p[:3]]
        for i, m in enumerate(mods):
            linear[id(m)] = (mods, i, (rows, 1, K), dtype, kernel, kw, inputs, m.get("bias"))
    mlp = {}
    for module, g, u in mlps:
        K, N = g[0].shape[1] * 8, g[0].shape[0]
        kernel, kw = swiglu_launch(rows, K, N, g[3], g[1].dtype)
        mlp[id(module)] = (module, (rows, 1, K), g[1].dtype, kernel, kw, [*g[:3], *u[:3]])
    return qmv, linear, mlp


class _Active(threading.local):
    on = False  # the attention kernel is on (inside a batched step)
    qmv: dict = {}  # id(weight) -> rows_qmv's call for it (inside a batched step)
    linear: dict = {}  # id(q/k/v linear) -> its group's launch
    mlp: dict = {}  # id(swiglu MLP) -> its launch
    stash = None  # (group, x, outputs) of the q/k/v group whose first member ran last


_active = _Active()
_QMM = mx.quantized_matmul
_LINEAR = nn.QuantizedLinear.__call__
_MLP_CALLS: dict = {}  # swiglu MLP class -> its own __call__


def rows_qmm(x, w, scales, biases=None, transpose=True, group_size=64, bits=4, mode="affine", **kw):
    """``mx.quantized_matmul`` in a batched step: a matrix of the step's table (one of the model's 4-bit
    matrices, large enough) and an input of the step's rows go to ``rows_qmv``; anything else to MLX."""
    p = _active.qmv.get(id(w))
    if (p is not None and p[0] is w and p[1] is scales and transpose and not kw and x.shape == p[2]
            and x.dtype == p[3]):
        return p[4](inputs=[x, w, scales, biases], **p[5])[0]
    return _QMM(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits, mode=mode, **kw)


def _linear(self, x):
    """QuantizedLinear.__call__ in a batched step: q computes q, k and v in one launch; k and v take their
    output if they see the same input (else MLX computes them)."""
    g = _active.linear.get(id(self))
    if g is None:
        return _LINEAR(self, x)
    mods, i, shape, dtype, kernel, kw, inputs, bias = g
    if i == 0:
        if x.shape != shape or x.dtype != dtype:
            return _LINEAR(self, x)
        outs = kernel(inputs=[x, *inputs], **kw)
        _active.stash = (mods, x, outs)
    else:
        stash = _active.stash
        if stash is None or stash[0] is not mods or stash[1] is not x:
            return _LINEAR(self, x)
        outs = stash[2]
        if i == len(mods) - 1:
            _active.stash = None
    return outs[i] if bias is None else outs[i] + bias


def _mlp(self, x):
    """A swiglu MLP's __call__ in a batched step: gate, up and swiglu in one launch, then down_proj."""
    p = _active.mlp.get(id(self))
    if p is None or p[0] is not self or x.shape != p[1] or x.dtype != p[2]:
        # its class's own __call__ (a subclass of a patched class inherits the patch)
        return next(_MLP_CALLS[c] for c in type(self).__mro__ if c in _MLP_CALLS)(self, x)
    return self.down_proj(p[3](inputs=[x, *p[5]], **p[4])[0])


_installed: set = set()


def _sdpa(original):
    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        if _active.on and sinks is None and not hasattr(cache, "bits") and fits(queries, keys, mask):
            return decode_attention(queries, keys, values, scale, mask)
        return original(queries, keys, values, cache, scale, mask, sinks)

    sdpa.worker_original = original
    return sdpa


def _install(model) -> None:
    """Point every mlx-lm model module the model uses at the attention wrapper (once per module)."""
    from mlx_lm.models import base

    for layer in model.modules():
        name = type(layer).__module__
        mod = sys.modules.get(name)
        if name in _installed or mod is None:
            continue
        _installed.add(name)
        if getattr(mod, "scaled_dot_product_attention", None) is base.scaled_dot_product_attention:
            mod.scaled_dot_product_attention = _sdpa(base.scaled_dot_product_attention)


def available() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()


def batch_kernels(model, attention=True, matmul=True, fuse=None):
    """For a model's batched decode steps on CUDA: ``kernels(rows)``, the context manager of one step of
    ``rows`` sequences; None where the kernels do not apply (not CUDA). The model's modules are walked
    here, once, and each batch size's tables built once: a step pays only for its context."""
    if not available() or not (attention or matmul):
        return None
    if attention:
        _install(model)
    fuse = (FUSE if fuse is None else fuse) and matmul
    plan_ = plan(model, fuse) if matmul else None
    classes = {type(m) for m, _, _ in plan_[2]} if plan_ else set()
    for cls in classes:
        if cls.__call__ is not _mlp:
            _MLP_CALLS.setdefault(cls, cls.__call__)
    tables: dict = {}

    def kernels(rows: int):
        least = qmv_least(rows) if matmul else None
        if least is None:
            return _step(attention, None, classes)
        if rows not in tables:
            tables[rows] = _tables(plan_, rows, least)
        return _step(attention, tables[rows], classes)

    return kernels


@contextlib.contextmanager
def _step(attention, tables, classes):
    _active.on = attention
    if tables is not None:
        _active.qmv, _active.linear, _active.mlp = tables
        mx.quantized_matmul = rows_qmm
        if _active.linear:
            _active.stash = None
            nn.QuantizedLinear.__call__ = _linear
        for cls in classes if _active.mlp else ():
            cls.__call__ = _mlp
    try:
        yield
    finally:
        _active.on = False
        mx.quantized_matmul = _QMM
        nn.QuantizedLinear.__call__ = _LINEAR
        for cls in classes:
            cls.__call__ = _MLP_CALLS[cls]
        _active.qmv, _active.linear, _active.mlp, _active.stash = {}, {}, {}, None
