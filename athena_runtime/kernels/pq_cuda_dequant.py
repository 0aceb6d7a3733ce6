"""Ŵᵀ [M, N] as fp16 by a CUDA kernel, for the dequantize-then-cuBLAS path (prefill, many tokens).

    Ŵᵀ[D·j + l, i] = C[i // k, j, l, I[i, j]]      (a pure gather: the output is bit-exact)

The Triton kernel (`pq_gemm.pq_dequantize_t`) gathers centroids through L1 and runs at about a
third of copy bandwidth (H100). Here the gather reads shared memory, as in `pq_cuda.py`:

    CTA (row chunk, slab of SLAB_W index words), THREADS = 256; a chunk never crosses a codebook block
      1. the chunk's codebook lines for the slab's PER_WORD·SLAB_W groups -> shared memory, l-major
         as in the layout (for one (group, l) the n fp16 values are one 128-byte line at n = 64);
         the thread's index words for the first pass are requested before, so both latencies overlap
      2. passes of 1024 rows: a thread owns 4 consecutive rows (one int4 per word, streaming load);
         for each word w, slot s and coordinate l it looks up 4 values and writes them with one
         8-byte store to Ŵᵀ[D·j + l, 4q .. 4q+3]: a warp writes 256 contiguous bytes, and its 32
         lanes read one group's line, so the lookups are free of bank conflicts whatever the indices
Rows >= N and columns >= M are not written; neither are rows of a quad that belong to the
neighbouring chunk (a codebook block of k % 4 != 0 rows: those quads are written element-wise).

For the low-rank term of prefill ("rows", see `pq_gemm.pq_dequant_matmul`) the same launch can also
fill E more rows of a taller destination: out[M + e, i] = A[i, e] for e < r, 0 for r <= e < E (one
more grid column, about one slab's work), and `copy_pad_cols` builds [x | · | 0] for the GEMM.

Built with `load_inline` on first use (`cuda_build.InlineExtension`), for the (bits, d, slab) in
VARIANTS; sm_80-class instructions only (Ada and Hopper). The `*_reference` functions are the
PyTorch spec with the same signatures (and argument checks); they run on CPU.
"""
from __future__ import annotations

import functools

import torch

from athena_runtime.kernels.cuda_build import InlineExtension
from athena_runtime.kernels.cuda_snippets import HOST_PRELUDE_SRC, QUAD_SRC
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.pq_gemv import check_layer_tensors, num_sms

THREADS = 256  # a thread owns 4 consecutive rows: passes of 1024 rows
MIN_BLOCKS = 2  # __launch_bounds__(THREADS, 2): <= 128 registers (no spills, sm_89 / sm_90), 2 CTAs per SM
MAIN_RECIPE = (6, 2)  # (bits, d) of the default recipe: instantiated with several slab widths
MAIN_SLABS = (4, 8, 16)
SMEM_LIMIT = 48 * 1024  # codebook lines per CTA (the default dynamic shared-memory limit)
ROWS_CANDIDATES = (1024, 2048, 4096)  # rows per chunk the launch rule picks from (any multiple of 4 runs)
DEFAULT_ROWS_PER_CHUNK = 2048


def smem_bytes(bits: int, d: int, slab_w: int) -> int:
    return (32 // bits) * slab_w * d * (1 << bits) * 2


def _variants() -> list[tuple[int, int, int]]:
    """(BITS, D, SLAB_W): the main recipe with MAIN_SLABS; every other (b in 4/6/8, d in 1..4) with the
    widest of 8 / 4 words whose codebook lines fit SMEM_LIMIT."""
    out = {(*MAIN_RECIPE, s) for s in MAIN_SLABS}
    for bits in (4, 6, 8):
        for d in (1, 2, 3, 4):
            if (bits, d) != MAIN_RECIPE:
                out.add((bits, d, next(s for s in (8, 4) if smem_bytes(bits, d, s) <= SMEM_LIMIT)))
    return sorted(out)


VARIANTS = _variants()

_KERNEL_SRC = r"""
#include <cuda_fp16.h>
#include <stdint.h>

namespace athena_pq_dq {
constexpr int THREADS = @THREADS@, MIN_BLOCKS = @MIN_BLOCKS@;

// fp16 values travel as raw 16-bit patterns (the gather is a copy); two patterns -> one 32-bit word
__device__ __forceinline__ uint32_t pair(uint32_t lo, uint32_t hi) { return __byte_perm(lo, hi, 0x5410); }

""" + QUAD_SRC + r"""
// 4 values of rows 4 r4 .. 4 r4 + 3 -> dst (one 8-byte store when the quad is whole and aligned)
__device__ __forceinline__ void store_quad(uint16_t* dst, uint32_t v0, uint32_t v1, uint32_t v2, uint32_t v3,
                                           bool whole, Quad q) {
    if (whole) {
        *reinterpret_cast<uint2*>(dst) = make_uint2(pair(v0, v1), pair(v2, v3));
    } else {
        const uint32_t v[4] = {v0, v1, v2, v3};
#pragma unroll
        for (int r = 0; r < 4; ++r)
            if (r >= q.lo && r < q.hi) dst[r] = (uint16_t)v[r];
    }
}

// Byte offset of entry (word >> s b) & (NC - 1) in a codebook line of NC fp16 values.
template <int BITS>
__device__ __forceinline__ uint32_t entry_offset(uint32_t word, int s) {
    constexpr uint32_t MASK = 2 * ((1u << BITS) - 1);
    return s == 0 ? (word << 1) & MASK : (word >> (s * BITS - 1)) & MASK;
}

// Slot s of the slab's words for a whole, aligned quad whose D SLAB_W columns col_s .. are all < M:
// out[col_s + D w + l, 4 r4 .. 4 r4 + 3] = C[l][entry of word w], one 8-byte store each (no tests).
template <int BITS, int D, int SLAB_W>
__device__ __forceinline__ void dequant_slot(const int4 (&words)[SLAB_W], int s, const char* tab_s, uint16_t* dst,
                                             long long stride_out) {
    constexpr int NC = 1 << BITS;
#pragma unroll
    for (int w = 0; w < SLAB_W; ++w) {
        const int4 wq = words[w];
        const uint32_t off0 = entry_offset<BITS>(wq.x, s), off1 = entry_offset<BITS>(wq.y, s);
        const uint32_t off2 = entry_offset<BITS>(wq.z, s), off3 = entry_offset<BITS>(wq.w, s);
#pragma unroll
        for (int l = 0; l < D; ++l) {
            const char* tab = tab_s + (w * D + l) * NC * 2;  // compile-time offset from the slot's lines
            const uint32_t v0 = *reinterpret_cast<const uint16_t*>(tab + off0);
            const uint32_t v1 = *reinterpret_cast<const uint16_t*>(tab + off1);
            const uint32_t v2 = *reinterpret_cast<const uint16_t*>(tab + off2);
            const uint32_t v3 = *reinterpret_cast<const uint16_t*>(tab + off3);
            *reinterpret_cast<uint2*>(dst) = make_uint2(pair(v0, v1), pair(v2, v3));
            dst += stride_out;
        }
    }
}

// Any quad, slots s_first .. PER_WORD - 1: columns >= M skipped, partial or unaligned quads written
// element-wise. Loops not unrolled and words re-read (L2): only edge quads and the one slot that
// straddles column M come here.
template <int BITS, int D, int SLAB_W>
__device__ __noinline__ void dequant_quad_edges(const int4* __restrict__ qw4, int N4, int r4, int s_first,
                                                const char* cb_bytes, uint16_t* o, long long stride_out,
                                                int GW, int w0, int M, bool whole, Quad q) {
    constexpr int NC = 1 << BITS, PER_WORD = 32 / BITS;
#pragma unroll 1
    for (int w = 0; w < SLAB_W; ++w) {
        const int4 wq = __ldg(qw4 + (size_t)(w0 + w) * N4 + r4);
#pragma unroll 1
        for (int s = s_first; s < PER_WORD; ++s) {
            const uint32_t off0 = entry_offset<BITS>(wq.x, s), off1 = entry_offset<BITS>(wq.y, s);
            const uint32_t off2 = entry_offset<BITS>(wq.z, s), off3 = entry_offset<BITS>(wq.w, s);
#pragma unroll 1
            for (int l = 0; l < D; ++l) {
                const int col = D * (s * GW + w0 + w) + l;
                if (col >= M) break;
                const char* tab = cb_bytes + ((s * SLAB_W + w) * D + l) * NC * 2;
                store_quad(o + (size_t)col * stride_out, *reinterpret_cast<const uint16_t*>(tab + off0),
                           *reinterpret_cast<const uint16_t*>(tab + off1), *reinterpret_cast<const uint16_t*>(tab + off2),
                           *reinterpret_cast<const uint16_t*>(tab + off3), whole, q);
            }
        }
    }
}

// The launch grid (Nb * chunks_per_blk, GW / slab_w [+ 1 when extra_rows > 0]): chunks of rows_per_chunk
// rows that never cross a codebook block of k_rows rows; the extra column writes the rows below Ŵᵀ.
inline dim3 dequant_grid(int N, int k_rows, int rows_per_chunk, int GW, int slab_w, int extra_rows, int* chunks_per_blk) {
    const int k_eff = k_rows < N ? k_rows : N;
    *chunks_per_blk = (k_eff + rows_per_chunk - 1) / rows_per_chunk;
    return dim3((unsigned)(*chunks_per_blk * ((N + k_rows - 1) / k_rows)), (unsigned)(GW / slab_w + (extra_rows > 0 ? 1 : 0)), 1);
}

// grid `dequant_grid`, THREADS threads, PER_WORD * SLAB_W * D * NC * 2 bytes of dynamic shared memory.
// Module docstring: the algorithm.
template <int BITS, int D, int SLAB_W>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) pq_dequant_t_kernel(
    const int* __restrict__ qweight, int N_pad,                    // [GW, N_pad] int32
    const uint16_t* __restrict__ codebook, int G_pad,              // [Nb, G_pad, D, NC] fp16
    int N, int M, int GW, int k_rows, int chunks_per_blk, int rows_per_chunk,
    uint16_t* __restrict__ out, long long stride_out,              // Ŵᵀ [M, N], rows stride_out apart
    const uint16_t* __restrict__ lr_a, int stride_an, int rank,    // A [N, rank] (rank % 8 == 0) or null
    int extra_rows)                                                // out[M + e, i], e < extra_rows
{
    constexpr int NC = 1 << BITS, PER_WORD = 32 / BITS;
    constexpr int SEG = SLAB_W * D * NC / 8;                       // int4 per slot's codebook lines
    extern __shared__ __align__(16) uint16_t cb_s[];               // [PER_WORD][SLAB_W][D][NC]

    const int slab = blockIdx.y, w0 = slab * SLAB_W;
    const int blk = blockIdx.x / chunks_per_blk;
    const int row_start = blk * k_rows + (blockIdx.x % chunks_per_blk) * rows_per_chunk;
    const int row_end = min(min(row_start + rows_per_chunk, (blk + 1) * k_rows), N);
    // 8-byte stores need 8-byte aligned rows; otherwise every quad is written element-wise
    const bool vec_ok = (stride_out % 4 == 0) && (reinterpret_cast<uintptr_t>(out) % 8 == 0);
    int r4 = row_start / 4 + (int)threadIdx.x;

    if (w0 >= GW) {  // ---- the extra column: out[M + e, i] = A[i, e] (e < rank), 0 (rank <= e < extra_rows)
        for (; 4 * r4 < row_end; r4 += THREADS) {
            const Quad q = quad_rows(r4, row_start, row_end);
            const bool whole = vec_ok && q.lo == 0 && q.hi == 4;
            uint16_t* o = out + (size_t)M * stride_out + 4 * (size_t)r4;
            for (int e0 = 0; e0 < extra_rows; e0 += 8) {
                uint32_t a[4][4];  // rows 4 r4 + r, ranks e0 .. e0 + 7 (two per word)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const uint4 v = (e0 < rank && r >= q.lo && r < q.hi)
                        ? __ldg(reinterpret_cast<const uint4*>(lr_a + (size_t)(4 * r4 + r) * stride_an + e0))
                        : make_uint4(0, 0, 0, 0);
                    a[r][0] = v.x; a[r][1] = v.y; a[r][2] = v.z; a[r][3] = v.w;
                }
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int sh = 16 * (e & 1);
                    if (e0 + e < extra_rows)
                        store_quad(o + (size_t)(e0 + e) * stride_out, (a[0][e / 2] >> sh) & 0xffff, (a[1][e / 2] >> sh) & 0xffff,
                                   (a[2][e / 2] >> sh) & 0xffff, (a[3][e / 2] >> sh) & 0xffff, whole, q);
                }
            }
        }
        return;
    }

    // ---- 1. this pass's index words (requested first), then the slab's codebook lines -> shared memory
    const int4* qw4 = reinterpret_cast<const int4*>(qweight);  // [GW, N_pad / 4]
    const int N4 = N_pad / 4;
    int4 cur[SLAB_W];
#pragma unroll
    for (int w = 0; w < SLAB_W; ++w)
        cur[w] = 4 * r4 < row_end ? __ldcs(qw4 + (size_t)(w0 + w) * N4 + r4) : make_int4(0, 0, 0, 0);
    {
        const int4* cb4 = reinterpret_cast<const int4*>(codebook + (size_t)blk * G_pad * D * NC);
        int4* dst = reinterpret_cast<int4*>(cb_s);
        for (int e = threadIdx.x; e < PER_WORD * SEG; e += THREADS) {
            const int s = e / SEG, o = e % SEG;  // slot s: groups s GW + w0 .. + SLAB_W - 1, contiguous
            dst[e] = __ldg(cb4 + (size_t)(s * GW + w0) * (D * NC / 8) + o);
        }
    }
    __syncthreads();

    // ---- 2. passes of THREADS quads; the next pass's words are requested before this pass's stores
    // when they fit in registers (SLAB_W <= 8)
    constexpr bool PREFETCH = SLAB_W <= 8;
    for (; 4 * r4 < row_end; r4 += THREADS) {
        const int nxt = r4 + THREADS;
        int4 nxt_words[PREFETCH ? SLAB_W : 1];
        if constexpr (PREFETCH) {
#pragma unroll
            for (int w = 0; w < SLAB_W; ++w)
                nxt_words[w] = 4 * nxt < row_end ? __ldcs(qw4 + (size_t)(w0 + w) * N4 + nxt) : make_int4(0, 0, 0, 0);
        }
        const Quad q = quad_rows(r4, row_start, row_end);
        const bool whole = vec_ok && q.lo == 0 && q.hi == 4;
        uint16_t* o = out + 4 * (size_t)r4;
        if (whole) {
#pragma unroll
            for (int s = 0; s < PER_WORD; ++s) {
                const int col_s = D * (s * GW + w0);  // the slot's D SLAB_W columns start here (uniform)
                if (col_s + D * SLAB_W <= M) {
                    dequant_slot<BITS, D, SLAB_W>(cur, s, reinterpret_cast<const char*>(cb_s) + s * SLAB_W * D * NC * 2,
                                                  o + (size_t)col_s * stride_out, stride_out);
                } else {  // this slot straddles column M (one slab of the layer) or is padding; later ones too
                    if (col_s < M)
                        dequant_quad_edges<BITS, D, SLAB_W>(qw4, N4, r4, s, reinterpret_cast<const char*>(cb_s), o,
                                                            stride_out, GW, w0, M, whole, q);
                    break;
                }
            }
        } else {
            dequant_quad_edges<BITS, D, SLAB_W>(qw4, N4, r4, 0, reinterpret_cast<const char*>(cb_s), o, stride_out,
                                                GW, w0, M, whole, q);
        }
#pragma unroll
        for (int w = 0; w < SLAB_W; ++w) {
            if constexpr (PREFETCH) cur[w] = nxt_words[w];
            else cur[w] = 4 * nxt < row_end ? __ldcs(qw4 + (size_t)(w0 + w) * N4 + nxt) : make_int4(0, 0, 0, 0);
        }
    }
}

// dst[t, c] = src[t, c] for c < M; dst[t, c] = 0 for zero_from <= c < K (columns M .. zero_from untouched).
// grid-stride over rows; 16-byte vectors when every row start is 16-byte aligned
__global__ void __launch_bounds__(THREADS) copy_pad_cols_kernel(
    const uint16_t* __restrict__ src, long long stride_src, uint16_t* __restrict__ dst, long long stride_dst,
    int T, int M, int zero_from, int K)
{
    const bool vec = M % 8 == 0 && zero_from % 8 == 0 && K % 8 == 0 && stride_src % 8 == 0 && stride_dst % 8 == 0
                     && reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0;
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const uint16_t* s = src + (size_t)t * stride_src;
        uint16_t* d = dst + (size_t)t * stride_dst;
        if (vec) {
            const uint4* s4 = reinterpret_cast<const uint4*>(s);
            uint4* d4 = reinterpret_cast<uint4*>(d);
            constexpr int U = 4;  // loads issued together
            for (int c = threadIdx.x; c < M / 8; c += U * THREADS) {
                uint4 v[U];
#pragma unroll
                for (int u = 0; u < U; ++u)
                    if (c + u * THREADS < M / 8) v[u] = __ldcs(s4 + c + u * THREADS);
#pragma unroll
                for (int u = 0; u < U; ++u)
                    if (c + u * THREADS < M / 8) d4[c + u * THREADS] = v[u];
            }
            for (int c = zero_from / 8 + threadIdx.x; c < K / 8; c += THREADS) d4[c] = make_uint4(0, 0, 0, 0);
        } else {
            for (int c = threadIdx.x; c < M; c += THREADS) d[c] = s[c];
            for (int c = zero_from + threadIdx.x; c < K; c += THREADS) d[c] = 0;
        }
    }
}

}  // namespace athena_pq_dq
"""

_HOST_SRC_HEAD = HOST_PRELUDE_SRC + r"""

namespace athena_pq_dq {

using athena_host::half_ptr;

struct DequantArgs {
    const int* qweight; int N_pad;
    const uint16_t* codebook; int G_pad;
    int N, M, GW, k_rows, rows_per_chunk;
    uint16_t* out; long long stride_out;
    const uint16_t* lr_a; int stride_an, rank, extra_rows;
    int chunks_per_blk;  // set by dequant_grid
};

template <int BITS, int D, int SLAB_W>
void launch_dequant(DequantArgs a, cudaStream_t stream) {
    constexpr size_t smem = (size_t)(32 / BITS) * SLAB_W * D * (1 << BITS) * 2;
    static_assert(smem <= 48 * 1024, "codebook lines must fit the default shared-memory limit");
    const dim3 grid = dequant_grid(a.N, a.k_rows, a.rows_per_chunk, a.GW, SLAB_W, a.extra_rows, &a.chunks_per_blk);
    pq_dequant_t_kernel<BITS, D, SLAB_W><<<grid, THREADS, smem, stream>>>(
        a.qweight, a.N_pad, a.codebook, a.G_pad, a.N, a.M, a.GW, a.k_rows, a.chunks_per_blk, a.rows_per_chunk,
        a.out, a.stride_out, a.lr_a, a.stride_an, a.rank, a.extra_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void pq_dequant_t(torch::Tensor qweight, torch::Tensor codebook, torch::Tensor out, torch::Tensor lr_a,
                  int64_t N, int64_t M, int64_t k_rows, int64_t rows_per_chunk, int64_t bits, int64_t slab_w,
                  int64_t extra_rows) {
    TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == torch::kInt && qweight.dim() == 2 && qweight.is_contiguous()
                && qweight.size(1) % 4 == 0 && qweight.size(1) >= N, "qweight: int32 [GW, N_pad]");
    TORCH_CHECK(codebook.scalar_type() == torch::kHalf && codebook.dim() == 4 && codebook.is_contiguous()
                && codebook.size(3) == (1 << bits) && codebook.size(2) <= 4 && codebook.size(1) == (32 / bits) * qweight.size(0)
                && codebook.size(0) == (N + k_rows - 1) / k_rows, "codebook: fp16 [Nb, G_pad, d <= 4, 2^bits]");
    TORCH_CHECK(out.scalar_type() == torch::kHalf && out.dim() == 2 && out.stride(1) == 1 && out.size(1) == N
                && out.size(0) >= M + extra_rows, "out: fp16 [>= M + extra_rows, N], rows contiguous");
    TORCH_CHECK(qweight.size(0) % slab_w == 0 && rows_per_chunk % 4 == 0 && rows_per_chunk > 0, "slab_w / rows_per_chunk");
    const bool has_lr = lr_a.numel() > 0;
    if (has_lr)
        TORCH_CHECK(lr_a.scalar_type() == torch::kHalf && lr_a.dim() == 2 && lr_a.stride(1) == 1 && lr_a.size(0) == N
                    && lr_a.size(1) % 8 == 0 && lr_a.stride(0) % 8 == 0 && (uintptr_t)lr_a.data_ptr() % 16 == 0,
                    "lowrank_a: fp16 [N, r], r and row stride multiples of 8, 16-byte aligned");
    const c10::cuda::CUDAGuard guard(qweight.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(qweight.device().index()).stream();
    DequantArgs a{qweight.data_ptr<int>(), (int)qweight.size(1), half_ptr(codebook), (int)codebook.size(1),
                  (int)N, (int)M, (int)qweight.size(0), (int)k_rows, (int)rows_per_chunk,
                  reinterpret_cast<uint16_t*>(out.data_ptr<at::Half>()), (long long)out.stride(0),
                  has_lr ? half_ptr(lr_a) : nullptr, has_lr ? (int)lr_a.stride(0) : 0, has_lr ? (int)lr_a.size(1) : 0,
                  (int)extra_rows, 0};
    const int D = (int)codebook.size(2);
"""

_HOST_SRC_TAIL = r"""
    TORCH_CHECK(false, "pq_dequant_t: no instantiation for bits=", bits, " d=", D, " slab_w=", slab_w);
}

void copy_pad_cols(torch::Tensor src, torch::Tensor dst, int64_t zero_from) {
    TORCH_CHECK(src.is_cuda() && src.scalar_type() == torch::kHalf && dst.scalar_type() == torch::kHalf && src.dim() == 2
                && dst.dim() == 2 && src.stride(1) == 1 && dst.stride(1) == 1 && src.size(0) == dst.size(0)
                && src.size(1) <= zero_from && zero_from <= dst.size(1), "copy_pad_cols: fp16 src [T, M], dst [T, K]");
    const int T = (int)src.size(0);
    if (T == 0) return;
    const c10::cuda::CUDAGuard guard(src.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(src.device().index()).stream();
    const unsigned grid = (unsigned)std::min<int64_t>(T, 65535);
    copy_pad_cols_kernel<<<grid, THREADS, 0, stream>>>(half_ptr(src), (long long)src.stride(0),
        reinterpret_cast<uint16_t*>(dst.data_ptr<at::Half>()), (long long)dst.stride(0), T, (int)src.size(1),
        (int)zero_from, (int)dst.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace athena_pq_dq

void pq_dequant_t(torch::Tensor qweight, torch::Tensor codebook, torch::Tensor out, torch::Tensor lr_a,
                  int64_t N, int64_t M, int64_t k_rows, int64_t rows_per_chunk, int64_t bits, int64_t slab_w,
                  int64_t extra_rows) {
    athena_pq_dq::pq_dequant_t(qweight, codebook, out, lr_a, N, M, k_rows, rows_per_chunk, bits, slab_w, extra_rows);
}

void copy_pad_cols(torch::Tensor src, torch::Tensor dst, int64_t zero_from) {
    athena_pq_dq::copy_pad_cols(src, dst, zero_from);
}
"""

_CPP_DECL = """
void pq_dequant_t(torch::Tensor qweight, torch::Tensor codebook, torch::Tensor out, torch::Tensor lr_a,
                  int64_t N, int64_t M, int64_t k_rows, int64_t rows_per_chunk, int64_t bits, int64_t slab_w,
                  int64_t extra_rows);
void copy_pad_cols(torch::Tensor src, torch::Tensor dst, int64_t zero_from);
"""


def _kernels() -> str:
    return _KERNEL_SRC.replace("@THREADS@", str(THREADS)).replace("@MIN_BLOCKS@", str(MIN_BLOCKS))


def kernel_source() -> str:
    """The kernels alone (no torch headers) with every variant instantiated: for a standalone nvcc check
    (`nvcc -arch=sm_89 -Xptxas -v -c`, see tests/test_pq_cuda_dequant.py for the command)."""
    inst = "\n".join(f"template __global__ void athena_pq_dq::pq_dequant_t_kernel<{b}, {d}, {s}>("
                     "const int*, int, const uint16_t*, int, int, int, int, int, int, int, uint16_t*, long long, "
                     "const uint16_t*, int, int, int);" for b, d, s in VARIANTS)
    return _kernels() + "\n" + inst + "\n"


def cuda_source() -> str:
    """The whole .cu translation unit (kernels, host launchers, dispatch over VARIANTS)."""
    dispatch = "\n".join(f"    if (bits == {b} && D == {d} && slab_w == {s}) return launch_dequant<{b}, {d}, {s}>(a, stream);"
                         for b, d, s in VARIANTS)
    return _kernels() + _HOST_SRC_HEAD + dispatch + _HOST_SRC_TAIL


EXTENSION = InlineExtension("athena_pq_dequant", f"the CUDA PQ dequantize kernel ({len(VARIANTS)} variants)", _CPP_DECL,
                            cuda_source, ["pq_dequant_t", "copy_pad_cols"])


# ----------------------------------------------------------------------------------- launch shape

@functools.lru_cache(maxsize=1024)
def supports(geo: PQGeometry, dtype: torch.dtype = torch.float16) -> bool:
    """Whether an instantiated variant serves this layer (fp16 output)."""
    return dtype == torch.float16 and any((b, d) == (geo.bits, geo.d) for b, d, _ in VARIANTS)


def usable(geo: PQGeometry, dtype: torch.dtype = torch.float16) -> bool:
    """`supports` and the extension builds here (built on the first call; a failure is logged once)."""
    return supports(geo, dtype) and EXTENSION.available()


def n_ctas(geo: PQGeometry, slab_w: int, rows_per_chunk: int) -> int:
    return geo.Nb * -(-min(geo.k, geo.N) // rows_per_chunk) * (geo.GW // slab_w)


@functools.lru_cache(maxsize=1024)
def choose_launch(geo: PQGeometry, n_sms: int) -> tuple[int, int]:
    """(slab_w, rows_per_chunk) by a rule to be replaced by measurements: all CTAs resident at once (no
    partial last wave) with at least one per SM, as many as that allows (more warps to hide latency),
    ties to taller chunks (the codebook lines staged per CTA are a fraction n / rows of its output);
    layers too small or too large for that get the most CTAs, or 8-word slabs of 2048 rows."""
    slabs = [s for b, d, s in VARIANTS if (b, d) == (geo.bits, geo.d) and geo.GW % s == 0]
    if not slabs:
        raise ValueError(f"pq_dequantize_t_cuda: no variant for bits={geo.bits} d={geo.d}")
    resident = MIN_BLOCKS * n_sms
    cands = [(n_ctas(geo, s, r), r, s) for s in slabs for r in ROWS_CANDIDATES]
    fits = [c for c in cands if n_sms <= c[0] <= resident]
    if fits:
        _, r, s = max(fits)
    elif all(c[0] < n_sms for c in cands):
        _, r, s = max(cands, key=lambda c: (c[0], -c[1]))
    else:
        s = 8 if 8 in slabs else slabs[0]
        r = DEFAULT_ROWS_PER_CHUNK
    return s, r


# ----------------------------------------------------------------------------------- wrappers
def check_args(qweight, codebook, geo: PQGeometry, dtype, out, stacked_a) -> tuple[int, int]:
    """Argument checks shared by the kernel wrapper and its reference; returns out's shape (K, N)."""
    check_layer_tensors(qweight, codebook, geo)
    if dtype != torch.float16 or codebook.dtype != torch.float16:
        raise ValueError(f"pq_dequantize_t_cuda writes fp16 from an fp16 codebook, got {dtype} / {codebook.dtype}")
    r = 0
    if stacked_a is not None:
        if stacked_a.dim() != 2 or stacked_a.shape[0] != geo.N:
            raise ValueError(f"stacked_a must be A [{geo.N}, r], got {tuple(stacked_a.shape)}")
        r = stacked_a.shape[1]
    K = geo.M + r if out is None else out.shape[0]
    if out is not None and (out.dim() != 2 or out.shape[1] != geo.N or out.shape[0] < geo.M + r
                            or out.stride(1) != 1 or out.dtype != torch.float16):
        raise ValueError(f"out must be a row-contiguous fp16 [K >= {geo.M + r}, {geo.N}] tensor, got "
                         f"{out.dtype} {tuple(out.shape)} strides {tuple(out.stride())}")
    if out is not None and stacked_a is None and out.shape[0] != geo.M:
        raise ValueError(f"out must be [{geo.M}, {geo.N}] without stacked_a, got {tuple(out.shape)}")
    devices = {t.device for t in (qweight, codebook, out, stacked_a) if t is not None}
    if len(devices) != 1:
        raise ValueError("all operands must be on one device")
    return K, geo.N


def pq_dequantize_t_cuda_reference(qweight, codebook, geo: PQGeometry, dtype=torch.float16, *, out=None,
                                   stacked_a=None, slab_w: int | None = None, rows_per_chunk: int | None = None):
    """The spec of `pq_dequantize_t_cuda` in PyTorch (any device): out[:M] = Ŵᵀ, and with stacked_a = A
    [N, r] also out[M:M + r] = Aᵀ, out[M + r:] = 0. Launch arguments are accepted and ignored."""
    K, N = check_args(qweight, codebook, geo, dtype, out, stacked_a)
    Wt = torch.empty(K, N, device=qweight.device, dtype=dtype) if out is None else out
    from athena_runtime.kernels.pq_gemm import pq_dequantize_t_reference
    Wt[: geo.M] = pq_dequantize_t_reference(qweight, codebook, geo, dtype)
    if stacked_a is not None:
        r = stacked_a.shape[1]
        Wt[geo.M: geo.M + r] = stacked_a.t().to(dtype)
        Wt[geo.M + r:] = 0
    return Wt


def pq_dequantize_t_cuda(qweight, codebook, geo: PQGeometry, dtype=torch.float16, *, out=None, stacked_a=None,
                         slab_w: int | None = None, rows_per_chunk: int | None = None):
    """Ŵᵀ [M, N] fp16 by the CUDA kernel, same contract as `pq_gemm.pq_dequantize_t` without the low-rank
    fold: `out` an optional row-contiguous destination (e.g. the top rows of a taller buffer). With
    `stacked_a` = A [N, r], `out` is [K >= M + r, N] and gets [Ŵᵀ; Aᵀ; 0] in the same launch (the
    weight of the "rows" low-rank GEMM). slab_w / rows_per_chunk: launch shape (default `choose_launch`)."""
    K, N = check_args(qweight, codebook, geo, dtype, out, stacked_a)
    if qweight.device.type != "cuda":
        raise ValueError("pq_dequantize_t_cuda needs CUDA tensors (the reference runs anywhere)")
    if not supports(geo, dtype):
        raise ValueError(f"pq_dequantize_t_cuda: no variant for bits={geo.bits} d={geo.d}")
    auto_s, auto_r = choose_launch(geo, num_sms(qweight.device))
    slab_w, rows_per_chunk = slab_w or auto_s, rows_per_chunk or auto_r
    if (geo.bits, geo.d, slab_w) not in VARIANTS or geo.GW % slab_w:
        raise ValueError(f"no CUDA dequantize variant for bits={geo.bits} d={geo.d} slab_w={slab_w} (GW={geo.GW})")
    if rows_per_chunk % 4 or rows_per_chunk <= 0:
        raise ValueError(f"rows_per_chunk must be a positive multiple of 4, got {rows_per_chunk}")
    Wt = torch.empty(K, N, device=qweight.device, dtype=dtype) if out is None else out
    if stacked_a is None:
        a = torch.empty(0, device=qweight.device, dtype=torch.float16)
    else:  # the kernel reads 8 ranks per 16-byte load: pad r to a multiple of 8 (zeros) where needed
        a = stacked_a.to(torch.float16)
        if a.shape[1] % 8 or a.stride(1) != 1 or a.stride(0) % 8 or a.data_ptr() % 16:
            a = torch.nn.functional.pad(a, (0, -a.shape[1] % 8)).contiguous()
    EXTENSION.load().pq_dequant_t(qweight, codebook, Wt, a, geo.N, geo.M, geo.k, rows_per_chunk, geo.bits, slab_w,
                                  K - geo.M if stacked_a is not None else 0)
    return Wt


def copy_pad_cols_reference(x, xu, zero_from: int):
    """xu[:, :M] = x, xu[:, zero_from:] = 0 (columns M .. zero_from are left as they are)."""
    _check_copy(x, xu, zero_from)
    xu[:, : x.shape[1]] = x
    xu[:, zero_from:] = 0
    return xu


def copy_pad_cols(x, xu, zero_from: int):
    """`copy_pad_cols_reference` in one CUDA launch (16-byte vectors where rows are aligned)."""
    _check_copy(x, xu, zero_from)
    if x.device.type != "cuda":
        raise ValueError("copy_pad_cols needs CUDA tensors")
    EXTENSION.load().copy_pad_cols(x, xu, zero_from)
    return xu


def _check_copy(x, xu, zero_from):
    if x.dim() != 2 or xu.dim() != 2 or x.shape[0] != xu.shape[0] or not x.shape[1] <= zero_from <= xu.shape[1]:
        raise ValueError(f"copy_pad_cols: x [T, M] into xu [T, K >= zero_from >= M], got {tuple(x.shape)}, "
                         f"{tuple(xu.shape)}, zero_from={zero_from}")
    if x.stride(1) != 1 or xu.stride(1) != 1 or x.dtype != xu.dtype or x.device != xu.device:
        raise ValueError("copy_pad_cols: row-contiguous tensors of one dtype and device")
    if x.device.type == "cuda" and x.dtype != torch.float16:
        raise ValueError(f"copy_pad_cols: the CUDA kernel copies fp16, got {x.dtype}")
