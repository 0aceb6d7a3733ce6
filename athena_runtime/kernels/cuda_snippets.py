"""Device helpers shared by the CUDA kernels' sources: each kernel module splices the text it needs into its
own namespace (every kernel is a separate extension, built from its own source string)."""

# mma.sync m16n8k16, fp16 operands, fp32 accumulators (sm_80-class: Ada and Hopper); the CPU emulation of the
# tests (tests/cuda_emulation.py) swaps in an exchange through the CTA
MMA16816_SRC = r"""
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
"""

# a thread's quad of 4 consecutive rows, clipped to its CTA's rows
QUAD_SRC = r"""
// the 4 rows of quad r4 that lie in [row_start, row_end): [lo, hi)
struct Quad { int lo, hi; };
__device__ __forceinline__ Quad quad_rows(int r4, int row_start, int row_end) {
    return Quad{max(row_start - 4 * r4, 0), min(row_end - 4 * r4, 4)};
}
"""

# host side of every extension: the torch / CUDA headers, fp16 tensor data as 16-bit words, and the opt-in a launch
# needs for more than 48 KB of dynamic shared memory
HOST_PRELUDE_SRC = r"""
#include <torch/types.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace athena_host {

inline const uint16_t* half_ptr(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

// one per kernel (a static of the launcher): the dynamic shared memory each device has been opted in to
struct SmemOptIn { size_t bytes[64] = {}; };

// lets `kernel` launch with `bytes` of dynamic shared memory on the current device: asked once per device, again only
// for a larger size (48 KB and less need no opt-in)
template <typename Kernel>
void opt_in_smem(SmemOptIn& state, Kernel kernel, size_t bytes) {
    int dev = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    if (bytes > 48 * 1024 && (dev >= 64 || bytes > state.bytes[dev])) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
        if (dev < 64) state.bytes[dev] = bytes;
    }
}

}  // namespace athena_host
"""
