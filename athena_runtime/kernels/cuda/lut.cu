// Lookup-table PQ kernel for one to 16 tokens: y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias with the tables in shared memory.
//
// For a token x and column group j the table entry of centroid c is L[t, j, c] = Σ_l C[β, j, l, c] x[t, d j + l], so
// y[t, i] = Σ_j L[t, j, I[i, j]]: one lookup and one add per index instead of d centroid loads and d FMAs. A CTA owns
// a (row chunk inside one codebook block β, slab of SLAB_W index words) pair: it builds the slab's PER_WORD·SLAB_W
// tables once (fp16, tokens innermost) and streams the chunk's rows through them, writing fp16 split-K partial sums
// [S, T, N_pad]. Per index: idx = (word >> s b) & (n - 1) (SHF + LOP3), acc += L_s[idx] (LDS at a compile-time
// offset, HADD2.F32, FADD). A thread owns 4 consecutive rows (one int4 per word of the word-major layout) and lane l
// holds rows 4l..4l+3, so for each (word, slot, row) the 32 lanes read one group's table: with n = 64 fp16 entries
// that is 128 bytes, one word per bank, and the lookup is free of bank conflicts whatever the indices.
//
// The low-rank share u = x Bᵀ [T, r] is computed by r extra CTAs at the front of the 1-D grid (the first wave), one
// rank each: a whole dot product over M (16-byte loads issued before any arithmetic, fp32, block reduction), plain
// stores. One token: the split-K sums are finished in the same launch by epilogue CTAs at the end of the grid
// (lut_epilogue.cuh); otherwise by the Triton split-K epilogue (athena_runtime/kernels/splitk.py).
// Host side, launch shapes and the PyTorch spec: athena_runtime/kernels/lut.py.
#include "common.cuh"

// A/B builds set this by a -D option (lut_matmul(..., defines=...)); the shipped build takes the default
#ifndef ATHENA_T1_MIN_BLOCKS_SM90
#define ATHENA_T1_MIN_BLOCKS_SM90 4
#endif

namespace athena {

// CTAs per SM the one-token fp16-table variants of <= 8-word slabs are compiled for (__launch_bounds__): on sm_90
// four fit in 64 registers without spills (2 CTAs more per SM than unbounded with nvcc 13, to hide the index loads'
// latency); sm_89 would spill at 64 and stays unbounded (90 registers with nvcc 13). Other variants: no bound.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define ATHENA_T1_MIN_BLOCKS ATHENA_T1_MIN_BLOCKS_SM90
#else
#define ATHENA_T1_MIN_BLOCKS 1
#endif
template <int T, int SLAB_W>
__host__ __device__ constexpr int lut_min_blocks() { return T == 1 && SLAB_W <= 8 ? ATHENA_T1_MIN_BLOCKS : 1; }

// u CTA: u[t] = sum_m x[t, m] b[m] over all M columns for one rank (u, b: that rank's column / row);
// rows t >= t_valid get 0. The first m_vec columns (a multiple of 8; 0 when rows are not 16-byte aligned)
// in int4 loads, U per thread and token issued before any arithmetic; the rest one half at a time.
template <int T>
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


#include "lut_epilogue.cuh"

// 1-D grid of rank + n_row_progs * (GW / SLAB_W) + n_epi CTAs, THREADS threads: the first `rank` compute u = x Bᵀ
// (one rank each), then the (row program, slab) CTAs, row program fastest, then the n_epi epilogue CTAs (one
// token; 0 otherwise). Dynamic shared memory: max(the tables, the epilogue's tiles).
template <int T, int BITS, int SLAB_W>
__global__ void __launch_bounds__(THREADS, (lut_min_blocks<T, SLAB_W>())) lut_kernel(
    const __half* __restrict__ x, int stride_xt, int t_valid, int M,      // x [t_valid, M]
    const int* __restrict__ qweight, int N_pad,                           // [GW, N_pad] int32
    const __half* __restrict__ codebook, int G_pad, int D,                // [Nb, G_pad, D, NC]
    int N, int GW, int k_rows, int chunks_per_blk, int rows_per_chunk,
    int n_row_progs, __half* __restrict__ partial,                        // [S, T, N_pad] fp16
    const __half* __restrict__ lr_b, int stride_br, int rank, int m_vec,  // [rank, M] (rank 0: none)
    float* __restrict__ u,                                                // [T, rank] fp32
    EpiArgs ep)                                                           // fused epilogue (ep.n_epi > 0)
{
    constexpr int NC = 1 << BITS, PER_WORD = 32 / BITS, VEC = 8, NVEC = NC / VEC;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __half* lut = reinterpret_cast<__half*>(smem_raw);                    // [PER_WORD][SLAB_W][T][NC]

    if ((int)blockIdx.x < rank) {  // a u CTA
        lowrank_u<T>(x, stride_xt, t_valid, M, m_vec, lr_b + (size_t)blockIdx.x * stride_br, u + blockIdx.x,
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
            fused_epilogue<T>(blockIdx.x - rank - n_table, partial, N_pad, n_slabs, u, rank, t_valid, ep, rp,
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
                const __half* tab = lut + ((s * SLAB_W + w) * T) * NC;
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const uint32_t idx = (wd[r] >> (s * BITS)) & (NC - 1);
#pragma unroll
                    for (int t = 0; t < T; ++t) acc[r][t] += __half2float(tab[t * NC + idx]);
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

}  // namespace athena
