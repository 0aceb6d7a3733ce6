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

// Shared-memory loads at 32-bit addresses. NVRTC 13.0 (PyTorch's cu13 wheels) addresses shared memory through
// 64-bit pointers where nvcc and later NVRTCs use 32-bit ones: a 64-bit add more per access (lut_kernel<1, 6, 4>'s
// row loop: 616 SASS instructions against nvcc's 484). The hot gathers of lut.cu and dequant.cu load through
// `lds_u16<OFFSET>(a)` / `lds_half<OFFSET>(a)`: the entry at byte address a + OFFSET (a compile-time immediate, as
// nvcc would fold it). The CPU emulation: plain loads.
#ifndef ATHENA_CUDA_EMULATION
typedef uint32_t SmemAddr;
__device__ __forceinline__ SmemAddr smem_addr32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
template <int OFFSET>
__device__ __forceinline__ uint32_t lds_u16(SmemAddr a) {  // the 16 bits at byte address a + OFFSET
    unsigned short v;
    asm volatile("ld.shared.u16 %0, [%1+%2];" : "=h"(v) : "r"(a), "n"(OFFSET));
    return v;
}
template <int OFFSET>
__device__ __forceinline__ float lds_half(SmemAddr a) { return __half2float(__ushort_as_half((unsigned short)lds_u16<OFFSET>(a))); }
#else
typedef uintptr_t SmemAddr;
inline SmemAddr smem_addr32(const void* p) { return reinterpret_cast<uintptr_t>(p); }
template <int OFFSET>
inline uint32_t lds_u16(SmemAddr a) { return *reinterpret_cast<const uint16_t*>(a + OFFSET); }
template <int OFFSET>
inline float lds_half(SmemAddr a) { return __half2float(*reinterpret_cast<const __half*>(a + OFFSET)); }
#endif

// the 4 rows of quad r4 (rows 4 r4 .. 4 r4 + 3) that lie in [row_start, row_end): [lo, hi)
struct Quad { int lo, hi; };
__device__ __forceinline__ Quad quad_rows(int r4, int row_start, int row_end) {
    return Quad{max(row_start - 4 * r4, 0), min(row_end - 4 * r4, 4)};
}

}  // namespace athena
