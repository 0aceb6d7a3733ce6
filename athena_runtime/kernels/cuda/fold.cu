// (Ŵ + A B)ᵀ [M, N] as fp16 in one CUDA launch: the prefill weight with the low-rank term folded in.
//
//     out[c, i] = fp16( C[i // k, c // D, c % D, I[i, c // D]] + Σ_e A[i, e] B[e, c] )   (fp32 sum, one rounding)
//
// The dequantize-then-cuBLAS path (dequant_matmul.py) otherwise pays for the low-rank term with
// two or three more cuBLAS calls per layer (u = x Bᵀ, u Aᵀ, or an in-place pass over Ŵᵀ): GPU time, and
// host time that a 2048-token call cannot hide (H100: ~30 µs of host per cuBLAS call, BENCHMARKS.md §3).
// Here the r-term product rides in the dequantize on tensor cores, so prefill is this launch and one GEMM.
//
//     CTA (row chunk, slab of SLAB_W = 8 index words), THREADS = 256, a chunk never crosses a codebook block
//       1. the slab's codebook lines (all PER_WORD slots) and B's columns of those slots (transposed,
//          [column][rank], rows padded by 8 halves: conflict-free fragment loads) -> shared memory; then
//          each thread keeps its MMA A-operand fragments of B (every slot, all KS = rank / 16 k-steps) in
//          registers for the CTA's whole life (re-reading them every round made the kernel shared-memory
//          bound: 54 µs at 4096 x 4096 against 32 now, H100)
//       2. rounds of 64 rows: (a) warp w takes rows 8w..8w+7 and, per slot and 16-column m-tile,
//          mma.m16n8k16 (fp32) over the ranks gives Σ_e B[e, c] A[i, e] into a shared fp32 tile; its A
//          rows (the MMA B operand) and the next round's index words are requested a round ahead;
//          (b) a thread owns a quad of rows and one column of every slot, as in dequant.cu: it adds
//          the tile's four values to its four codebook entries and writes them with one 8-byte store (a
//          half-warp writes 128 contiguous bytes)
// Rows outside the chunk and columns >= M are not written. Needs rank % 16 == 0 (`pq_linear` pads the
// factors to 16) with B's fragments in at most FRAG_REGS registers (the 7B recipe: rank 48); dequant.py's
// `fold_supports` says which layers it serves (the others keep the "rows" / "addmm" modes of dequant_matmul.py).
// Host side and launch shapes: athena_runtime/kernels/dequant.py.
#include "common.cuh"

namespace athena {
constexpr int WARPS = THREADS / 32, SLAB_W = 8;
constexpr int RT = 8 * WARPS, LR_LD = RT + 4;  // rows per round (8 per warp), lr_s row stride (floats)


__device__ __forceinline__ float h2f(uint16_t bits) { return __half2float(*reinterpret_cast<const __half*>(&bits)); }
__device__ __forceinline__ uint16_t f2h(float v) {
    const __half h = __float2half_rn(v);
    return *reinterpret_cast<const uint16_t*>(&h);
}

// grid (Nb * chunks_per_blk, GW / SLAB_W), THREADS threads, `smem_bytes` of dynamic shared memory; two CTAs per SM
// (<= 128 registers: B's fragments stay in registers, VARIANTS keeps the variants without spills).
// Module docstring: the algorithm.
template <int BITS, int D, int KS>
__global__ void __launch_bounds__(THREADS, 2) fold_kernel(
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

}  // namespace athena
