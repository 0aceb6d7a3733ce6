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
