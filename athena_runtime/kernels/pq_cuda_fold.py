"""(Ŵ + A B)ᵀ [M, N] as fp16 in one CUDA launch: the prefill weight with the low-rank term folded in.

    out[c, i] = fp16( C[i // k, c // D, c % D, I[i, c // D]] + Σ_e A[i, e] B[e, c] )   (fp32 sum, one rounding)

The dequantize-then-cuBLAS path (`pq_gemm.pq_dequant_matmul`) otherwise pays for the low-rank term with
two or three more cuBLAS calls per layer (u = x Bᵀ, u Aᵀ, or an in-place pass over Ŵᵀ): GPU time, and
host time that a 2048-token call cannot hide (H100: ~30 µs of host per cuBLAS call, BENCHMARKS.md §3).
Here the r-term product rides in the dequantize on tensor cores, so prefill is this launch and one GEMM.

    CTA (row chunk, slab of SLAB_W = 8 index words), THREADS = 256, a chunk never crosses a codebook block
      1. the slab's codebook lines (all PER_WORD slots) and B's columns of those slots (transposed,
         [column][rank], rows padded by 8 halves: conflict-free fragment loads) -> shared memory; then
         each thread keeps its MMA A-operand fragments of B (every slot, all KS = rank / 16 k-steps) in
         registers for the CTA's whole life (re-reading them every round made the kernel shared-memory
         bound: 54 µs at 4096 x 4096 against 32 now, H100)
      2. rounds of 64 rows: (a) warp w takes rows 8w..8w+7 and, per slot and 16-column m-tile,
         mma.m16n8k16 (fp32) over the ranks gives Σ_e B[e, c] A[i, e] into a shared fp32 tile; its A
         rows (the MMA B operand) and the next round's index words are requested a round ahead;
         (b) a thread owns a quad of rows and one column of every slot, as in `pq_cuda_dequant`: it adds
         the tile's four values to its four codebook entries and writes them with one 8-byte store (a
         half-warp writes 128 contiguous bytes)
Rows outside the chunk and columns >= M are not written. Needs rank % 16 == 0 (`pq_linear` pads the
factors to 16) with B's fragments in at most FRAG_REGS registers (the 7B recipe: rank 48); `supports`
says which layers it serves (the others keep the "rows" / "addmm" modes, `pq_gemm`). sm_80-class instructions only
(mma.sync): Ada and Hopper alike. Built with `load_inline` on first use (`cuda_build.InlineExtension`).
"""
from __future__ import annotations

import functools
import math

import torch

from athena_runtime.kernels.cuda_build import InlineExtension
from athena_runtime.kernels.cuda_snippets import HOST_PRELUDE_SRC, MMA16816_SRC, QUAD_SRC
from athena_runtime.kernels.layout import PQGeometry, dequantize_reference
from athena_runtime.kernels.pq_gemv import check_layer_tensors, num_sms

THREADS = 256
SLAB_W = 8
ROUND_ROWS = 8 * THREADS // 32  # rows per round: 8 per warp
MAX_RANK = 64  # rank / 16 = KS k-steps, a template parameter: B's fragments stay in registers for the whole CTA
FRAG_REGS = 60  # ... at most this many registers of them (PER_WORD · m-tiles · KS · 4): 64 and more spill
SMEM_LIMIT = 96 * 1024  # per CTA (opt-in above 48 KB; Ada allows 99 KB, Hopper 227 KB)
ROWS_CANDIDATES = (512, 1024, 2048)
RECIPES = [(bits, d) for bits in (4, 6, 8) for d in (1, 2, 3, 4)]


def frag_regs(bits: int, d: int, ks: int) -> int:
    return (32 // bits) * -(-d * SLAB_W // 16) * ks * 4


VARIANTS = [(b, d, ks) for b, d in RECIPES for ks in range(1, MAX_RANK // 16 + 1) if frag_regs(b, d, ks) <= FRAG_REGS]


def smem_bytes(bits: int, d: int, rank: int) -> int:
    """Low-rank tile (fp32) + codebook lines + B's columns of one CTA."""
    per_word, cols = 32 // bits, d * SLAB_W
    m_tiles = -(-cols // 16)
    return (per_word * m_tiles * 16 * (ROUND_ROWS + 4) * 4 + per_word * SLAB_W * d * (1 << bits) * 2
            + per_word * m_tiles * 16 * (rank + 8) * 2)


_KERNEL_SRC = r"""
#include <cuda_fp16.h>
#include <stdint.h>

namespace athena_pq_fold {
constexpr int THREADS = @THREADS@, WARPS = THREADS / 32, SLAB_W = @SLAB_W@;
constexpr int RT = 8 * WARPS, LR_LD = RT + 4;  // rows per round (8 per warp), lr_s row stride (floats)

""" + QUAD_SRC + MMA16816_SRC + r"""
__device__ __forceinline__ float h2f(uint16_t bits) { return __half2float(*reinterpret_cast<const __half*>(&bits)); }
__device__ __forceinline__ uint16_t f2h(float v) {
    const __half h = __float2half_rn(v);
    return *reinterpret_cast<const uint16_t*>(&h);
}

// grid (Nb * chunks_per_blk, GW / SLAB_W), THREADS threads, `smem_bytes` of dynamic shared memory; two CTAs per SM
// (<= 128 registers: B's fragments stay in registers, VARIANTS keeps the variants without spills).
// Module docstring: the algorithm.
template <int BITS, int D, int KS>
__global__ void __launch_bounds__(THREADS, 2) pq_dequant_fold_t_kernel(
    const int* __restrict__ qweight, int N_pad,                    // [GW, N_pad] int32
    const uint16_t* __restrict__ codebook, int G_pad,              // [Nb, G_pad, D, NC] fp16
    int N, int M, int GW, int k_rows, int chunks_per_blk, int rows_per_chunk,
    const uint16_t* __restrict__ lr_a, int stride_an,              // A [N, rank] fp16
    const uint16_t* __restrict__ lr_b, int stride_be, int rank,    // B [rank, M] fp16, rank == 16 KS
    uint16_t* __restrict__ out, long long stride_out)              // (Ŵ + A B)ᵀ [M, N], rows stride_out apart
{
    constexpr int NC = 1 << BITS, PER_WORD = 32 / BITS, COLS = D * SLAB_W, MT = (COLS + 15) / 16;
    constexpr int SEG = SLAB_W * D * NC / 8;                       // int4 per slot's codebook lines
    constexpr int QR = RT / 4, ITEMS = (QR * COLS + THREADS - 1) / THREADS;  // quads per round, items per thread
    extern __shared__ __align__(16) uint16_t smem[];
    float* lr_s = reinterpret_cast<float*>(smem);                  // [PER_WORD][MT * 16][LR_LD] fp32
    uint16_t* cb_s = smem + 2 * PER_WORD * MT * 16 * LR_LD;        // [PER_WORD][SLAB_W][D][NC]
    uint16_t* b_s = cb_s + PER_WORD * SLAB_W * D * NC;             // [PER_WORD][MT * 16][rank + 8]
    const int RS = rank + 8;

    const int slab = blockIdx.y, w0 = slab * SLAB_W;
    const int blk = blockIdx.x / chunks_per_blk;
    const int row_start = blk * k_rows + (blockIdx.x % chunks_per_blk) * rows_per_chunk;
    const int row_end = min(min(row_start + rows_per_chunk, (blk + 1) * k_rows), N);

    // ---- 1. codebook lines and B's columns of the slab's slots -> shared memory; every load of a batch is issued
    // before its stores (one L2 round trip per batch, not one per element)
    {
        const int4* cb4 = reinterpret_cast<const int4*>(codebook + (size_t)blk * G_pad * D * NC);
        int4* dst = reinterpret_cast<int4*>(cb_s);
        constexpr int CB_N = PER_WORD * SEG, CB_U = (CB_N + THREADS - 1) / THREADS;
        int4 v[CB_U];
#pragma unroll
        for (int u = 0; u < CB_U; ++u) {
            const int e = threadIdx.x + u * THREADS, s = e / SEG, o = e % SEG;  // slot s: groups s GW + w0 .., contiguous
            if (e < CB_N) v[u] = __ldg(cb4 + (size_t)(s * GW + w0) * (D * NC / 8) + o);
        }
#pragma unroll
        for (int u = 0; u < CB_U; ++u)
            if (threadIdx.x + u * THREADS < CB_N) dst[threadIdx.x + u * THREADS] = v[u];
        // B octets: 8 columns of one rank of one slot (16-byte loads where aligned and inside M, else element-wise)
        constexpr int OCT = MT * 2, U = 4;
        const int n_oct = PER_WORD * rank * OCT;
        for (int e0 = threadIdx.x; e0 < n_oct; e0 += U * THREADS) {
            uint4 ov[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int e = e0 + u * THREADS, o = e % OCT, k = (e / OCT) % rank, s = e / (OCT * rank);
                const int c0 = 8 * o, col0 = D * (s * GW + w0) + c0;
                const uint16_t* src = lr_b + (size_t)k * stride_be + col0;
                if (e >= n_oct) {
                    ov[u] = make_uint4(0, 0, 0, 0);
                } else if (c0 + 8 <= COLS && col0 + 8 <= M && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
                    ov[u] = __ldg(reinterpret_cast<const uint4*>(src));
                } else {
                    uint32_t h[8];
#pragma unroll
                    for (int j = 0; j < 8; ++j) h[j] = (c0 + j < COLS && col0 + j < M) ? __ldg(src + j) : 0u;
                    ov[u] = make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16, h[6] | h[7] << 16);
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int e = e0 + u * THREADS;
                if (e >= n_oct) break;
                const int o = e % OCT, k = (e / OCT) % rank, s = e / (OCT * rank);
                uint16_t* d = b_s + (size_t)(s * MT * 16 + 8 * o) * RS + k;
                const uint32_t w[4] = {ov[u].x, ov[u].y, ov[u].z, ov[u].w};
#pragma unroll
                for (int j = 0; j < 8; ++j) d[(size_t)j * RS] = (uint16_t)(w[j / 2] >> (16 * (j & 1)));
            }
        }
    }
    __syncthreads();

    // ---- 2. rounds of RT = 8 WARPS rows (quad-aligned): (a) warp w's 8 rows x every slot's columns by mma -> lr_s
    // (fp32); (b) thread (quad q, column c of a slot) adds lr_s to its 4 codebook entries of every slot and writes
    // them with one 8-byte store (a warp: two columns x 128 contiguous bytes). The next round's index words and A
    // fragments are requested before this round's work.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int rb0 = row_start & ~3;
    const bool vec_ok = (stride_out % 4 == 0) && (reinterpret_cast<uintptr_t>(out) % 8 == 0);
    const int4* qw4 = reinterpret_cast<const int4*>(qweight);
    const int N4 = N_pad / 4;
    uint32_t bf[KS][2], nbf[KS][2];
    int4 wq[ITEMS], nwq[ITEMS];
    auto load_round = [&](int rb, uint32_t (&f)[KS][2], int4 (&w)[ITEMS]) {
        const int ar = rb + 8 * warp + g;  // this thread's row of A (MMA B operand)
        const bool arow = rb < row_end && ar < N;
        const uint16_t* ap = lr_a + (size_t)(arow ? ar : 0) * stride_an + 2 * t;
#pragma unroll
        for (int k = 0; k < KS; ++k) {
            f[k][0] = arow ? __ldg(reinterpret_cast<const uint32_t*>(ap + 16 * k)) : 0u;
            f[k][1] = arow ? __ldg(reinterpret_cast<const uint32_t*>(ap + 16 * k + 8)) : 0u;
        }
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {  // item e = (quad q = e % QR, column c = e / QR): word c / D of rows 4q..
            const int e = threadIdx.x + it * THREADS, q = e % QR, c = e / QR, r4 = rb / 4 + q;
            w[it] = (c < COLS && 4 * r4 < row_end) ? __ldcs(qw4 + (size_t)(w0 + c / D) * N4 + r4) : make_int4(0, 0, 0, 0);
        }
    };
    load_round(rb0, bf, wq);
    // MMA A operand (rows = the slots' columns, B transposed; cols = ranks), the same for every round: registers
    uint32_t af[PER_WORD][MT][KS][4];
#pragma unroll
    for (int s = 0; s < PER_WORD; ++s)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const uint16_t* bs = b_s + (size_t)(s * MT * 16 + 16 * mt + g) * RS + 2 * t;
#pragma unroll
            for (int k = 0; k < KS; ++k) {
                af[s][mt][k][0] = *reinterpret_cast<const uint32_t*>(bs + 16 * k);
                af[s][mt][k][1] = *reinterpret_cast<const uint32_t*>(bs + 8 * RS + 16 * k);
                af[s][mt][k][2] = *reinterpret_cast<const uint32_t*>(bs + 16 * k + 8);
                af[s][mt][k][3] = *reinterpret_cast<const uint32_t*>(bs + 8 * RS + 16 * k + 8);
            }
        }
    for (int rb = rb0; rb < row_end; rb += RT) {
        load_round(rb + RT, nbf, nwq);
        // (a) lr_s[slot column][row - rb] = Σ_e B[e, col] A[row, e], warp w: rows rb + 8w ..
#pragma unroll
        for (int s = 0; s < PER_WORD; ++s) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int k = 0; k < KS; ++k) mma16816(acc, af[s][mt][k], bf[k][0], bf[k][1]);
                // acc: [0], [1] (column 16 mt + g, rows 2t, 2t + 1 of the warp's 8), [2], [3] (column + 8)
                float* l0 = lr_s + (size_t)(s * MT * 16 + 16 * mt + g) * LR_LD + 8 * warp + 2 * t;
                *reinterpret_cast<float2*>(l0) = make_float2(acc[0], acc[1]);
                *reinterpret_cast<float2*>(l0 + 8 * LR_LD) = make_float2(acc[2], acc[3]);
            }
        }
        __syncthreads();
        // (b) codebook entries + lr_s -> out, one quad of rows and one column of every slot per item
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
            const int e = threadIdx.x + it * THREADS, q = e % QR, c = e / QR, r4 = rb / 4 + q;
            if (c >= COLS || 4 * r4 >= row_end) continue;
            const Quad qd = quad_rows(r4, row_start, row_end);
            const bool whole = vec_ok && qd.lo == 0 && qd.hi == 4;
            const uint32_t wd[4] = {(uint32_t)wq[it].x, (uint32_t)wq[it].y, (uint32_t)wq[it].z, (uint32_t)wq[it].w};
#pragma unroll
            for (int s = 0; s < PER_WORD; ++s) {
                const int col = D * (s * GW + w0) + c;
                if (col >= M) break;  // later slots lie further right
                const uint16_t* line = cb_s + ((s * SLAB_W + c / D) * D + c % D) * NC;
                const float4 lr = *reinterpret_cast<const float4*>(lr_s + (size_t)(s * MT * 16 + c) * LR_LD + 4 * q);
                const uint32_t v0 = f2h(lr.x + h2f(line[(wd[0] >> (s * BITS)) & (NC - 1)]));
                const uint32_t v1 = f2h(lr.y + h2f(line[(wd[1] >> (s * BITS)) & (NC - 1)]));
                const uint32_t v2 = f2h(lr.z + h2f(line[(wd[2] >> (s * BITS)) & (NC - 1)]));
                const uint32_t v3 = f2h(lr.w + h2f(line[(wd[3] >> (s * BITS)) & (NC - 1)]));
                uint16_t* dst = out + (size_t)col * stride_out + 4 * r4;
                if (whole) {
                    *reinterpret_cast<uint2*>(dst) = make_uint2(v0 | v1 << 16, v2 | v3 << 16);
                } else {
                    const uint32_t v[4] = {v0, v1, v2, v3};
#pragma unroll
                    for (int r = 0; r < 4; ++r)
                        if (r >= qd.lo && r < qd.hi) dst[r] = (uint16_t)v[r];
                }
            }
        }
        __syncthreads();  // lr_s is rewritten by the next round
#pragma unroll
        for (int k = 0; k < KS; ++k) {
            bf[k][0] = nbf[k][0];
            bf[k][1] = nbf[k][1];
        }
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) wq[it] = nwq[it];
    }
}

}  // namespace athena_pq_fold
"""

_HOST_SRC_HEAD = HOST_PRELUDE_SRC + r"""

namespace athena_pq_fold {

using athena_host::half_ptr;

struct FoldArgs {
    const int* qweight; int N_pad;
    const uint16_t* codebook; int G_pad;
    int N, M, GW, k_rows, chunks_per_blk, rows_per_chunk;
    const uint16_t* lr_a; int stride_an;
    const uint16_t* lr_b; int stride_be, rank;
    uint16_t* out; long long stride_out;
};

template <int BITS, int D, int KS>
void launch_fold(FoldArgs a, dim3 grid, cudaStream_t stream) {
    constexpr int NC = 1 << BITS, PER_WORD = 32 / BITS, MT = (D * SLAB_W + 15) / 16;
    const size_t smem = (size_t)PER_WORD * MT * 16 * LR_LD * 4 + (size_t)PER_WORD * SLAB_W * D * NC * 2
                        + (size_t)PER_WORD * MT * 16 * (a.rank + 8) * 2;
    TORCH_CHECK(smem <= @SMEM_LIMIT@, "pq_dequant_fold_t: ", smem, " bytes of shared memory (rank too large for this recipe)");
    static athena_host::SmemOptIn opted;  // per variant
    athena_host::opt_in_smem(opted, pq_dequant_fold_t_kernel<BITS, D, KS>, smem);
    pq_dequant_fold_t_kernel<BITS, D, KS><<<grid, THREADS, smem, stream>>>(
        a.qweight, a.N_pad, a.codebook, a.G_pad, a.N, a.M, a.GW, a.k_rows, a.chunks_per_blk, a.rows_per_chunk,
        a.lr_a, a.stride_an, a.lr_b, a.stride_be, a.rank, a.out, a.stride_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void pq_dequant_fold_t(torch::Tensor qweight, torch::Tensor codebook, torch::Tensor lr_a, torch::Tensor lr_b,
                       torch::Tensor out, int64_t N, int64_t M, int64_t k_rows, int64_t rows_per_chunk, int64_t bits) {
    TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == torch::kInt && qweight.dim() == 2 && qweight.is_contiguous()
                && qweight.size(1) >= N && qweight.size(0) % SLAB_W == 0, "qweight: int32 [GW, N_pad], GW % 8 == 0");
    TORCH_CHECK(codebook.scalar_type() == torch::kHalf && codebook.dim() == 4 && codebook.is_contiguous()
                && codebook.size(3) == (1 << bits) && codebook.size(2) <= 4 && codebook.size(1) == (32 / bits) * qweight.size(0)
                && codebook.size(0) == (N + k_rows - 1) / k_rows, "codebook: fp16 [Nb, G_pad, d <= 4, 2^bits]");
    TORCH_CHECK(lr_a.scalar_type() == torch::kHalf && lr_a.dim() == 2 && lr_a.size(0) == N && lr_a.stride(1) == 1
                && lr_a.stride(0) % 2 == 0 && (uintptr_t)lr_a.data_ptr() % 4 == 0, "lowrank_a: fp16 [N, r], 4-byte aligned rows");
    TORCH_CHECK(lr_b.scalar_type() == torch::kHalf && lr_b.dim() == 2 && lr_b.size(1) == M && lr_b.stride(1) == 1
                && lr_b.size(0) == lr_a.size(1), "lowrank_b: fp16 [r, M]");
    TORCH_CHECK(lr_a.size(1) % 16 == 0 && lr_a.size(1) > 0, "rank: a multiple of 16");
    TORCH_CHECK(out.scalar_type() == torch::kHalf && out.dim() == 2 && out.stride(1) == 1 && out.size(0) == M && out.size(1) == N,
                "out: fp16 [M, N], rows contiguous");
    TORCH_CHECK(rows_per_chunk % 8 == 0 && rows_per_chunk > 0, "rows_per_chunk: a positive multiple of 8");
    const c10::cuda::CUDAGuard guard(qweight.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(qweight.device().index()).stream();
    const int k_eff = k_rows < N ? (int)k_rows : (int)N, chunks = (k_eff + (int)rows_per_chunk - 1) / (int)rows_per_chunk;
    const dim3 grid((unsigned)(chunks * ((N + k_rows - 1) / k_rows)), (unsigned)(qweight.size(0) / SLAB_W), 1);
    FoldArgs a{qweight.data_ptr<int>(), (int)qweight.size(1), half_ptr(codebook), (int)codebook.size(1),
               (int)N, (int)M, (int)qweight.size(0), (int)k_rows, chunks, (int)rows_per_chunk,
               half_ptr(lr_a), (int)lr_a.stride(0), half_ptr(lr_b), (int)lr_b.stride(0), (int)lr_a.size(1),
               reinterpret_cast<uint16_t*>(out.data_ptr<at::Half>()), (long long)out.stride(0)};
    const int D = (int)codebook.size(2), KS = (int)(lr_a.size(1) / 16);
"""

_HOST_SRC_TAIL = r"""
    TORCH_CHECK(false, "pq_dequant_fold_t: no instantiation for bits=", bits, " d=", D, " rank=", 16 * KS);
}

}  // namespace athena_pq_fold

void pq_dequant_fold_t(torch::Tensor qweight, torch::Tensor codebook, torch::Tensor lr_a, torch::Tensor lr_b,
                       torch::Tensor out, int64_t N, int64_t M, int64_t k_rows, int64_t rows_per_chunk, int64_t bits) {
    athena_pq_fold::pq_dequant_fold_t(qweight, codebook, lr_a, lr_b, out, N, M, k_rows, rows_per_chunk, bits);
}
"""

_CPP_DECL = """
void pq_dequant_fold_t(torch::Tensor qweight, torch::Tensor codebook, torch::Tensor lr_a, torch::Tensor lr_b,
                       torch::Tensor out, int64_t N, int64_t M, int64_t k_rows, int64_t rows_per_chunk, int64_t bits);
"""


def kernel_source() -> str:
    """The device code alone (no torch headers): the emulated CPU tests and standalone nvcc checks."""
    return (_KERNEL_SRC.replace("@THREADS@", str(THREADS)).replace("@SLAB_W@", str(SLAB_W))
            )


def cuda_source() -> str:
    dispatch = "\n".join(f"    if (bits == {b} && D == {d} && KS == {ks}) return launch_fold<{b}, {d}, {ks}>(a, grid, stream);"
                         for b, d, ks in VARIANTS)
    return kernel_source() + (_HOST_SRC_HEAD + dispatch + _HOST_SRC_TAIL).replace("@SMEM_LIMIT@", str(SMEM_LIMIT))


EXTENSION = InlineExtension("athena_pq_fold", f"the CUDA PQ dequantize with the low-rank fold ({len(VARIANTS)} variants)",
                            _CPP_DECL, cuda_source, ["pq_dequant_fold_t"])


@functools.lru_cache(maxsize=1024)
def _supports(geo: PQGeometry, rank: int) -> bool:
    return ((geo.bits, geo.d, rank // 16) in VARIANTS and geo.GW % SLAB_W == 0 and rank % 16 == 0
            and smem_bytes(geo.bits, geo.d, rank) <= SMEM_LIMIT)


def supports(geo: PQGeometry, rank: int, dtype: torch.dtype = torch.float16) -> bool:
    """Whether the kernel serves this layer: fp16, an instantiated (recipe, rank / 16) (ranks up to MAX_RANK where
    B's fragments fit FRAG_REGS registers), shared memory fits."""
    return dtype == torch.float16 and _supports(geo, rank)


def usable(geo: PQGeometry, rank: int, dtype: torch.dtype = torch.float16) -> bool:
    """`supports` and the extension builds here (built on first use; a failure is logged once)."""
    return supports(geo, rank, dtype) and EXTENSION.available()


@functools.lru_cache(maxsize=1024)
def choose_rows(geo: PQGeometry, n_sms: int) -> int:
    """Rows per chunk with the fullest last wave (CTAs / slots over its ceiling, 2 CTAs per SM), ties (within 0.02)
    to taller chunks (fewer CTAs stage the same codebook lines and B columns). H100, 2048 tokens (BENCHMARKS.md
    §3): 4096 x 4096 1024 rows 31.8 µs (512: 34.6, 2048: 43.0); 11008 x 4096 512 rows 76.8 (1024: 82.3, 2048: 95.8)."""
    def fill(rows):
        waves = geo.Nb * -(-min(geo.k, geo.N) // rows) * (geo.GW // SLAB_W) / (2 * n_sms)
        return waves / math.ceil(waves)
    best = max(fill(r) for r in ROWS_CANDIDATES)
    return max(r for r in ROWS_CANDIDATES if fill(r) >= best - 0.02)


def _check(qweight, codebook, geo: PQGeometry, lowrank_a, lowrank_b, out):
    check_layer_tensors(qweight, codebook, geo)
    if lowrank_a is None or lowrank_b is None or lowrank_a.dim() != 2 or lowrank_b.dim() != 2 \
            or lowrank_a.shape[0] != geo.N or lowrank_b.shape[1] != geo.M or lowrank_a.shape[1] != lowrank_b.shape[0]:
        raise ValueError(f"pq_dequantize_fold_t: low-rank factors A [{geo.N}, r] and B [r, {geo.M}] needed, got "
                         f"{None if lowrank_a is None else tuple(lowrank_a.shape)} x "
                         f"{None if lowrank_b is None else tuple(lowrank_b.shape)}")
    if out is not None and (tuple(out.shape) != (geo.M, geo.N) or out.stride(1) != 1 or out.dtype != torch.float16):
        raise ValueError(f"out must be a row-contiguous fp16 [{geo.M}, {geo.N}] tensor, got {out.dtype} {tuple(out.shape)}")


def pq_dequantize_fold_t_reference(qweight, codebook, geo: PQGeometry, lowrank_a, lowrank_b, *, out=None,
                                   rows_per_chunk: int | None = None):
    """The spec in PyTorch (any device): (Ŵ + A B)ᵀ summed in fp32, rounded to fp16 once."""
    _check(qweight, codebook, geo, lowrank_a, lowrank_b, out)
    W = dequantize_reference(qweight, codebook, geo).float() + lowrank_a.float() @ lowrank_b.float()
    Wt = W.t().half()
    if out is None:
        return Wt.contiguous()
    out.copy_(Wt)
    return out


def pq_dequantize_fold_t_cuda(qweight, codebook, geo: PQGeometry, lowrank_a, lowrank_b, *, out=None,
                              rows_per_chunk: int | None = None):
    """(Ŵ + A B)ᵀ [M, N] fp16 by the CUDA kernel (module docstring); `out` an optional row-contiguous
    destination, `rows_per_chunk` the launch shape (default `choose_rows`)."""
    _check(qweight, codebook, geo, lowrank_a, lowrank_b, out)
    if qweight.device.type != "cuda":
        raise ValueError("pq_dequantize_fold_t_cuda needs CUDA tensors (the reference runs anywhere)")
    rank = lowrank_a.shape[1]
    if not supports(geo, rank, codebook.dtype):
        raise ValueError(f"pq_dequantize_fold_t_cuda: no variant for bits={geo.bits} d={geo.d} rank={rank} "
                         f"{codebook.dtype} (rank: a multiple of 16 up to {MAX_RANK} where B's fragments fit)")
    rows = rows_per_chunk or choose_rows(geo, num_sms(qweight.device))
    Wt = torch.empty(geo.M, geo.N, device=qweight.device, dtype=torch.float16) if out is None else out
    EXTENSION.load().pq_dequant_fold_t(qweight, codebook, lowrank_a.half(), lowrank_b.half(), Wt, geo.N, geo.M,
                                       geo.k, rows, geo.bits)
    return Wt
