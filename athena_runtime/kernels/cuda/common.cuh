// Shared by the Athena CUDA kernels (lut.cu, frag.cu, dequant.cu, fold.cu). They are compiled at run time by NVRTC
// (athena_runtime/kernels/nvrtc.py), which has no C++ standard library: fixed-width integers are declared here,
// and fp16 comes from cuda_fp16.h (the nvidia-cuda-runtime wheel that PyTorch's CUDA builds install). The CPU
// emulation of the tests (tests/cuda_emulation.py, -DATHENA_CUDA_EMULATION) brings its own stand-ins.
// Only sm_80-class instructions (mma.sync, cp.async, ldmatrix): Ada (sm_89) and Hopper (sm_90) alike.
#pragma once

#if defined(ATHENA_CUDA_EMULATION)
#include "cuda_shim.h"
#else
#if defined(__CUDACC_RTC__)
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#else
#include <stdint.h>
#endif
#include <cuda_fp16.h>
#endif

// Diagnostic hooks, empty in the shipped build (nothing defines them there): a diagnostic build may define
// ATHENA_TRACE_MARK(i) to record thread 0's timestamp at phase i of a lookup-table CTA.
#ifndef ATHENA_TRACE_MARK
#define ATHENA_TRACE_MARK(i)
#endif

namespace athena {

constexpr int THREADS = 256;  // every kernel runs CTAs of 256 threads

// mma.sync m16n8k16, fp16 operands, fp32 accumulators; the CPU emulation exchanges the fragments through the CTA
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#ifndef ATHENA_CUDA_EMULATION
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    emulated_mma16816(c, a, b0, b1);
#endif
}

// the 4 rows of quad r4 (rows 4 r4 .. 4 r4 + 3) that lie in [row_start, row_end): [lo, hi)
struct Quad { int lo, hi; };
__device__ __forceinline__ Quad quad_rows(int r4, int row_start, int row_end) {
    return Quad{max(row_start - 4 * r4, 0), min(row_end - 4 * r4, 4)};
}

}  // namespace athena
