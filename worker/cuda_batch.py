"""CUDA kernels for a batched decode step (worker/batch.py), where MLX 0.32's own ones are slow.

Two gaps of MLX's CUDA backend cost a batch of B one-token queries most of its gain (measured on an
H200, bench/README.md):
- **Attention.** A left-padded batch needs an array mask, and ``mx.fast.scaled_dot_product_attention``
  has no fused one-token kernel with one: each layer falls back to matmul + softmax + matmul.
  ``decode_attention`` is that fused kernel: one thread block per (row, query head), online softmax over
  the keys the row's boolean mask keeps, fp32 accumulation, any strides (the KV are views of the
  cache buffers, never copied).
- **Quantized matmuls.** On sm90 ``mx.quantized_matmul`` takes its vector kernel only for a single row;
  more rows go to a tiled GEMM whose cost grows with the rows (8 rows: 4-6x one row's). ``rows_qmv``
  is the vector kernel for 2-8 rows of a 4-bit affine matrix: one warp per output, each packed weight
  read once and applied to every row. With ``MLX_WORKER_FUSE=1`` (off until measured on a GPU) a
  layer's q, k and v, and its gate and up, are one launch each (``rows_qmv_parts``): fewer launches for
  the GPU and fewer calls for the host, which both bound a step.

``batch_kernels(model)`` returns, for one batched step, a context manager that routes a model's
attention and quantized matmuls through these, or None where they do not apply (not CUDA).
Outside it, the model runs exactly as mlx-lm wrote it.
"""

import contextlib
import os
import sys
import threading

import mlx.core as mx
import mlx.nn as nn

BLOCK = 256


def _policy(text, default):
    """``"2:67108864,5:8388608"`` -> {2: 67108864, 5: 8388608} (MLX_WORKER_QMV_LEAST, for benchmarks)."""
    if not text:
        return default
    return {int(r): int(n) for r, n in (item.split(":") for item in text.split(","))}


# Rows of a step -> the fewest weights of a matrix that rows_qmv computes in it (MLX's GEMM below; the
# entry with the most rows <= the step's applies). Measured on an H200 (bench/README.md): from 2 to 8 rows
# the MLP and head matrices (8M+ weights) gain more GPU time than the kernel's call costs the host; the
# attention projections (1-4M) do not, there MLX's GEMM is cheaper for the host.
QMV_LEAST = _policy(os.environ.get("MLX_WORKER_QMV_LEAST"), {2: 1 << 23})
# One launch for a layer's q/k/v and one for its gate/up (rows_qmv_parts): opt-in until it is measured
# against the above on a GPU (bench/probe/final15.sh).
FUSE = os.environ.get("MLX_WORKER_FUSE") == "1"


def qmv_least(rows: int):
    """The fewest weights of a matrix rows_qmv computes in a step of ``rows`` sequences, or None."""
    least = None
    for r, n in sorted(QMV_LEAST.items()):
        if rows >= r:
            least = n
    return least if rows <= 8 else None

_HEADER = "#define WK_INF __int_as_float(0x7f800000)\n"

_SOURCE = """
    constexpr int WARPS = BLOCK / 32;
    constexpr int EPL = D / 32;
    const int Hq = q_shape[1];
    const int L = k_shape[2];
    const int bh = blockIdx.x;
    const int b = bh / Hq, h = bh % Hq;
    const int hk = h / (Hq / k_shape[1]);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float sc = scale[0];
    const T* qp = q + b * q_strides[0] + h * q_strides[1];
    float qv[EPL], acc[EPL];
    for (int i = 0; i < EPL; ++i) {
        qv[i] = static_cast<float>(qp[(lane * EPL + i) * q_strides[3]]) * sc;
        acc[i] = 0.f;
    }
    const T* kp = k + b * k_strides[0] + hk * k_strides[1];
    const T* vp = v + b * v_strides[0] + hk * v_strides[1];
    const bool* mp = mask + b * mask_strides[0];
    float m = -WK_INF, l = 0.f;
    for (int j = warp; j < L; j += WARPS) {
        if (!mp[j * mask_strides[3]]) continue;
        const T* kr = kp + j * k_strides[2] + lane * EPL * k_strides[3];
        float s = 0.f;
        for (int i = 0; i < EPL; ++i) s += qv[i] * static_cast<float>(kr[i * k_strides[3]]);
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        const float mn = fmaxf(m, s);
        const float c = __expf(m - mn), p = __expf(s - mn);
        const T* vr = vp + j * v_strides[2] + lane * EPL * v_strides[3];
        l = l * c + p;
        for (int i = 0; i < EPL; ++i) acc[i] = acc[i] * c + p * static_cast<float>(vr[i * v_strides[3]]);
        m = mn;
    }
    __shared__ float sm[WARPS], sl[WARPS], sacc[WARPS][D];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    for (int i = 0; i < EPL; ++i) sacc[warp][lane * EPL + i] = acc[i];
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += BLOCK) {
        float top = -WK_INF;
        for (int w = 0; w < WARPS; ++w) top = fmaxf(top, sm[w]);
        float tot = 0.f, o = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            if (sm[w] == -WK_INF) continue;
            const float c = __expf(sm[w] - top);
            tot += sl[w] * c;
            o += sacc[w][d] * c;
        }
        out[bh * D + d] = static_cast<T>(o / tot);
    }
"""

_kernel = None


def _attention_kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="worker_decode_attention", input_names=["q", "k", "v", "mask", "scale"],
                                      output_names=["out"], source=_SOURCE, header=_HEADER,
                                      ensure_row_contiguous=False)
    return _kernel


def fits(queries, keys, mask) -> bool:
    """Whether ``decode_attention`` computes this call: one query per row, a boolean [B, 1, 1, L] mask."""
    B, Hq, N, D = queries.shape
    return (N == 1 and B > 1 and isinstance(mask, mx.array) and mask.dtype == mx.bool_ and mask.ndim == 4
            and mask.shape[0] == B and mask.shape[2] == 1 and mask.shape[-1] == keys.shape[2]
            and D % 32 == 0 and D <= 256 and Hq % keys.shape[1] == 0 and keys.shape[0] == B)


_attn_args: dict = {}


def decode_attention(queries, keys, values, scale: float, mask) -> mx.array:
    """softmax(q k^T * scale, masked) v for one query per row: [B, Hq, 1, D], as MLX's SDPA."""
    B, Hq, _, D = queries.shape
    key = (B, Hq, D, queries.dtype, scale)
    args = _attn_args.get(key)
    if args is None:  # built once per shape (see rows_qmv)
        args = _attn_args[key] = (mx.array([scale], dtype=mx.float32), dict(
            template=[("T", queries.dtype), ("D", D), ("BLOCK", BLOCK)], grid=(B * Hq * BLOCK, 1, 1),
            threadgroup=(BLOCK, 1, 1), output_shapes=[(B, Hq, 1, D)], output_dtypes=[queries.dtype]))
    return _attention_kernel()(inputs=[queries, keys, values, mask, args[0]], **args[1])[0]


_QMV_SOURCE = """
    constexpr int KW = K / 8;
    const int N = w_shape[0];
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * (BLOCK / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const uint32_t* wr = w + (size_t)n * KW;
    const T* sr = scales + (size_t)n * (K / GS);
    const T* br = biases + (size_t)n * (K / GS);
    float acc[M];
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    #pragma unroll 4
    for (int i = lane; i < KW; i += 32) {
        const uint32_t q = wr[i];
        const float s = static_cast<float>(sr[(i * 8) / GS]), b = static_cast<float>(br[(i * 8) / GS]);
        float wv[8];
        for (int j = 0; j < 8; ++j) wv[j] = s * static_cast<float>((q >> (4 * j)) & 0xF) + b;
        for (int m = 0; m < M; ++m) {
            const uint4 c = *reinterpret_cast<const uint4*>(x + (size_t)m * K + i * 8);
            const T* xv = reinterpret_cast<const T*>(&c);
            float a = 0.f;
            for (int j = 0; j < 8; ++j) a += wv[j] * static_cast<float>(xv[j]);
            acc[m] += a;
        }
    }
    for (int m = 0; m < M; ++m) {
        float a = acc[m];
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffff, a, o);
        if (lane == 0) out[(size_t)m * N + n] = static_cast<T>(a);
    }
"""

_qmv = None


def _qmv_kernel():
    global _qmv
    if _qmv is None:
        _qmv = mx.fast.cuda_kernel(name="worker_rows_qmv", input_names=["x", "w", "scales", "biases"],
                                   output_names=["out"], source=_QMV_SOURCE)
    return _qmv


_qmv_args: dict = {}


def rows_qmv(x, w, scales, biases, group_size: int) -> mx.array:
    """x [M, 1, K] @ dequantized(w).T for 4-bit affine w [N, K/8]: every weight read once for all M rows."""
    M, _, K = x.shape
    N = w.shape[0]
    key = (M, K, N, group_size, x.dtype)
    args = _qmv_args.get(key)
    if args is None:  # built once per shape: the call is on the host's critical path
        args = _qmv_args[key] = dict(
            template=[("T", x.dtype), ("M", M), ("K", K), ("GS", group_size), ("BLOCK", BLOCK)],
            grid=(-(-N // (BLOCK // 32)) * BLOCK, 1, 1), threadgroup=(BLOCK, 1, 1), output_shapes=[(M, 1, N)],
            output_dtypes=[x.dtype])
    return _qmv_kernel()(inputs=[x, w, scales, biases], **args)[0]


# Several matrices of one input in one launch (a layer's q, k and v, or its gate and up): the warp of
# output n picks its matrix, then runs rows_qmv's loop over that matrix's row.
_QMV_BODY = _QMV_SOURCE[_QMV_SOURCE.index("    float acc[M];"):]


def _parts_source(parts: int) -> str:
    pick = "".join(f"    else if (n < {' + '.join(f'N{j}' for j in range(p + 1))}) {{ n -= {p and ' + '.join(f'N{j}' for j in range(p)) or 0};"
                   f" wr = w{p}; sr = scales{p}; br = biases{p}; out = out{p}; N = N{p}; }}\n" for p in range(parts))
    return ("""
    constexpr int KW = K / 8;
    const int lane = threadIdx.x % 32;
    int n = blockIdx.x * (BLOCK / 32) + threadIdx.x / 32;
    const uint32_t* wr; const T* sr; const T* br; T* out; int N;
    if (false) {}
""" + pick + """    else return;
    wr += (size_t)n * KW;
    sr += (size_t)n * (K / GS);
    br += (size_t)n * (K / GS);
""" + _QMV_BODY)


_parts: dict = {}
_parts_args: dict = {}


def rows_qmv_parts(x, mats, group_size: int) -> list:
    """rows_qmv of each 4-bit affine (w [N, K/8], scales, biases) of ``mats`` on one x, in one launch."""
    M, _, K = x.shape
    ns = tuple(w.shape[0] for w, _, _ in mats)
    key = (M, K, ns, group_size, x.dtype)
    args = _parts_args.get(key)
    if args is None:  # built once per shape (see rows_qmv)
        if len(ns) not in _parts:
            _parts[len(ns)] = mx.fast.cuda_kernel(
                name=f"worker_rows_qmv{len(ns)}", output_names=[f"out{p}" for p in range(len(ns))],
                input_names=["x", *(f"{a}{p}" for p in range(len(ns)) for a in ("w", "scales", "biases"))],
                source=_parts_source(len(ns)))
        args = _parts_args[key] = (_parts[len(ns)], dict(
            template=[("T", x.dtype), ("M", M), ("K", K), ("GS", group_size), ("BLOCK", BLOCK),
                      *((f"N{p}", n) for p, n in enumerate(ns))],
            grid=(-(-sum(ns) // (BLOCK // 32)) * BLOCK, 1, 1), threadgroup=(BLOCK, 1, 1),
            output_shapes=[(M, 1, n) for n in ns], output_dtypes=[x.dtype] * len(ns)))
    return args[0](inputs=[x, *(a for m in mats for a in m)], **args[1])


def rows_qmm(x, w, scales, biases=None, transpose=True, group_size=64, bits=4, mode="affine", **kw):
    """``mx.quantized_matmul`` with 2-8 one-token rows of a large 4-bit affine matrix through ``rows_qmv``
    (below the step's ``qmv_least`` weights MLX's GEMM costs the step less: the launch is the cost there)."""
    if (x.ndim == 3 and x.shape[1] == 1 and 2 <= x.shape[0] <= 8 and w.ndim == 2
            and w.shape[0] * x.shape[-1] >= _active.least and bits == 4 and transpose
            and mode == "affine" and biases is not None and not kw and x.dtype in (mx.bfloat16, mx.float16)
            and x.shape[-1] % 256 == 0 and group_size in (32, 64, 128) and scales.dtype == x.dtype):
        return rows_qmv(x, w, scales, biases, group_size)
    return _QMM(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits, mode=mode, **kw)


class _Active(threading.local):
    on = False  # the attention kernel is on (inside a batched step)
    least = 1 << 23  # the fewest weights of a matrix rows_qmm sends to rows_qmv (set per step)
    groups: dict = {}  # id(linear) -> its fused group, index and matrices (inside a batched step)
    stash = None  # (group, x, outputs) of the group whose first member ran last


_active = _Active()
_QMM = mx.quantized_matmul
_LINEAR = nn.QuantizedLinear.__call__
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # linears a layer applies to one x


def fused_groups(model) -> dict:
    """id(linear) -> (group, index, matrices) for each q/k/v and gate/up of a module that one rows_qmv
    launch computes together: 4-bit affine QuantizedLinears of one input size and group size."""
    out = {}
    for module in model.modules():
        for names in FUSED:
            mods = tuple(module.get(n) for n in names)
            if not all(isinstance(m, nn.QuantizedLinear) and m.bits == 4 and m.mode == "affine"
                       and "biases" in m and m.group_size == mods[0].group_size in (32, 64, 128)
                       and m["weight"].shape[1] == mods[0]["weight"].shape[1] for m in mods):
                continue
            mats = [(m["weight"], m["scales"], m["biases"]) for m in mods]
            for i, m in enumerate(mods):
                out[id(m)] = (mods, i, mats)
    return out


def _linear(self, x):
    """QuantizedLinear.__call__ in a batched step: the first of a fused group computes the whole group in
    one launch; the others take their output if they see the same input (else MLX computes them)."""
    g = _active.groups.get(id(self))
    if (g is None or x.ndim != 3 or x.shape[1] != 1 or not 2 <= x.shape[0] <= 8
            or x.dtype not in (mx.bfloat16, mx.float16) or x.shape[-1] % 256 or g[2][0][1].dtype != x.dtype):
        return _LINEAR(self, x)
    mods, i, mats = g
    if i == 0:
        outs = rows_qmv_parts(x, mats, self.group_size)
        _active.stash = (mods, x, outs)
    else:
        stash = _active.stash
        if stash is None or stash[0] is not mods or stash[1] is not x:
            return _LINEAR(self, x)
        outs = stash[2]
        if i == len(mods) - 1:
            _active.stash = None
    return outs[i] + self["bias"] if "bias" in self else outs[i]


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
    here, once: a step pays only for its context (walking them costs ~0.8 ms a step)."""
    if not available() or not (attention or matmul):
        return None
    if attention:
        _install(model)
    groups = fused_groups(model) if matmul and (FUSE if fuse is None else fuse) else {}

    def kernels(rows: int):
        least = qmv_least(rows) if matmul else None
        return _step(attention, least, groups if least is not None else {})

    return kernels


@contextlib.contextmanager
def _step(attention, least, groups):
    _active.on = attention
    if least is not None:
        _active.least = least
        mx.quantized_matmul = rows_qmm
    if groups:
        _active.groups, _active.stash = groups, None
        nn.QuantizedLinear.__call__ = _linear
    try:
        yield
    finally:
        _active.on = False
        mx.quantized_matmul = _QMM
        if groups:
            nn.QuantizedLinear.__call__ = _LINEAR
            _active.groups, _active.stash = {}, None
