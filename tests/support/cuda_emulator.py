"""Run a CUDA kernel source of worker/cuda/batch_kernels.py on the CPU, for its tests: the body, wrapped as
``mx.fast.cuda_kernel`` wraps it, is compiled by g++ as host C++ and run with one std::thread per CUDA
thread of a block, the blocks one after another; ``__shfl_xor_sync`` and ``__syncthreads`` are barriers of the warp and
of the block. It checks the kernels' arithmetic and indexing, not the GPU's memory model or speed.
"""

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

PRELUDE = r"""
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>
#include <ucontext.h>
struct dim3_ { unsigned x = 0, y = 0, z = 0; };
thread_local dim3_ threadIdx, blockIdx;
struct uint4 { uint32_t x, y, z, w; };
struct bf16 {
  uint16_t v;
  bf16() = default;
  bf16(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); v = uint16_t(u >> 16); }
  operator float() const { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
using __nv_bfloat16 = bf16;
using __half = _Float16;
using Shape = std::array<int32_t, 8>;
using Strides = std::array<int64_t, 8>;
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
#define __expf(x) std::exp(x)  // glibc declares an __expf it does not export
// Every CUDA thread of a block is a coroutine of one host thread, resumed in turn ("a round"); each
// yields at a sync point. A shuffle posts its value, yields, reads its partner's, yields: the lanes of a
// warp stay in step, so every lane has posted (and read) before any goes on. __syncthreads waits until
// every live thread of the block waits, then all go on in the same round.
struct Co { ucontext_t ctx; bool done = false, waiting = false; };
static ucontext_t sched_;
static std::vector<Co>* cos_;
static int cur_;
static float vals_[1024];
static inline void yield_() { swapcontext(&(*cos_)[cur_].ctx, &sched_); }
static inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int t = threadIdx.x;
  vals_[t] = v;
  yield_();
  const float r = vals_[(t & ~31) | ((t & 31) ^ o)];
  yield_();
  return r;
}
static inline void __syncthreads() { (*cos_)[cur_].waiting = true; yield_(); }
#define __shared__ static
"""

CTYPE = {mx.bfloat16: "bf16", mx.float16: "__half", mx.float32: "float", mx.uint32: "uint32_t", mx.bool_: "bool"}


def _numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def run(source, header, inputs, outputs, template, grid, threadgroup, strides=None, shapes=None):
    """``inputs``: [(name, mx.array)]; ``outputs``: [(name, shape, dtype)]; ``template``: [(name, int or
    dtype)]; ``grid``: total threads (as cuda_kernel's); ``shapes`` / ``strides``: {name: shape / element
    strides} where an input is read as a view of its buffer (default: the array's shape, row-contiguous).
    Returns the outputs as mx arrays."""
    params, casts, keep, argv = [], [], [], []
    for name, a in inputs:
        t = CTYPE[a.dtype]
        params.append(f"const {t}* {name}")
        casts.append(f"(const {t}*)a[{len(argv)}]")
        buf = _numpy(a)
        keep.append(buf)
        argv.append(buf.ctypes.data)
        views = (("shape", "Shape", (shapes or {}).get(name) or a.shape),
                 ("strides", "Strides", (strides or {}).get(name) or _contig(a.shape)))
        for kind, ctype, values in views:
            if f"{name}_{kind}" in source:
                arr = np.zeros(8, dtype=np.int32 if kind == "shape" else np.int64)
                arr[:len(values)] = values
                keep.append(arr)
                params.append(f"const {ctype} {name}_{kind}")
                casts.append(f"*(const {ctype}*)a[{len(argv)}]")
                argv.append(arr.ctypes.data)
    outs = []
    for name, shape, dtype in outputs:
        buf = np.zeros(shape, dtype=np.uint16 if dtype == mx.bfloat16 else _numpy(mx.zeros(1, dtype)).dtype)
        outs.append((buf, dtype))
        params.append(f"{CTYPE[dtype]}* {name}")
        casts.append(f"({CTYPE[dtype]}*)a[{len(argv)}]")
        argv.append(buf.ctypes.data)
    consts = "".join(f"  using {k} = {CTYPE[v]};\n" if isinstance(v, mx.Dtype) else f"  constexpr int {k} = {v};\n"
                     for k, v in template)
    code = (PRELUDE + header + f"\nstatic void kernel({', '.join(params)}) {{\n{consts}{source}\n}}\n"
            + "static void** args_;\n"
            + f"static void entry() {{ void** a = args_; kernel({', '.join(casts)}); (*cos_)[cur_].done = true; }}\n"
            + 'extern "C" void launch(void** a, int blocks, int threads) {\n'
            + "  std::vector<Co> cos(threads);\n"
            + "  std::vector<std::vector<char>> stacks(threads, std::vector<char>(1 << 16));\n"
            + "  cos_ = &cos;\n"
            + "  for (int b = 0; b < blocks; ++b) {\n"
            + "    blockIdx.x = b;\n"
            + "    for (int t = 0; t < threads; ++t) {\n"
            + "      cos[t] = Co{};\n"
            + "      getcontext(&cos[t].ctx);\n"
            + "      cos[t].ctx.uc_stack.ss_sp = stacks[t].data();\n"
            + "      cos[t].ctx.uc_stack.ss_size = stacks[t].size();\n"
            + "      cos[t].ctx.uc_link = &sched_;\n"
            + "      makecontext(&cos[t].ctx, (void (*)())entry, 0);\n"
            + "    }\n"
            + "    args_ = a;\n"
            + "    for (bool live = true; live;) {\n"
            + "      live = false;\n"
            + "      bool all_wait = true;\n"
            + "      for (int t = 0; t < threads; ++t) {\n"
            + "        if (cos[t].done || cos[t].waiting) { all_wait &= cos[t].done || cos[t].waiting; live |= !cos[t].done; continue; }\n"
            + "        cur_ = t; threadIdx.x = t;\n"
            + "        swapcontext(&sched_, &cos[t].ctx);\n"
            + "        live |= !cos[t].done;\n"
            + "        all_wait &= cos[t].done || cos[t].waiting;\n"
            + "      }\n"
            + "      if (all_wait) for (auto& c : cos) c.waiting = false;\n"
            + "    }\n"
            + "  }\n}\n")
    lib = _build(code)
    arr = (ctypes.c_void_p * len(argv))(*argv)
    lib.launch(arr, -(-grid[0] // threadgroup[0]), threadgroup[0])
    return [mx.array(buf).view(mx.bfloat16) if dt == mx.bfloat16 else mx.array(buf) for buf, dt in outs]


def _contig(shape):
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


_built: dict = {}


def _build(code: str):
    """The compiled kernel (once per source in this process), from a private folder removed after loading."""
    key = hashlib.sha1(code.encode()).hexdigest()
    if key not in _built:
        d = Path(tempfile.mkdtemp(prefix="cuda_emulator_"))
        try:
            (d / "k.cpp").write_text(code)
            out = subprocess.run([shutil.which("g++") or "g++", "-O1", "-std=c++20", "-shared", "-fPIC",
                                  "-o", str(d / "k.so"), str(d / "k.cpp")], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"g++ failed:\n{out.stderr[-3000:]}")
            lib = ctypes.CDLL(str(d / "k.so"))
        finally:
            shutil.rmtree(d, ignore_errors=True)
        lib.launch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        _built[key] = lib
    return _built[key]


def cuda_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                atomic_outputs=False):
    """A stand-in for ``mx.fast.cuda_kernel`` whose kernels run here (inputs are evaluated first)."""
    def call(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
        return run(source, header, list(zip(input_names, inputs)),
                   list(zip(output_names, output_shapes, output_dtypes)), template, grid, threadgroup)
    return call
