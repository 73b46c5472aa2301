"""The CUDA kernels of a batched decode step (worker/cuda/batch_kernels.py routes a model's calls to them).

- ``decode_attention``: softmax(q k^T) v for one query per row under a boolean [B, 1, 1, L] mask (MLX
  0.32's CUDA SDPA has no fused one-token kernel with an array mask). One thread block per (row, query
  head), online softmax over the keys the row's mask keeps, fp32 accumulation, any strides (the KV are
  views of the cache buffers, never copied).
- ``rows_qmv``: 2-8 one-token rows times a 4-bit affine matrix, one warp per output, each packed weight
  read once and applied to every row (on sm90 MLX's vector kernel takes one row only; more rows go to a
  tiled GEMM whose cost grows with the rows). ``rows_qmv_parts``: several matrices of one input in one
  launch (a layer's q, k and v). ``rows_qmv_swiglu``: silu(x Wg) * (x Wu) in one launch, the MLP's gate,
  up and activation, rounded as MLX rounds each of them.

Every launcher builds its call's arguments once per shape: a call is on the host's critical path.
"""

import hashlib

import mlx.core as mx

BLOCK = 256


def _named(name: str, source: str) -> str:
    """A kernel's name with its source's hash: MLX caches compiled kernels on disk by name
    (``MLX_PTX_CACHE_DIR``, else /tmp/mlx), so a changed source must not reuse an old build."""
    return f"{name}_{hashlib.sha1(source.encode()).hexdigest()[:10]}"

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
        _kernel = mx.fast.cuda_kernel(name=_named("worker_decode_attention", _HEADER + _SOURCE),
                                      input_names=["q", "k", "v", "mask", "scale"],
                                      output_names=["out"], source=_SOURCE, header=_HEADER,
                                      ensure_row_contiguous=False)
    return _kernel


# Head sizes where a lone sequence's decode step (mlx-lm's generate_step, unmasked) runs MLX's fused
# vector kernel, which accumulates in fp32 as decode_attention does. With other head sizes (Gemma 3's
# 256) MLX computes a batch of masked rows exactly as it computes each row alone, and decode_attention
# would not: on the H200 it moved Gemma 3 1B's logits by up to 17% of their range (bench/README.md).
HEAD_DIMS = (64, 96, 128)


def fits(queries, keys, mask) -> bool:
    """Whether ``decode_attention`` computes this call: one query per row, a boolean [B, 1, 1, L] mask,
    a head size of HEAD_DIMS, keys and values of the queries' type."""
    B, Hq, N, D = queries.shape
    return (N == 1 and B > 1 and D in HEAD_DIMS and isinstance(mask, mx.array) and mask.dtype == mx.bool_
            and mask.ndim == 4 and mask.shape[0] == B and mask.shape[2] == 1 and mask.shape[-1] == keys.shape[2]
            and Hq % keys.shape[1] == 0 and keys.shape[0] == B and keys.dtype == queries.dtype)


_attn_args: dict = {}


def decode_attention(queries, keys, values, scale: float, mask) -> mx.array:
    """softmax(q k^T * scale, masked) v for one query per row: [B, Hq, 1, D], as MLX's SDPA."""
    B, Hq, _, D = queries.shape
    key = (B, Hq, D, queries.dtype, scale)
    args = _attn_args.get(key)
    if args is None:
        args = _attn_args[key] = (mx.array([scale], dtype=mx.float32), dict(
            template=[("T", queries.dtype), ("D", D), ("BLOCK", BLOCK)], grid=(B * Hq * BLOCK, 1, 1),
            threadgroup=(BLOCK, 1, 1), output_shapes=[(B, Hq, 1, D)], output_dtypes=[queries.dtype]))
    return _attention_kernel()(inputs=[queries, keys, values, mask, args[0]], **args[1])[0]


# One warp per output row n of an [N, K/8] matrix named W (the kernels below start so).
_ROW = """
    constexpr int KW = K / 8;
    const int N = {W}_shape[0];
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * (BLOCK / 32) + threadIdx.x / 32;
    if (n >= N) return;
"""

_QMV_SOURCE = _ROW.format(W="w") + """    const uint32_t* wr = w + (size_t)n * KW;
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
        _qmv = mx.fast.cuda_kernel(name=_named("worker_rows_qmv", _QMV_SOURCE),
                                   input_names=["x", "w", "scales", "biases"],
                                   output_names=["out"], source=_QMV_SOURCE)
    return _qmv


_qmv_args: dict = {}


def qmv_launch(M: int, K: int, N: int, group_size: int, dtype):
    """(kernel, keyword arguments) of rows_qmv for x [M, 1, K] and an [N, K/8] matrix: ``kernel(inputs=[x,
    w, scales, biases], **kwargs)[0]``."""
    key = (M, K, N, group_size, dtype)
    args = _qmv_args.get(key)
    if args is None:
        args = _qmv_args[key] = (_qmv_kernel(), dict(
            template=[("T", dtype), ("M", M), ("K", K), ("GS", group_size), ("BLOCK", BLOCK)],
            grid=(-(-N // (BLOCK // 32)) * BLOCK, 1, 1), threadgroup=(BLOCK, 1, 1), output_shapes=[(M, 1, N)],
            output_dtypes=[dtype]))
    return args


def rows_qmv(x, w, scales, biases, group_size: int) -> mx.array:
    """x [M, 1, K] @ dequantized(w).T for 4-bit affine w [N, K/8]: every weight read once for all M rows."""
    M, _, K = x.shape
    kernel, kw = qmv_launch(M, K, w.shape[0], group_size, x.dtype)
    return kernel(inputs=[x, w, scales, biases], **kw)[0]


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


def parts_launch(M: int, K: int, ns: tuple, group_size: int, dtype):
    """(kernel, keyword arguments) of rows_qmv_parts: ``kernel(inputs=[x, w0, scales0, biases0, w1, ...],
    **kwargs)``, one output per matrix."""
    key = (M, K, ns, group_size, dtype)
    args = _parts_args.get(key)
    if args is None:
        if len(ns) not in _parts:
            _parts[len(ns)] = mx.fast.cuda_kernel(
                name=_named(f"worker_rows_qmv{len(ns)}", _parts_source(len(ns))),
                output_names=[f"out{p}" for p in range(len(ns))],
                input_names=["x", *(f"{a}{p}" for p in range(len(ns)) for a in ("w", "scales", "biases"))],
                source=_parts_source(len(ns)))
        args = _parts_args[key] = (_parts[len(ns)], dict(
            template=[("T", dtype), ("M", M), ("K", K), ("GS", group_size), ("BLOCK", BLOCK),
                      *((f"N{p}", n) for p, n in enumerate(ns))],
            grid=(-(-sum(ns) // (BLOCK // 32)) * BLOCK, 1, 1), threadgroup=(BLOCK, 1, 1),
            output_shapes=[(M, 1, n) for n in ns], output_dtypes=[dtype] * len(ns)))
    return args


def rows_qmv_parts(x, mats, group_size: int) -> list:
    """rows_qmv of each 4-bit affine (w [N, K/8], scales, biases) of ``mats`` on one x, in one launch."""
    M, _, K = x.shape
    kernel, kw = parts_launch(M, K, tuple(w.shape[0] for w, _, _ in mats), group_size, x.dtype)
    return kernel(inputs=[x, *(a for m in mats for a in m)], **kw)


# silu(x Wg) * (x Wu): the warp of output n reads row n of both matrices. As MLX computes the MLP (two
# quantized matmuls, then mlx-lm's compiled swiglu), each result is rounded to T: the two products,
# sigmoid(g), g * sigmoid(g), and the product with u.
_SWIGLU_SOURCE = _ROW.format(W="wg") + """    const uint32_t* gr = wg + (size_t)n * KW;
    const uint32_t* ur = wu + (size_t)n * KW;
    const T* gs = sg + (size_t)n * (K / GS);
    const T* gb = bg + (size_t)n * (K / GS);
    const T* us = su + (size_t)n * (K / GS);
    const T* ub = bu + (size_t)n * (K / GS);
    float ag[M], au[M];
    for (int m = 0; m < M; ++m) { ag[m] = 0.f; au[m] = 0.f; }
    #pragma unroll 2
    for (int i = lane; i < KW; i += 32) {
        const uint32_t qg = gr[i], qu = ur[i];
        const int g = (i * 8) / GS;
        const float s0 = static_cast<float>(gs[g]), b0 = static_cast<float>(gb[g]);
        const float s1 = static_cast<float>(us[g]), b1 = static_cast<float>(ub[g]);
        float wg8[8], wu8[8];
        for (int j = 0; j < 8; ++j) {
            wg8[j] = s0 * static_cast<float>((qg >> (4 * j)) & 0xF) + b0;
            wu8[j] = s1 * static_cast<float>((qu >> (4 * j)) & 0xF) + b1;
        }
        for (int m = 0; m < M; ++m) {
            const uint4 c = *reinterpret_cast<const uint4*>(x + (size_t)m * K + i * 8);
            const T* xv = reinterpret_cast<const T*>(&c);
            float a = 0.f, b = 0.f;
            for (int j = 0; j < 8; ++j) {
                const float xf = static_cast<float>(xv[j]);
                a += wg8[j] * xf;
                b += wu8[j] * xf;
            }
            ag[m] += a;
            au[m] += b;
        }
    }
    for (int m = 0; m < M; ++m) {
        float a = ag[m], b = au[m];
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_xor_sync(0xffffffff, a, o);
            b += __shfl_xor_sync(0xffffffff, b, o);
        }
        if (lane == 0) {
            const float g = static_cast<float>(static_cast<T>(a));
            const float sig = static_cast<float>(static_cast<T>(1.f / (1.f + __expf(-g))));
            const float act = static_cast<float>(static_cast<T>(g * sig));
            out[(size_t)m * N + n] = static_cast<T>(act * static_cast<float>(static_cast<T>(b)));
        }
    }
"""

_swiglu = None
_swiglu_args: dict = {}


def swiglu_launch(M: int, K: int, N: int, group_size: int, dtype):
    """(kernel, keyword arguments) of rows_qmv_swiglu: ``kernel(inputs=[x, wg, sg, bg, wu, su, bu],
    **kwargs)[0]``."""
    global _swiglu
    key = (M, K, N, group_size, dtype)
    args = _swiglu_args.get(key)
    if args is None:
        if _swiglu is None:
            _swiglu = mx.fast.cuda_kernel(name=_named("worker_rows_qmv_swiglu", _SWIGLU_SOURCE), output_names=["out"],
                                          input_names=["x", "wg", "sg", "bg", "wu", "su", "bu"],
                                          source=_SWIGLU_SOURCE)
        args = _swiglu_args[key] = (_swiglu, dict(
            template=[("T", dtype), ("M", M), ("K", K), ("GS", group_size), ("BLOCK", BLOCK)],
            grid=(-(-N // (BLOCK // 32)) * BLOCK, 1, 1), threadgroup=(BLOCK, 1, 1), output_shapes=[(M, 1, N)],
            output_dtypes=[dtype]))
    return args


def rows_qmv_swiglu(x, gate, up, group_size: int) -> mx.array:
    """silu(x @ Wg.T) * (x @ Wu.T) for 2-8 one-token rows x [M, 1, K]; ``gate`` and ``up`` are 4-bit affine
    (w [N, K/8], scales, biases) of one shape."""
    M, _, K = x.shape
    kernel, kw = swiglu_launch(M, K, gate[0].shape[0], group_size, x.dtype)
    return kernel(inputs=[x, *gate, *up], **kw)[0]
