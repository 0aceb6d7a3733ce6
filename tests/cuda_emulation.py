"""Run CUDA kernel source on the CPU, for tests on machines without a GPU.

The kernel text is compiled by g++ (C++20) after a header of stand-ins for the CUDA features the
kernels use: one std::thread per CUDA thread, CTAs one after another in a shuffled order (a CTA
that writes outside its share shows up even where the right CTA would overwrite it), `__syncthreads` a std::barrier
of the CTA, `__ldg` / `__ldcs` plain loads, `__byte_perm` in software, one static buffer for the
(dynamic) shared memory. It checks indexing, bounds and edge handling, not timing, and not what
differs on a GPU (memory ordering between CTAs, alignment faults). Slow: a few seconds per launch
of a few hundred CTAs.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

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
inline int max(int a, int b) { return a > b ? a : b; }
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;
inline thread_local std::barrier<>* cta_barrier = nullptr;
inline void __syncthreads() { cta_barrier->arrive_and_wait(); }
inline void launch(dim3 grid, unsigned threads, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    std::vector<unsigned> order(grid.x * grid.y);  // CTAs in a shuffled order: no CTA may rely on another's writes
    for (unsigned i = 0; i < order.size(); ++i) order[i] = i;
    std::mt19937 rng(12345);
    std::shuffle(order.begin(), order.end(), rng);
    for (unsigned cta : order) {
        const unsigned bx = cta % grid.x, by = cta / grid.x;
        std::barrier<> bar(threads);
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < threads; ++t)
            ts.emplace_back([&, t] { threadIdx = dim3{t, 0, 0}; blockIdx = dim3{bx, by, 0}; cta_barrier = &bar; body(); });
        for (auto& th : ts) th.join();
    }
}
"""


def compiler() -> str | None:
    """g++ when it builds a C++20 program with <barrier> (GCC >= 11), else None."""
    gxx = shutil.which("g++")
    if gxx is None:
        return None
    probe = subprocess.run([gxx, "-std=c++20", "-fsyntax-only", "-x", "c++", "-"], input="#include <barrier>\n",
                           capture_output=True, text=True)
    return gxx if probe.returncode == 0 else None


def build(source: str, workdir: Path) -> ctypes.CDLL:
    """Compile `source` (kernel text whose `#include <cuda_fp16.h>` is replaced by the shim, plus
    extern "C" launchers using `launch(grid, threads, body)`) into a shared library and load it."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "cuda_shim.h").write_text(SHIM)
    src = workdir / "emulated.cpp"
    src.write_text(source.replace("#include <cuda_fp16.h>", '#include "cuda_shim.h"'))
    lib = workdir / "libemulated.so"
    res = subprocess.run([compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-o", str(lib), str(src),
                          "-lpthread"], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-4000:])
    return ctypes.CDLL(str(lib))
