"""PQ matmul for a batch of decode tokens (5-64): tiles of Ŵ dequantized in shared memory, then tensor cores.

Between the lookup-table kernel (its work grows with the tokens) and dequantize + cuBLAS (which
writes and re-reads the whole fp16 Ŵ every call), this kernel decodes each index once per call,
into shared memory, and lets the tensor cores (WMMA 16x16x16, fp32 accumulators; sm_80-class, so Ada
and Hopper alike) apply it to all tokens:

    CTA (row tile of 128 rows, split s), 8 warps; K walked in chunks of SLAB_W = 8 index words
    (PER_WORD·8 groups, PER_WORD·8·d columns):
      1. the chunk's codebooks [groups, d, n] and x columns [T_PAD, K] -> shared memory (requested
         one chunk ahead into registers, with the index words, while the tensor cores work)
      2. each warp decodes one word column for the 128 rows: Ws[row, kk] = C[β, j, l, I[row, j]]
      3. each warp multiplies: acc[t, its 16 rows] += Xs[t, :] · Ws[its rows, :]ᵀ
    partial sums [S, T_PAD, N_pad] (fp32) are finished by `pq_gemv.splitk_epilogue`, which also adds
    the low-rank term (u = x Bᵀ by cuBLAS, one "slab") and the bias.

Inside a chunk the columns are ordered word-major, kk = (w·PER_WORD + s)·d + l, so a (row, word)
pair decodes into PER_WORD·d adjacent halves; x is permuted the same way when staged. Instantiated
for the default recipe's b = 6, d = 2; `supports` says which layers it serves (the selector falls
back to dequantize + cuBLAS, logged). `pq_mma_cuda_reference` is the PyTorch spec.
"""
from __future__ import annotations

import torch

from athena_runtime.kernels.cuda_build import InlineExtension
from athena_runtime.kernels.cuda_snippets import HOST_PRELUDE_SRC
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.pq_gemv import (
    check_cuda_fp16, check_operands, num_sms, pq_gemv_reference, splitk_epilogue,
)

BLOCK_N = 128
SLAB_W = 8
T_PADS = (16, 32, 64)
RECIPES = ((6, 2),)  # (bits, d) instantiated

_KERNEL_SRC = r"""
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

namespace athena_pq_mma {
using namespace nvcuda;
constexpr int BLOCK_N = 128, SLAB_W = 8, THREADS = 256;

template <int T_PAD, int BITS, int D>
__global__ void __launch_bounds__(THREADS) pq_mma_kernel(
    const __half* __restrict__ x, int stride_xt, int t_valid, int M,      // x [t_valid, M]
    const int* __restrict__ qweight, int N_pad,                           // [GW, N_pad]
    const __half* __restrict__ codebook, int G_pad,                       // [Nb, G_pad, D, NC]
    int GW, int k_rows, int chunks_per_split,
    float* __restrict__ partial)                                          // [S, T_PAD, N_pad]
{
    constexpr int NC = 1 << BITS, PER_WORD = 32 / BITS, GROUPS = PER_WORD * SLAB_W;
    constexpr int K_RAW = GROUPS * D, KC = (K_RAW + 15) / 16 * 16, LD = KC + 8;
    __shared__ __align__(32) __half Ws[BLOCK_N * LD];     // [row][kk]
    __shared__ __align__(32) __half Xs[T_PAD * LD];       // [t][kk]
    __shared__ __align__(16) __half Cb[GROUPS * D * NC];  // [g = s SLAB_W + w][l][c]

    const int row0 = blockIdx.x * BLOCK_N, split = blockIdx.y;
    const int blk = row0 / k_rows;  // a row tile never straddles codebook blocks (host checks)
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int c_begin = split * chunks_per_split, c_end = min(c_begin + chunks_per_split, GW / SLAB_W);
    const __half* cb_blk = codebook + (size_t)blk * G_pad * D * NC;

    if constexpr (KC > K_RAW) {  // K padding columns stay zero
        for (int e = tid; e < BLOCK_N * (KC - K_RAW); e += THREADS)
            Ws[(e / (KC - K_RAW)) * LD + K_RAW + e % (KC - K_RAW)] = __float2half(0.f);
        for (int e = tid; e < T_PAD * (KC - K_RAW); e += THREADS)
            Xs[(e / (KC - K_RAW)) * LD + K_RAW + e % (KC - K_RAW)] = __float2half(0.f);
    }
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[T_PAD / 16];
#pragma unroll
    for (int i = 0; i < T_PAD / 16; ++i) wmma::fill_fragment(acc[i], 0.f);

    // Each chunk's operands are requested one chunk ahead, into registers, while the tensor cores work:
    // index words (word `warp`, rows lane + 32 i), codebook lines (int4), x pairs (half2, d = 2).
    static_assert(D == 2, "x pairs: instantiated for d = 2");
    constexpr int CB_VECS = GROUPS * D * NC / 8, CB_PT = (CB_VECS + THREADS - 1) / THREADS;
    constexpr int X_PAIRS = T_PAD * GROUPS, X_PT = (X_PAIRS + THREADS - 1) / THREADS;
    uint32_t wd[4];
    int4 cbr[CB_PT];
    __half2 xr[X_PT];
    auto fetch = [&](int c) {
        const int w0 = c * SLAB_W;
#pragma unroll
        for (int i = 0; i < 4; ++i) wd[i] = __ldcs(qweight + (size_t)(w0 + warp) * N_pad + row0 + lane + 32 * i);
#pragma unroll
        for (int i = 0; i < CB_PT; ++i) {
            const int e = tid + i * THREADS;
            if (e < CB_VECS) {
                const int g = e / (D * NC / 8), part = e % (D * NC / 8);
                const int j = (g / SLAB_W) * GW + w0 + g % SLAB_W;
                cbr[i] = reinterpret_cast<const int4*>(cb_blk + (size_t)j * D * NC)[part];
            }
        }
#pragma unroll
        for (int i = 0; i < X_PT; ++i) {
            const int e = tid + i * THREADS;
            const int t = e / GROUPS, g = e % GROUPS;  // g = w PER_WORD + s
            const int col = ((g % PER_WORD) * GW + w0 + g / PER_WORD) * D;
            xr[i] = (e < X_PAIRS && t < t_valid && col < M)
                ? *reinterpret_cast<const __half2*>(x + (size_t)t * stride_xt + col) : __float2half2_rn(0.f);
        }
    };
    if (c_begin < c_end) fetch(c_begin);
    for (int c = c_begin; c < c_end; ++c) {
        __syncthreads();  // the previous chunk's products are done with Ws / Xs / Cb
#pragma unroll
        for (int i = 0; i < CB_PT; ++i)
            if (tid + i * THREADS < CB_VECS) reinterpret_cast<int4*>(Cb)[tid + i * THREADS] = cbr[i];
#pragma unroll
        for (int i = 0; i < X_PT; ++i) {
            const int e = tid + i * THREADS;
            if (e < X_PAIRS) *reinterpret_cast<__half2*>(Xs + (e / GROUPS) * LD + (e % GROUPS) * D) = xr[i];
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // decode: row lane + 32 i, word `warp`
            __half* dst = Ws + (lane + 32 * i) * LD + warp * PER_WORD * D;
#pragma unroll
            for (int s = 0; s < PER_WORD; ++s) {
                const uint32_t idx = (wd[i] >> (s * BITS)) & (NC - 1);
                const __half* cbg = Cb + (s * SLAB_W + warp) * D * NC + idx;
                *reinterpret_cast<__half2*>(dst + 2 * s) = __halves2half2(cbg[0], cbg[NC]);
            }
        }
        if (c + 1 < c_end) fetch(c + 1);  // in flight during the products
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KC; kk += 16) {  // warp: output rows row0 + 16 warp .. +16, all tokens
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> bf;
            wmma::load_matrix_sync(bf, Ws + (warp * 16) * LD + kk, LD);
#pragma unroll
            for (int ti = 0; ti < T_PAD / 16; ++ti) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> af;
                wmma::load_matrix_sync(af, Xs + (ti * 16) * LD + kk, LD);
                wmma::mma_sync(acc[ti], af, bf, acc[ti]);
            }
        }
    }
#pragma unroll
    for (int ti = 0; ti < T_PAD / 16; ++ti)
        wmma::store_matrix_sync(partial + ((size_t)split * T_PAD + ti * 16) * N_pad + row0 + warp * 16, acc[ti],
                                N_pad, wmma::mem_row_major);
}

}  // namespace athena_pq_mma
"""

_HOST_SRC_HEAD = HOST_PRELUDE_SRC + r"""

void pq_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor codebook, torch::Tensor partial,
            int64_t GW, int64_t k_rows, int64_t chunks_per_split, int64_t bits) {
    TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kHalf && x.dim() == 2 && x.stride(1) == 1, "x: fp16 CUDA [T, M]");
    TORCH_CHECK(qweight.scalar_type() == torch::kInt && qweight.is_contiguous() && qweight.size(0) == GW
                && qweight.size(1) % athena_pq_mma::BLOCK_N == 0, "qweight: int32 [GW, N_pad]");
    TORCH_CHECK(codebook.scalar_type() == torch::kHalf && codebook.dim() == 4 && codebook.is_contiguous(), "codebook: fp16 [Nb, G_pad, D, NC]");
    TORCH_CHECK(partial.scalar_type() == torch::kFloat && partial.is_contiguous() && partial.dim() == 3
                && partial.size(2) == qweight.size(1), "partial: fp32 [S, T_PAD, N_pad]");
    TORCH_CHECK(GW % athena_pq_mma::SLAB_W == 0 && (k_rows % athena_pq_mma::BLOCK_N == 0 || codebook.size(0) == 1),
                "pq_mma: GW must be a multiple of 8 and codebook blocks of whole 128-row tiles");
    const int T_PAD = partial.size(1), D = codebook.size(2);
    TORCH_CHECK(x.size(0) <= T_PAD, "more tokens than the partial buffer holds");
    const c10::cuda::CUDAGuard guard(x.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    const dim3 grid((unsigned)(qweight.size(1) / athena_pq_mma::BLOCK_N), (unsigned)partial.size(0));
    const __half* xp = reinterpret_cast<const __half*>(x.data_ptr<at::Half>());
    const __half* cp = reinterpret_cast<const __half*>(codebook.data_ptr<at::Half>());
"""

_HOST_SRC_TAIL = r"""
    TORCH_CHECK(false, "pq_mma: no instantiation for T_PAD=", T_PAD, " bits=", bits, " d=", D);
}
"""

_CPP_DECL = """
void pq_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor codebook, torch::Tensor partial,
            int64_t GW, int64_t k_rows, int64_t chunks_per_split, int64_t bits);
"""


def cuda_source() -> str:
    launches = []
    for t in T_PADS:
        for b, d in RECIPES:
            launches.append(
                f"    if (T_PAD == {t} && bits == {b} && D == {d}) {{\n"
                f"        athena_pq_mma::pq_mma_kernel<{t}, {b}, {d}><<<grid, athena_pq_mma::THREADS, 0, stream>>>(\n"
                f"            xp, (int)x.stride(0), (int)x.size(0), (int)x.size(1), qweight.data_ptr<int>(), (int)qweight.size(1),\n"
                f"            cp, (int)codebook.size(1), (int)GW, (int)k_rows, (int)chunks_per_split, partial.data_ptr<float>());\n"
                f"        C10_CUDA_KERNEL_LAUNCH_CHECK();\n        return;\n    }}")
    return _KERNEL_SRC + _HOST_SRC_HEAD + "\n".join(launches) + _HOST_SRC_TAIL


EXTENSION = InlineExtension("athena_pq_mma", "the CUDA PQ tensor-core kernel", _CPP_DECL, cuda_source, ["pq_mma"])
MAX_TOKENS = T_PADS[-1]


def supports(geo: PQGeometry, tokens: int, dtype: torch.dtype) -> bool:
    return (dtype == torch.float16 and 1 <= tokens <= MAX_TOKENS and (geo.bits, geo.d) in RECIPES
            and (geo.k % BLOCK_N == 0 or geo.Nb == 1) and geo.GW % SLAB_W == 0 and geo.M % 2 == 0)


def usable(geo: PQGeometry, tokens: int, dtype: torch.dtype) -> bool:
    """`supports` and the extension builds here (built on first use; a failure is logged once)."""
    return supports(geo, tokens, dtype) and EXTENSION.available()


pq_mma_cuda_reference = pq_gemv_reference


def pq_mma_cuda(x, qweight, codebook, geo: PQGeometry, lowrank_a=None, lowrank_b=None, bias=None, *,
                split: int | None = None):
    """x [T <= 64, M] fp16 -> y [T, N] fp16 (CUDA, tensor cores)."""
    check_operands(x, qweight, codebook, geo, lowrank_a, lowrank_b, bias)
    T = x.shape[0]
    check_cuda_fp16("pq_mma_cuda", x, codebook, geo, supports(geo, T, x.dtype))
    t_pad = next(t for t in T_PADS if t >= T)
    n_row, n_chunks = geo.N_pad // BLOCK_N, geo.GW // SLAB_W
    if split is None:  # ~2 CTAs per SM, but partial sums stay a small fraction of the traffic
        split = max(1, min(n_chunks, -(-2 * num_sms(x.device) // n_row)))
    per_split = -(-n_chunks // split)
    split = -(-n_chunks // per_split)
    partial = torch.empty(split, t_pad, geo.N_pad, device=x.device, dtype=torch.float32)
    EXTENSION.load().pq_mma(x.contiguous(), qweight, codebook, partial, geo.GW, geo.k, per_split, geo.bits)
    u = None
    if lowrank_a is not None:
        u = (x @ lowrank_b.t().to(x.dtype)).unsqueeze(0)  # [1, T, r] fp16 (the tile epilogue widens it)
    return splitk_epilogue(partial, u, lowrank_a, bias, T, geo.N, x.dtype)
