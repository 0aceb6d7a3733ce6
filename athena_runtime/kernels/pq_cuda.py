"""PQ decode kernel in CUDA C++: the lookup-table kernel of `pq_gemv` with the table in shared memory.

Same table algorithm, (row chunk, slab) programs and split-K partials as the Triton kernel
(`pq_gemv.py`, which documents them), written in CUDA because shared memory and 32-bit addressing
cut the instructions per index:
    idx  = (word >> s·b) & (n − 1)        SHF + LOP3
    acc += L_s[idx]                      LDS [idx + compile-time table offset], HADD2.F32, FADD
A thread owns 4 consecutive rows (one int4 per word of the word-major layout) and lane l holds rows
4l..4l+3, so for each (word, slot, row) the 32 lanes of a warp read one group's table: with n = 64
fp16 entries that is 128 bytes, one word per bank, and the lookup is free of bank conflicts whatever
the indices. The four rows give four independent accumulator chains.

The low-rank share u = x Bᵀ [T, r] is computed by r extra CTAs at the front of the 1-D grid (the
first wave), one rank each: a complete dot product over all M columns (16-byte loads issued before
any arithmetic, fp32, block reduction), written with plain stores. The table CTAs do no low-rank
work, and nothing needs zeroing; the epilogue reads u as a single split-K "slab".

One token: the split-K sums are finished in the same launch by epilogue CTAs at the end of the grid
(`pq_cuda_epilogue`, whose device code is spliced into this kernel's source): a decode step saves one
launch per layer (H100: 0.5-1.0 µs a call on the large 7B shapes, BENCHMARKS.md §3). Few tokens keep
`pq_gemv.splitk_epilogue`.

Built with `torch.utils.cpp_extension.load_inline` on first use (needs nvcc; ~1 min), for the
(tokens, bits, slab, table dtype) combinations in VARIANTS. Only sm_80-class instructions: runs on
Ada (sm_89) and Hopper alike. `pq_gemv_cuda_reference` is the PyTorch spec.
"""
from __future__ import annotations

import logging

import torch

from athena_runtime.kernels.cuda_build import InlineExtension
from athena_runtime.kernels.cuda_snippets import HOST_PRELUDE_SRC
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.pq_cuda_epilogue import (
    EPI_POLL_NS, EPI_TILE, EPILOGUE_SRC, FUSED_EPILOGUE_MAX_TOKENS, fused_epilogue_reason, sync_buffer,
)
from athena_runtime.kernels.pq_gemv import (
    check_cuda_fp16, check_operands, num_sms, pq_gemv_reference, row_chunks, splitk_epilogue,
)
from athena_runtime.log_once import log_once

log = logging.getLogger(__name__)

THREADS = 256
ROWS_PER_THREAD = 4  # a CTA covers THREADS * 4 = 1024 rows per pass
# T = 1: 4-word slabs in 4096-row chunks (four passes: each pass's words stream in under the lookups of the one
# before) beat 8-word slabs in 2048-row chunks on all four 7B shapes in one A/B run (H100, BENCHMARKS.md §3,
# bench/results/t1ab_slab4_h100_*.txt); 2048- or 1024-row chunks where 4096 would underfill the GPU
# (`t1_rows_per_chunk`).
T1_SLAB_W, T1_ROWS_PER_CHUNK = 4, 4096
# sm_90: the T = 1 fp16-table variants of <= 8-word slabs compiled for 4 CTAs per SM (64 registers, no spills; the
# 8-word ones unbounded get 91 registers from nvcc 13: 2 CTAs); 1 leaves them unbounded (A/B runs:
# bench/diag/lut_parts.py --variants mb4,mb1; the register check: tests/test_pq_cuda_registers.py)
T1_MIN_BLOCKS_SM90 = 4
TOKENS = (1, 2, 4, 8, 16)  # instantiated token counts (T is padded up to the next one)


def t1_rows_per_chunk(geo: PQGeometry, device) -> int:
    """The tallest chunk, from T1_ROWS_PER_CHUNK down to 1024 rows, that still gives at least 1.5 table CTAs per
    SM (4096 x 4096 at 4-word slabs: 104 CTAs of 4096 rows on 132 SMs would leave the GPU a third empty)."""
    rows = T1_ROWS_PER_CHUNK
    while rows > 1024 and row_chunks(geo, rows)[1] * (geo.GW // T1_SLAB_W) < 1.5 * num_sms(device):
        rows //= 2
    return rows


def max_slab_w(bits: int, tokens: int, fp16_table: bool = True) -> int:
    """Widest slab (<= 32 words) whose table fits in 24 KB (several CTAs per SM)."""
    per_word, nc = 32 // bits, 1 << bits
    slab = 32
    while slab > 2 and per_word * slab * tokens * nc * (2 if fp16_table else 4) > 24 * 1024:
        slab //= 2
    return slab


def _variants() -> list[tuple[int, int, int, bool]]:
    """(T, BITS, SLAB_W, FP16_TABLE) instantiations: the recipe's b = 6 with 2-3 slab widths (the
    launcher picks one per layer shape), b = 4 and 8 with two."""
    out = set()
    for bits in (4, 6, 8):
        for t in TOKENS:
            top = max_slab_w(bits, t)
            for slab in ((top, top // 2, top // 4) if bits == 6 else (top,)):
                if slab >= 2 and (32 // bits) * slab * t * (1 << bits) * 2 <= 48 * 1024:
                    out.add((t, bits, slab, True))
    for slab in (8, 16, 32):
        out.add((1, 6, slab, False))  # fp32 table: one instruction less per lookup, two banks per entry
    out.add((1, 6, 4, True))  # the one-token launch (T1_SLAB_W)
    return sorted(out)


VARIANTS = _variants()


def choose_slab_w(geo: PQGeometry, t_inst: int, fp16_table: bool, device) -> int:
    """The widest instantiated slab that still gives >= 1.5 CTAs per SM (else the narrowest)."""
    slabs = sorted((s for t, b, s, f in VARIANTS if (t, b, f) == (t_inst, geo.bits, fp16_table)
                    and geo.GW % s == 0), reverse=True)
    slabs = [s for s in slabs if s <= 16] or slabs  # 32 words hold 128 prefetch registers: ~240 in all
    if not slabs:
        raise ValueError(f"no CUDA variant for T={t_inst} bits={geo.bits} fp16_table={fp16_table}")
    _, n_row = row_chunks(geo, THREADS * ROWS_PER_THREAD)
    target = 1.5 * num_sms(device)
    return next((s for s in slabs if n_row * (geo.GW // s) >= target), slabs[-1])

_KERNEL_SRC = r"""
#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>

#ifndef ATHENA_TRACE_MARK  // bench/diag/lut_trace.py: thread 0's timestamp at phase i of a table CTA (nothing otherwise)
#define ATHENA_TRACE_MARK(i)
#endif

namespace athena_pq {

// CTAs per SM the one-token fp16-table variants of <= 8-word slabs are compiled for (__launch_bounds__): on sm_90
// four fit in 64 registers without spills (2 CTAs more per SM than unbounded with nvcc 13, to hide the index loads'
// latency); sm_89 would spill at 64 and stays unbounded (90 registers with nvcc 13). Other variants: no bound.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define ATHENA_T1_MIN_BLOCKS @T1_MIN_BLOCKS_SM90@
#else
#define ATHENA_T1_MIN_BLOCKS 1
#endif
template <int T, int SLAB_W, bool FP16_TABLE>
constexpr int lut_min_blocks() { return T == 1 && SLAB_W <= 8 && FP16_TABLE ? ATHENA_T1_MIN_BLOCKS : 1; }

__device__ __forceinline__ float tab_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float tab_to_float(float v) { return v; }

// u CTA: u[t] = sum_m x[t, m] b[m] over all M columns for one rank (u, b: that rank's column / row);
// rows t >= t_valid get 0. The first m_vec columns (a multiple of 8; 0 when rows are not 16-byte aligned)
// in int4 loads, U per thread and token issued before any arithmetic; the rest one half at a time.
template <int T, int THREADS>
__device__ __forceinline__ void lowrank_u(const __half* __restrict__ x, int stride_xt, int t_valid, int M, int m_vec,
                                          const __half* __restrict__ b, float* __restrict__ u, int stride_ut,
                                          float* red) {  // red: shared [THREADS / 32][T]
    // int4 chunks per thread per round trip: U (T + 1) int4 in flight, 36-68 registers, under the table path's count
    constexpr int U = T == 1 ? 8 : T == 2 ? 4 : T == 4 ? 2 : 1;
    float acc[T];
#pragma unroll
    for (int t = 0; t < T; ++t) acc[t] = 0.f;
    const int4* b4 = reinterpret_cast<const int4*>(b);
    for (int c0 = threadIdx.x; c0 * 8 < m_vec; c0 += U * THREADS) {
        int4 bv[U], xv[U][T];
#pragma unroll
        for (int i = 0; i < U; ++i) {
            const int c = c0 + i * THREADS;
            const bool ok = c * 8 < m_vec;
            bv[i] = ok ? __ldcs(b4 + c) : make_int4(0, 0, 0, 0);  // B is read once per call
#pragma unroll
            for (int t = 0; t < T; ++t)  // rows past t_valid read row t_valid - 1: their sums are dropped
                xv[i][t] = ok ? __ldg(reinterpret_cast<const int4*>(x + (size_t)min(t, t_valid - 1) * stride_xt) + c)
                              : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < U; ++i) {
            const __half2* b2 = reinterpret_cast<const __half2*>(&bv[i]);
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const __half2* x2 = reinterpret_cast<const __half2*>(&xv[i][t]);
#pragma unroll
                for (int v = 0; v < 4; ++v) {
                    const float2 bf = __half22float2(b2[v]), xf = __half22float2(x2[v]);
                    acc[t] = fmaf(bf.x, xf.x, fmaf(bf.y, xf.y, acc[t]));
                }
            }
        }
    }
    for (int m = m_vec + threadIdx.x; m < M; m += THREADS) {
        const float bm = __half2float(b[m]);
#pragma unroll
        for (int t = 0; t < T; ++t) acc[t] = fmaf(bm, __half2float(x[(size_t)min(t, t_valid - 1) * stride_xt + m]), acc[t]);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int t = 0; t < T; ++t) {
        float v = acc[t];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) red[warp * T + t] = v;
    }
    __syncthreads();
    if (threadIdx.x < T) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < THREADS / 32; ++w) v += red[w * T + threadIdx.x];
        u[(size_t)threadIdx.x * stride_ut] = (int)threadIdx.x < t_valid ? v : 0.f;
    }
}

""" + EPILOGUE_SRC + r"""
// 1-D grid of rank + n_row_progs * (GW / SLAB_W) + n_epi CTAs, THREADS threads: the first `rank` compute u = x Bᵀ
// (one rank each), then the (row program, slab) CTAs, row program fastest (see pq_gemv.py for the algorithm),
// then the epilogue CTAs of pq_cuda_epilogue (one token; n_epi = 0 otherwise).
template <int T, int BITS, int SLAB_W, bool FP16_TABLE, int THREADS>
__global__ void __launch_bounds__(THREADS, (lut_min_blocks<T, SLAB_W, FP16_TABLE>())) pq_lut_gemv_kernel(
    const __half* __restrict__ x, int stride_xt, int t_valid, int M,      // x [t_valid, M]
    const int* __restrict__ qweight, int N_pad,                           // [GW, N_pad] int32
    const __half* __restrict__ codebook, int G_pad, int D,                // [Nb, G_pad, D, NC]
    int N, int GW, int k_rows, int chunks_per_blk, int rows_per_chunk,
    int n_row_progs, __half* __restrict__ partial,                        // [S, T, N_pad] fp16
    const __half* __restrict__ lr_b, int stride_br, int rank, int m_vec,  // [rank, M] (rank 0: none)
    float* __restrict__ u,                                                // [T, rank] fp32
    EpiArgs ep)                                                           // fused epilogue (ep.n_epi > 0)
{
    using TabT = typename std::conditional<FP16_TABLE, __half, float>::type;
    constexpr int NC = 1 << BITS, PER_WORD = 32 / BITS, SLAB_Q = SLAB_W / 4, VEC = 8, NVEC = NC / VEC;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    TabT* lut = reinterpret_cast<TabT*>(smem_raw);                        // [PER_WORD][SLAB_W][T][NC]

    if ((int)blockIdx.x < rank) {  // a u CTA
        lowrank_u<T, THREADS>(x, stride_xt, t_valid, M, m_vec, lr_b + (size_t)blockIdx.x * stride_br, u + blockIdx.x,
                              rank, reinterpret_cast<float*>(smem_raw));
        if (ep.n_epi > 0) {  // release u to the epilogue CTAs
            __syncthreads();
            if (threadIdx.x == 0) add_release(ep.sync, 1);
        }
        return;
    }
    const int n_slabs = GW / SLAB_W, n_table = n_row_progs * n_slabs;
    const RowProgs rp{k_rows, chunks_per_blk, rows_per_chunk, N};
    if constexpr (T == 1) {  // (instantiated for one token only: the few-token variants keep their registers)
        if ((int)blockIdx.x >= rank + n_table) {  // an epilogue CTA
            fused_epilogue<T, THREADS>(blockIdx.x - rank - n_table, partial, N_pad, n_slabs, u, rank, t_valid, ep, rp,
                                       n_row_progs, reinterpret_cast<float*>(smem_raw));
            return;
        }
    }
    const int cta = blockIdx.x - rank, prog = cta % n_row_progs, slab = cta / n_row_progs, w0 = slab * SLAB_W;
    const int blk = prog / chunks_per_blk;
    const int row_start = blk * k_rows + (prog % chunks_per_blk) * rows_per_chunk;
    const int row_end = min(min(row_start + rows_per_chunk, (blk + 1) * k_rows), N);

    // prefetch this thread's first row quad (its words stream in while the table is built)
    const int4* qw4 = reinterpret_cast<const int4*>(qweight) + (size_t)w0 * (N_pad / 4);  // this slab's words [SLAB_W, N_pad / 4]
    const int N4 = N_pad / 4;
    int r4 = row_start / 4 + threadIdx.x;
    int4 cur[SLAB_W];
#pragma unroll
    for (int w = 0; w < SLAB_W; ++w)
        cur[w] = r4 * 4 < row_end ? __ldcs(qw4 + (size_t)w * N4 + r4) : make_int4(0, 0, 0, 0);

    ATHENA_TRACE_MARK(0);  // the first pass's loads issued
    // ---- 1. table L[s][w][t][c] = sum_l C[blk, j, l, c] * x[t, D j + l], j = s GW + w0 + w (8 c per thread)
    const __half* cb = codebook + (size_t)blk * G_pad * D * NC;
    for (int e = threadIdx.x; e < PER_WORD * SLAB_W * NVEC; e += THREADS) {
        const int c0 = (e % NVEC) * VEC, sw = e / NVEC;
        const int j = (sw / SLAB_W) * GW + w0 + sw % SLAB_W;
        if constexpr (FP16_TABLE) {
            __half2 acc[T][VEC / 2];
#pragma unroll
            for (int t = 0; t < T; ++t)
#pragma unroll
                for (int v = 0; v < VEC / 2; ++v) acc[t][v] = __float2half2_rn(0.f);
            for (int l = 0; l < D && j * D + l < M; ++l) {
                const int4 raw = *reinterpret_cast<const int4*>(cb + ((size_t)j * D + l) * NC + c0);
                const __half2* c2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    if (t < t_valid) {
                        const __half2 xv = __half2half2(x[(size_t)t * stride_xt + j * D + l]);
#pragma unroll
                        for (int v = 0; v < VEC / 2; ++v) acc[t][v] = __hfma2(c2[v], xv, acc[t][v]);
                    }
                }
            }
#pragma unroll
            for (int t = 0; t < T; ++t)
                *reinterpret_cast<int4*>(&lut[(sw * T + t) * NC + c0]) = *reinterpret_cast<const int4*>(acc[t]);
        } else {
            float acc[T][VEC];
#pragma unroll
            for (int t = 0; t < T; ++t)
#pragma unroll
                for (int v = 0; v < VEC; ++v) acc[t][v] = 0.f;
            for (int l = 0; l < D && j * D + l < M; ++l) {
                const int4 raw = *reinterpret_cast<const int4*>(cb + ((size_t)j * D + l) * NC + c0);
                const __half* ch = reinterpret_cast<const __half*>(&raw);
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    if (t < t_valid) {
                        const float xv = __half2float(x[(size_t)t * stride_xt + j * D + l]);
#pragma unroll
                        for (int v = 0; v < VEC; ++v) acc[t][v] = fmaf(__half2float(ch[v]), xv, acc[t][v]);
                    }
                }
            }
#pragma unroll
            for (int t = 0; t < T; ++t) {
                float4* dst = reinterpret_cast<float4*>(&lut[(sw * T + t) * NC + c0]);
                dst[0] = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
                dst[1] = make_float4(acc[t][4], acc[t][5], acc[t][6], acc[t][7]);
            }
        }
    }

    ATHENA_TRACE_MARK(1);  // table built
    __syncthreads();

    // ---- 2. rows: y[t, i] += L[s][w][t][I[i, s GW + w0 + w]]. A thread owns 4 consecutive rows (one int4
    // per word); lane l holds rows 4l..4l+3, so for each (word, slot, r) the warp reads one group's table.
    // Rows past row_end (padding or the next chunk's) are read but not stored. With one token the next
    // pass's words are requested before this pass's lookups (double buffer: twice the bytes in flight).
    constexpr bool PREFETCH = (T == 1);
    int4 nxt_words[PREFETCH ? SLAB_W : 1];
    for (; r4 * 4 < row_end; r4 += THREADS) {
        const int nxt = r4 + THREADS;  // next pass (rows_per_chunk > 1024)
        if constexpr (PREFETCH) {
#pragma unroll
            for (int w = 0; w < SLAB_W; ++w)
                nxt_words[w] = nxt * 4 < row_end ? __ldcs(qw4 + (size_t)w * N4 + nxt) : make_int4(0, 0, 0, 0);
        }
        float acc[4][T];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
#pragma unroll
        for (int w = 0; w < SLAB_W; ++w) {
            const int4 q = cur[w];
            const uint32_t wd[4] = {(uint32_t)q.x, (uint32_t)q.y, (uint32_t)q.z, (uint32_t)q.w};
#pragma unroll
            for (int s = 0; s < PER_WORD; ++s) {
                const TabT* tab = lut + ((s * SLAB_W + w) * T) * NC;
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const uint32_t idx = (wd[r] >> (s * BITS)) & (NC - 1);
#pragma unroll
                    for (int t = 0; t < T; ++t) acc[r][t] += tab_to_float(tab[t * NC + idx]);
                }
            }
        }
#pragma unroll
        for (int t = 0; t < T; ++t) {
            __half* dst = partial + ((size_t)slab * T + t) * N_pad + 4 * r4;
            if (4 * r4 + 4 <= row_end) {  // one 8-byte store of four fp16 partial sums
                const __half2 lo = __floats2half2_rn(acc[0][t], acc[1][t]), hi = __floats2half2_rn(acc[2][t], acc[3][t]);
                uint2 packed;
                packed.x = *reinterpret_cast<const uint32_t*>(&lo);
                packed.y = *reinterpret_cast<const uint32_t*>(&hi);
                *reinterpret_cast<uint2*>(dst) = packed;
            } else {
#pragma unroll
                for (int r = 0; r < 4; ++r)
                    if (4 * r4 + r < row_end) dst[r] = __float2half_rn(acc[r][t]);
            }
        }
#pragma unroll
        for (int w = 0; w < SLAB_W; ++w) {
            if constexpr (PREFETCH) cur[w] = nxt_words[w];
            else cur[w] = nxt * 4 < row_end ? __ldcs(qw4 + (size_t)w * N4 + nxt) : make_int4(0, 0, 0, 0);
        }
    }
    ATHENA_TRACE_MARK(2);  // this thread's passes done
    if (ep.n_epi > 0 && row_start < row_end) {  // release this slab's partial sums of the row program
        __syncthreads();
        if (threadIdx.x == 0) add_release(ep.sync + 2 + prog, 1);
    }
}

}  // namespace athena_pq
"""

_HOST_SRC_HEAD = HOST_PRELUDE_SRC + r"""
#include <algorithm>

namespace athena_pq {

struct LutArgs {
    const __half* x; int stride_xt, t_valid, M;
    const int* qweight; int N_pad;
    const __half* codebook; int G_pad, D;
    int N, GW, k_rows, chunks_per_blk, rows_per_chunk, n_row_progs;
    __half* partial;
    const __half* lr_b; int stride_br, rank, m_vec;
    float* u_part;
    EpiArgs ep;
    size_t epi_smem;
};

// Returns whether the epilogue CTAs were launched (false: the caller finishes the partial sums).
template <int T, int BITS, int SLAB_W, bool FP16_TABLE>
bool launch_lut(LutArgs a, dim3 grid, cudaStream_t stream) {
    constexpr int NC = 1 << BITS, PER_WORD = 32 / BITS;
    constexpr size_t table_smem = (size_t)PER_WORD * SLAB_W * T * NC * (FP16_TABLE ? 2 : 4);
    static_assert(table_smem <= 48 * 1024, "table must fit the default shared-memory limit");
    static_assert(table_smem >= (THREADS / 32) * T * sizeof(float), "u CTAs reduce in the table's shared memory");
    if (a.ep.n_out > 0) {
        int per_sm = 0, dev = 0, sms = 0;
        C10_CUDA_CHECK(cudaGetDevice(&dev));
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, pq_lut_gemv_kernel<T, BITS, SLAB_W, FP16_TABLE, THREADS>, THREADS, std::max(table_smem, a.epi_smem)));
        const int slots = per_sm * sms;
        if (a.ep.tile == 0) {  // auto: 32 rows where that gives at most one epilogue CTA per SM (4096 outputs at
            // 4-word slabs: 13.7 µs against 14.6 at 64 rows), else 64 (best or within 0.1 µs of it on the larger 7B
            // shapes; H100, BENCHMARKS.md §3), 256 where 64-row CTAs would not leave the waited-on CTAs a slot
            a.ep.tile = (a.ep.n_out + 31) / 32 <= sms ? 32 : (a.ep.n_out + 63) / 64 < slots ? 64 : 256;
            a.epi_smem = ((a.ep.glu ? 2 : 1) * (THREADS / 32) * (size_t)a.ep.tile + (size_t)T * a.rank) * sizeof(float);
        }
        a.ep.n_epi = (a.ep.n_out + a.ep.tile - 1) / a.ep.tile;
        if (a.ep.n_epi >= slots) {  // no slot guaranteed for the CTAs they wait on: not fused
            a.ep = EpiArgs{};
            a.epi_smem = 0;
        }
        grid.x += a.ep.n_epi;
    }
    const size_t smem = std::max(table_smem, a.epi_smem);
    TORCH_CHECK(smem <= 48 * 1024, "pq_lut_gemv: fused epilogue needs ", a.epi_smem, " bytes of shared memory");
    pq_lut_gemv_kernel<T, BITS, SLAB_W, FP16_TABLE, THREADS><<<grid, THREADS, smem, stream>>>(
        a.x, a.stride_xt, a.t_valid, a.M, a.qweight, a.N_pad, a.codebook, a.G_pad, a.D,
        a.N, a.GW, a.k_rows, a.chunks_per_blk, a.rows_per_chunk, a.n_row_progs, a.partial,
        a.lr_b, a.stride_br, a.rank, a.m_vec, a.u_part, a.ep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return a.ep.n_epi > 0;
}

bool pq_lut_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor codebook, torch::Tensor partial,
                 torch::Tensor lr_b, torch::Tensor u_part,
                 int64_t N, int64_t GW, int64_t k_rows, int64_t chunks_per_blk, int64_t rows_per_chunk,
                 int64_t bits, int64_t slab_w, bool fp16_table,
                 torch::Tensor y, torch::Tensor lr_a, torch::Tensor bias, torch::Tensor sync,
                 int64_t up_off, int64_t glu_rows, int64_t epi_tile,
                 int64_t epi_poll_ns) {
    TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kHalf && x.dim() == 2 && x.stride(1) == 1, "x: fp16 CUDA [T, M]");
    TORCH_CHECK(qweight.scalar_type() == torch::kInt && qweight.dim() == 2 && qweight.size(0) == GW && qweight.size(1) % 4 == 0
                && qweight.is_contiguous(), "qweight: int32 [GW, N_pad]");
    TORCH_CHECK(codebook.scalar_type() == torch::kHalf && codebook.dim() == 4 && codebook.is_contiguous(), "codebook: fp16 [Nb, G_pad, D, NC]");
    TORCH_CHECK(codebook.size(3) == (1 << bits), "codebook n != 2^bits");
    TORCH_CHECK(partial.scalar_type() == torch::kHalf && partial.dim() == 3 && partial.is_contiguous(), "partial: fp16 [S, T, N_pad]");
    TORCH_CHECK(GW % slab_w == 0 && partial.size(0) == GW / slab_w && partial.size(2) == qweight.size(1), "partial shape");
    TORCH_CHECK(codebook.size(2) <= 4 && rows_per_chunk % 4 == 0 && (k_rows % 4 == 0 || codebook.size(0) == 1),
                "CUDA PQ kernel: d <= 4, and row chunks of whole row quads");
    const bool has_lr = lr_b.numel() > 0;
    if (has_lr) {
        TORCH_CHECK(lr_b.scalar_type() == torch::kHalf && lr_b.stride(1) == 1 && lr_b.size(1) == x.size(1), "lowrank_b: fp16 [r, M]");
        TORCH_CHECK(u_part.scalar_type() == torch::kFloat && u_part.is_contiguous() && u_part.size(0) == 1
                    && u_part.size(1) == partial.size(1) && u_part.size(2) == lr_b.size(0), "u_part: fp32 [1, T, r]");
    }
    const int T = partial.size(1);
    TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= T, "x: 1 to T tokens (T = the partial buffer's)");
    // int4 loads of x and B rows when every row starts on 16 bytes (else scalar loads)
    const bool vec = has_lr && x.stride(0) % 8 == 0 && lr_b.stride(0) % 8 == 0
                     && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(lr_b.data_ptr()) % 16 == 0;
    const int n_row_progs = (int)(codebook.size(0) * chunks_per_blk), rank = has_lr ? (int)lr_b.size(0) : 0;
    const c10::cuda::CUDAGuard guard(x.device());
    LutArgs a{reinterpret_cast<const __half*>(x.data_ptr<at::Half>()), (int)x.stride(0), (int)x.size(0), (int)x.size(1),
              qweight.data_ptr<int>(), (int)qweight.size(1),
              reinterpret_cast<const __half*>(codebook.data_ptr<at::Half>()), (int)codebook.size(1), (int)codebook.size(2),
              (int)N, (int)GW, (int)k_rows, (int)chunks_per_blk, (int)rows_per_chunk, n_row_progs,
              reinterpret_cast<__half*>(partial.data_ptr<at::Half>()),
              has_lr ? reinterpret_cast<const __half*>(lr_b.data_ptr<at::Half>()) : nullptr,
              has_lr ? (int)lr_b.stride(0) : 0, rank, vec ? (int)(x.size(1) / 8 * 8) : 0,
              has_lr ? u_part.data_ptr<float>() : nullptr, EpiArgs{}, 0};
    // fused epilogue: y given (non-empty) -> epilogue CTAs after the table CTAs write y themselves
    if (y.numel() > 0) {
        TORCH_CHECK(T == 1, "fused epilogue: one token only");
        const int n_out = glu_rows > 0 ? (int)glu_rows : (int)N;
        TORCH_CHECK(y.is_cuda() && y.scalar_type() == torch::kHalf && y.is_contiguous() && y.dim() == 2
                    && y.size(0) == x.size(0) && y.size(1) == n_out, "y: fp16 [T, n_out]");
        TORCH_CHECK(sync.scalar_type() == torch::kInt && sync.is_contiguous() && sync.numel() >= 2 + n_row_progs,
                    "sync: int32 [>= 2 + row programs], zero");
        TORCH_CHECK(epi_tile == 0 || (epi_tile >= 8 && epi_tile % 8 == 0 && (8 * THREADS) % epi_tile == 0 && epi_tile <= THREADS),
                    "epi_tile: 0 (auto) or a multiple of 8 dividing ", 8 * THREADS, ", at most ", THREADS);
        TORCH_CHECK(qweight.size(1) % 8 == 0, "fused epilogue: N_pad % 8 == 0");
        TORCH_CHECK(glu_rows == 0 || (up_off % 8 == 0 && glu_rows <= up_off && up_off + glu_rows <= N),
                    "glu: up offset a multiple of 8, gate and up rows inside N");
        if (has_lr) {
            TORCH_CHECK(lr_a.scalar_type() == torch::kHalf && lr_a.dim() == 2 && lr_a.size(0) == N && lr_a.size(1) == rank
                        && lr_a.stride(1) == 1 && rank % 8 == 0 && lr_a.stride(0) % 8 == 0
                        && reinterpret_cast<uintptr_t>(lr_a.data_ptr()) % 16 == 0, "lowrank_a: fp16 [N, r], r % 8 == 0, 16-byte rows");
        }
        if (bias.numel() > 0)
            TORCH_CHECK(bias.scalar_type() == torch::kHalf && bias.numel() == N && bias.is_contiguous(), "bias: fp16 [N]");
        a.ep = EpiArgs{sync.data_ptr<int>(), reinterpret_cast<__half*>(y.data_ptr<at::Half>()), (int)y.stride(0),
                       has_lr ? reinterpret_cast<const __half*>(lr_a.data_ptr<at::Half>()) : nullptr,
                       has_lr ? (int)lr_a.stride(0) : 0,
                       bias.numel() > 0 ? reinterpret_cast<const __half*>(bias.data_ptr<at::Half>()) : nullptr,
                       n_out, (int)up_off, glu_rows > 0 ? 1 : 0,
                       0, (int)epi_tile, (int)epi_poll_ns};  // n_epi: launch_lut
        // tile 0: launch_lut picks it; the occupancy it asks for is at the largest tile's shared memory
        a.epi_smem = ((glu_rows > 0 ? 2 : 1) * (THREADS / 32) * (size_t)(epi_tile > 0 ? epi_tile : 256)
                      + (size_t)T * rank) * sizeof(float);
    }
    // u CTAs first (the first wave), then the table CTAs, then the epilogue CTAs (launch_lut adds them)
    const dim3 grid((unsigned)(rank + n_row_progs * (GW / slab_w)));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
"""

_HOST_SRC_TAIL = r"""
    TORCH_CHECK(false, "pq_lut_gemv: no instantiation for T=", T, " bits=", bits, " slab_w=", slab_w, " fp16_table=", fp16_table);
    return false;
}

}  // namespace athena_pq

bool pq_lut_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor codebook, torch::Tensor partial,
                 torch::Tensor lr_b, torch::Tensor u_part,
                 int64_t N, int64_t GW, int64_t k_rows, int64_t chunks_per_blk, int64_t rows_per_chunk,
                 int64_t bits, int64_t slab_w, bool fp16_table,
                 torch::Tensor y, torch::Tensor lr_a, torch::Tensor bias, torch::Tensor sync,
                 int64_t up_off, int64_t glu_rows, int64_t epi_tile,
                 int64_t epi_poll_ns) {
    return athena_pq::pq_lut_gemv(x, qweight, codebook, partial, lr_b, u_part, N, GW, k_rows, chunks_per_blk,
                           rows_per_chunk, bits, slab_w, fp16_table, y, lr_a, bias, sync, up_off, glu_rows, epi_tile, epi_poll_ns);
}
"""

_CPP_DECL = """
bool pq_lut_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor codebook, torch::Tensor partial,
                 torch::Tensor lr_b, torch::Tensor u_part,
                 int64_t N, int64_t GW, int64_t k_rows, int64_t chunks_per_blk, int64_t rows_per_chunk,
                 int64_t bits, int64_t slab_w, bool fp16_table,
                 torch::Tensor y, torch::Tensor lr_a, torch::Tensor bias, torch::Tensor sync,
                 int64_t up_off, int64_t glu_rows, int64_t epi_tile,
                 int64_t epi_poll_ns);
"""


def cuda_source(t1_min_blocks_sm90: int | None = None) -> str:
    """The whole .cu translation unit (kernel, host launcher, dispatch over VARIANTS); `t1_min_blocks_sm90`
    overrides T1_MIN_BLOCKS_SM90 (benchmarks)."""
    mb = T1_MIN_BLOCKS_SM90 if t1_min_blocks_sm90 is None else t1_min_blocks_sm90
    dispatch = "\n".join(
        f"    if (T == {t} && bits == {b} && slab_w == {s} && fp16_table == {'true' if f else 'false'}) "
        f"return launch_lut<{t}, {b}, {s}, {'true' if f else 'false'}>(a, grid, stream);"
        for t, b, s, f in VARIANTS
    )
    return (kernel_source(mb) + _HOST_SRC_HEAD + dispatch + _HOST_SRC_TAIL)


def kernel_source(t1_min_blocks_sm90: int = T1_MIN_BLOCKS_SM90) -> str:
    """The device code alone (no torch headers): the emulated CPU tests and standalone nvcc checks."""
    return (_KERNEL_SRC.replace("namespace athena_pq {", f"namespace athena_pq {{\nconstexpr int THREADS = {THREADS};", 1)
            .replace("@T1_MIN_BLOCKS_SM90@", str(t1_min_blocks_sm90)))


EXTENSION = InlineExtension("athena_pq_cuda", f"the CUDA PQ decode kernel ({len(VARIANTS)} variants)", _CPP_DECL,
                            cuda_source, ["pq_lut_gemv"])


def load_extension(verbose: bool = False):
    """Compile on first use and return the module; RuntimeError with the compiler's message if it fails."""
    return EXTENSION.load(verbose)


def cuda_kernel_available() -> bool:
    """True when the extension is (or can be) built here; never raises (the build error is logged once)."""
    return EXTENSION.available()


def supports(geo: PQGeometry, tokens: int, dtype: torch.dtype) -> bool:
    """Whether an instantiated variant serves this layer and token count."""
    t_inst = next((t for t in TOKENS if t >= tokens), None)
    return (t_inst is not None and dtype == torch.float16 and geo.d <= 4 and (geo.k % 4 == 0 or geo.Nb == 1)
            and any((t, b, f) == (t_inst, geo.bits, True) and geo.GW % s == 0 for t, b, s, f in VARIANTS))


def usable(geo: PQGeometry, tokens: int, dtype: torch.dtype) -> bool:
    """`supports` and the extension builds here (built on the first call; a failure is logged once)."""
    return supports(geo, tokens, dtype) and cuda_kernel_available()


pq_gemv_cuda_reference = pq_gemv_reference


def pq_gemv_cuda(x, qweight, codebook, geo: PQGeometry, lowrank_a=None, lowrank_b=None, bias=None, *,
                 fp16_table: bool = True, slab_w: int | None = None, rows_per_chunk: int | None = None,
                 glu: tuple[int, int] | None = None, fused_epilogue: bool | None = None, epi_tile: int = EPI_TILE,
                 epi_poll_ns: int = EPI_POLL_NS):
    """CUDA lookup-table kernel for T <= 16 tokens, fp16. x [T, M] -> y [T, N] (fp16); with `glu` it
    returns silu(gate) · up instead. The split-K partial sums are finished by epilogue CTAs of the same
    launch (`fused_epilogue`; default: up to FUSED_EPILOGUE_MAX_TOKENS tokens where the layer allows it)
    or by `pq_gemv.splitk_epilogue`."""
    check_operands(x, qweight, codebook, geo, lowrank_a, lowrank_b, bias)
    check_cuda_fp16("pq_gemv_cuda", x, codebook, geo)
    T = x.shape[0]
    t_inst = next((t for t in TOKENS if t >= T), None)
    if t_inst is None:
        raise ValueError(f"pq_gemv_cuda takes at most {TOKENS[-1]} tokens, got {T}")
    if slab_w is None and rows_per_chunk is None and t_inst == 1 \
            and (1, geo.bits, T1_SLAB_W, fp16_table) in VARIANTS and geo.GW % T1_SLAB_W == 0:
        slab_w, rows_per_chunk = T1_SLAB_W, t1_rows_per_chunk(geo, x.device)  # the measured-best T = 1 launch
    if slab_w is None:
        slab_w = choose_slab_w(geo, t_inst, fp16_table, x.device)
    if (t_inst, geo.bits, slab_w, fp16_table) not in VARIANTS:
        raise ValueError(f"no CUDA variant for T={t_inst} bits={geo.bits} slab_w={slab_w} fp16_table={fp16_table}")
    if geo.GW % slab_w:
        raise ValueError(f"slab_w={slab_w} must divide GW={geo.GW}")
    ext = load_extension()
    n_slabs = geo.GW // slab_w
    if rows_per_chunk is None:
        rows_per_chunk = THREADS * ROWS_PER_THREAD  # one pass: every thread owns 4 rows
    chunks_per_block, _ = row_chunks(geo, rows_per_chunk)
    has_lr = lowrank_a is not None
    # fp16 partial sums (each over one slab's <= 32·PER_WORD·d columns, accumulated in fp32 registers):
    # half the bytes of fp32 written here and read by the epilogue, which sums them in fp32
    partial = torch.empty(n_slabs, t_inst, geo.N_pad, device=x.device, dtype=torch.float16)
    if has_lr:  # u = x Bᵀ, written whole by the kernel's u CTAs (one "slab" for the epilogue)
        u_part = torch.empty(1, t_inst, lowrank_b.shape[0], device=x.device, dtype=torch.float32)
        lr_b = lowrank_b if lowrank_b.dtype == torch.float16 else lowrank_b.half()
    else:
        u_part = lr_b = torch.empty(0, device=x.device, dtype=torch.float16)
    none = torch.empty(0, device=x.device, dtype=torch.float16)
    reason = fused_epilogue_reason(geo, t_inst, rows_per_chunk, lowrank_a, glu, x.device, THREADS) \
        if fused_epilogue is not False else "not asked for"
    if fused_epilogue and reason is not None:
        raise ValueError(f"pq_gemv_cuda: fused epilogue unavailable: {reason}")
    args = (x.contiguous(), qweight, codebook, partial, lr_b, u_part,
            geo.N, geo.GW, geo.k, chunks_per_block, rows_per_chunk, geo.bits, slab_w, fp16_table)
    if reason is None:  # y given: the kernel's epilogue CTAs write it (it returns whether they ran)
        y = torch.empty(T, glu[1] if glu is not None else geo.N, device=x.device, dtype=torch.float16)
        if ext.pq_lut_gemv(*args, y, lowrank_a if has_lr else none, bias.half() if bias is not None else none,
                           sync_buffer(x.device), glu[0] if glu is not None else 0, glu[1] if glu is not None else 0,
                           epi_tile, epi_poll_ns):
            return y
        reason = "more epilogue CTAs than the GPU holds at once"
        if fused_epilogue:
            raise ValueError(f"pq_gemv_cuda: fused epilogue unavailable: {reason}")
    else:
        ext.pq_lut_gemv(*args, none, none, none, torch.empty(0, device=x.device, dtype=torch.int32), 0, 0, 0, 0)
    if fused_epilogue is None and t_inst <= FUSED_EPILOGUE_MAX_TOKENS:
        log_once(log, ("pq_cuda", "unfused", geo.N, geo.M, glu), logging.INFO,
                 "cuda-decode %dx%d: split-K epilogue as a second launch (%s)", geo.N, geo.M, reason)
    return splitk_epilogue(partial, u_part if has_lr else None, lowrank_a, bias, T, geo.N, x.dtype, glu)
