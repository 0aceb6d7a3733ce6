"""Run CUDA kernel source on the CPU, for tests on machines without a GPU.

The runtime's kernel files (athena_runtime/kernels/cuda/*.cu) are compiled by g++ (C++20, -DATHENA_CUDA_EMULATION)
with a header of stand-ins for the
CUDA features the kernels use: one std::thread per CUDA thread, CTAs one after another in a shuffled order
(a CTA that writes outside its share shows up even where the right CTA would overwrite it; `launch`'s
`phases` keep groups of CTAs that later ones wait for in front), `__syncthreads` a std::barrier of the
CTA, `__shfl_xor_sync` an exchange through the CTA (valid where every thread of the CTA calls it at the
same point), `mma.sync` m16n8k16 by the same kind of exchange (`emulated_mma16816`), fp16 on `_Float16`,
`__ldg` / `__ldcs` / `__ldcg` plain loads, atomics from the compiler's builtins, `__byte_perm` in software, one
static buffer for the (dynamic) shared memory. It checks
indexing, bounds and edge handling, not timing, and not what differs on a GPU (memory ordering between
CTAs, alignment faults, fp16 rounding inside fused operations). Slow: a few seconds per launch of a few
hundred CTAs.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

from athena_runtime.kernels.nvrtc import SOURCE_DIR

SHIM = r"""
#pragma once
#include <cstdint>
#include <cstddef>
#include <algorithm>
#include <barrier>
#include <functional>
#include <random>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct int4 { int x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= (uint32_t)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
inline int min(int a, int b) { return a < b ? a : b; }
// fp16 (cuda_fp16.h) on _Float16: conversions round to nearest even; fused ops round once from fp32
typedef _Float16 __half;
struct __half2 { __half x, y; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float __half2float(__half h) { return (float)h; }
inline __half __float2half_rn(float f) { return (__half)f; }
inline __half2 __float2half2_rn(float f) { return {(__half)f, (__half)f}; }
inline __half2 __floats2half2_rn(float a, float b) { return {(__half)a, (__half)b}; }
inline __half2 __half2half2(__half h) { return {h, h}; }
inline float2 __half22float2(__half2 h) { return {(float)h.x, (float)h.y}; }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return {(__half)__builtin_fmaf((float)a.x, (float)b.x, (float)c.x),
            (__half)__builtin_fmaf((float)a.y, (float)b.y, (float)c.y)};
}
inline __half __hmul(__half a, __half b) { return (__half)((float)a * (float)b); }
inline float __expf(float x) { return __builtin_expf(x); }
template <class T> inline T __ldcg(const T* p) { return *p; }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int max(int a, int b) { return a > b ? a : b; }
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;
inline thread_local std::barrier<>* cta_barrier = nullptr;
inline void __syncthreads() { cta_barrier->arrive_and_wait(); }
inline thread_local float* shfl_buf = nullptr;  // one slot per thread of the CTA
// a warp shuffle as a CTA-wide exchange: right where every thread of the CTA calls it at the same point
inline float __shfl_xor_sync(unsigned, float v, int o) {
    shfl_buf[threadIdx.x] = v;
    __syncthreads();
    const float r = shfl_buf[threadIdx.x ^ (unsigned)o];
    __syncthreads();
    return r;
}
// mma.sync.m16n8k16.row.col.f32.f16.f16.f32 of a warp as a CTA-wide exchange (same rule as the shuffle): each
// thread posts its fragments (a0..a3, b0, b1), then computes its accumulators from its warp's 32 lanes
inline thread_local uint32_t* mma_buf = nullptr;  // 6 words per thread of the CTA
inline float half_bits(uint32_t w, int hi) {
    const uint16_t b = (uint16_t)(w >> (16 * hi));
    __half h;
    __builtin_memcpy(&h, &b, 2);
    return (float)h;
}
inline void emulated_mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    uint32_t* mine = mma_buf + 6 * threadIdx.x;
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    mine[4] = b0;
    mine[5] = b1;
    __syncthreads();
    const uint32_t* w = mma_buf + 6 * (threadIdx.x & ~31u);
    // A [16 x 16] row-major: a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..); B [16 x 8]:
    // b0 (2t.., g), b1 (2t + 8.., g); lane = 4 g + t, the lower half holds the lower index
    auto A = [&](int r, int k) {
        return half_bits(w[6 * (4 * (r % 8) + (k % 8) / 2) + (r >= 8) + 2 * (k >= 8)], k & 1);
    };
    auto B = [&](int k, int n) { return half_bits(w[6 * (4 * n + (k % 8) / 2) + 4 + (k >= 8)], k & 1); };
    const int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
        c[i] += sum;
    }
    __syncthreads();
}
// CTAs one after another in a shuffled order: no CTA may rely on another's writes, except across `phases`
// (1-D grids: CTAs [0, phases[0]) run before [phases[0], phases[1]), ..., each range shuffled), for kernels
// whose later CTAs wait for earlier ones
inline void launch(dim3 grid, unsigned threads, const std::function<void()>& body, std::vector<unsigned> phases = {}) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    std::vector<unsigned> order(grid.x * grid.y);
    for (unsigned i = 0; i < order.size(); ++i) order[i] = i;
    std::mt19937 rng(12345);
    phases.push_back((unsigned)order.size());
    unsigned lo = 0;
    for (unsigned hi : phases) {
        std::shuffle(order.begin() + lo, order.begin() + hi, rng);
        lo = hi;
    }
    std::vector<float> shfl(threads);
    std::vector<uint32_t> mma(6 * threads);
    for (unsigned cta : order) {
        const unsigned bx = cta % grid.x, by = cta / grid.x;
        std::barrier<> bar(threads);
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < threads; ++t)
            ts.emplace_back([&, t] { threadIdx = dim3{t, 0, 0}; blockIdx = dim3{bx, by, 0}; cta_barrier = &bar;
                                     shfl_buf = shfl.data(); mma_buf = mma.data(); body(); });
        for (auto& th : ts) th.join();
    }
}
"""


def compiler() -> str | None:
    """g++ when it builds a C++20 program with <barrier> and _Float16 (GCC >= 12 on x86-64), else None."""
    gxx = shutil.which("g++")
    if gxx is None:
        return None
    probe = subprocess.run(
        [gxx, "-std=c++20", "-fsyntax-only", "-x", "c++", "-"],
        input="#include <barrier>\n_Float16 h = (_Float16)1.0f;\n",
        capture_output=True,
        text=True,
    )
    return gxx if probe.returncode == 0 else None


def build(source: str, workdir: Path) -> ctypes.CDLL:
    """Compile `source` (`#include "lut.cu"` etc.: the runtime's kernel files, athena_runtime/kernels/cuda/, whose
    common.cuh then takes the shim instead of cuda_fp16.h; plus extern "C" launchers using `launch(grid, threads,
    body)`) into a shared library and load it."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "cuda_shim.h").write_text(SHIM)
    src = workdir / "emulated.cpp"
    src.write_text(source)
    lib = workdir / "libemulated.so"
    res = subprocess.run(
        [
            compiler(),
            "-std=c++20",
            "-O1",
            "-shared",
            "-fPIC",
            "-w",
            "-DATHENA_CUDA_EMULATION",
            f"-I{workdir}",
            f"-I{SOURCE_DIR}",
            "-o",
            str(lib),
            str(src),
            "-lpthread",
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise RuntimeError(res.stderr[-4000:])
    return ctypes.CDLL(str(lib))
