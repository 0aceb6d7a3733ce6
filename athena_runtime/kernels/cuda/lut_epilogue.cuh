// The one-token split-K epilogue of the lookup-table launch: device code that lut.cu includes inside namespace
// athena (the host side: athena_runtime/kernels/lut.py).
#pragma once
// Fused split-K epilogue (EpiArgs.n_epi > 0): extra CTAs at the end of the grid finish y themselves, so no
// second launch. Table CTAs publish their partial sums with a release add on their row program's counter (after
// a barrier, so it orders the whole CTA's stores), the u CTAs theirs on sync[0]; an epilogue CTA waits (thread 0,
// acquire loads with back-off) only for the row programs its rows lie in, then sums the slabs from L2. The
// epilogue CTA that is last past its waits zeroes the counters for the next call (self-cleaning: CUDA graphs
// replay it unchanged). Deadlock-free whatever order the CTAs start in: only the n_epi epilogue CTAs wait, on
// CTAs that never wait, and the launcher fuses only where n_epi is below the number of CTAs the GPU holds at
// once (a slot is always left for the CTAs they wait on).
struct EpiArgs {
    int* sync;                          // [2 + n_row_progs] int32, zero between calls: u done, epilogue done, arrivals
    __half* y; int stride_yt;           // out [t_valid, n_out]
    const __half* lr_a; int stride_an;  // A [N, rank] (rank % 8 == 0, 16-byte rows) or nullptr
    const __half* bias;                 // [N] or nullptr
    int n_out, up_off, glu;             // glu: y = silu(z[:, :n_out]) · z[:, up_off:up_off + n_out]
    int n_epi, tile;                    // epilogue CTAs (0: not fused), rows per CTA (a multiple of 8 dividing 8 * THREADS)
    int poll_ns;                        // back-off between two reads of a counter
};

#ifndef ATHENA_CUDA_EMULATION
__device__ __forceinline__ void add_release(int* p, int v) {  // orders the CTA's writes before it (after a barrier)
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
#else  // the CPU emulation of the CI tests (tests/cuda_emulation.py): C++ atomics instead of PTX
inline void add_release(int* p, int v) { __atomic_fetch_add(p, v, __ATOMIC_RELEASE); }
inline int ld_acquire(const int* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
#endif

struct RowProgs {  // the (codebook block, row chunk) programs of the table CTAs
    int k_rows, chunks_per_blk, rows_per_chunk, N;
    __device__ __forceinline__ int of_row(int r) const {
        const int blk = r / k_rows;
        return blk * chunks_per_blk + (r - blk * k_rows) / rows_per_chunk;
    }
    __device__ __forceinline__ bool has_rows(int p) const {
        const int blk = p / chunks_per_blk, rs = blk * k_rows + (p % chunks_per_blk) * rows_per_chunk;
        return rs < min(min(rs + rows_per_chunk, (blk + 1) * k_rows), N);
    }
    // thread 0: wait until every program with rows in [lo, hi) has all n_slabs arrivals
    __device__ __forceinline__ void wait(const int* arrive, int lo, int hi, int n_slabs, int poll_ns) const {
        for (int p = of_row(lo), pe = of_row(hi - 1); p <= pe; ++p)
            if (has_rows(p))
                while (ld_acquire(arrive + p) < n_slabs) __nanosleep(poll_ns);
    }
};

// One epilogue CTA: rows [lo, hi) of y (and the up rows up_off + [lo, hi) with GLU), every token:
// z = Σ_s partial[s, t, row] + A[row] · u[t] + bias[row]. Before the partial sums can be waited for, the CTA
// takes what does not depend on them: the bias and, once the u CTAs (the first wave) are done, A[row] · u[t]
// in registers. After the wait one L2 round trip is left: lane l of a group of tile / 8 lanes reads rows
// 8l..8l+7 (16 bytes) of slabs g, g + groups, ...: a few loads per thread, all in flight at once.
template <int T>
__device__ __forceinline__ void fused_epilogue(int e, const __half* __restrict__ partial, int N_pad, int n_slabs,
                                               const float* __restrict__ u, int rank, int t_valid,
                                               const EpiArgs& ep, const RowProgs& rp, int n_row_progs,
                                               float* smem) {
    constexpr int WARPS = THREADS / 32;
    const int tile = ep.tile, lo = e * tile, hi = min(lo + tile, ep.n_out), parts = ep.glu ? 2 : 1;
    const int lanes = tile / 8, groups = THREADS / lanes, lr = threadIdx.x % lanes, g = threadIdx.x / lanes;
    float* red = smem;                       // [parts][WARPS][tile]: each warp's sum over its groups
    float* u_s = smem + parts * WARPS * tile;  // [T][rank]
    const int i = threadIdx.x, row = lo + i;
    const bool fin = i < tile && row < hi;   // this thread finishes row `row` (and its up row)
    float z[T][2];
#pragma unroll
    for (int t = 0; t < T; ++t) {
        z[t][0] = fin && ep.bias != nullptr ? __half2float(ep.bias[row]) : 0.f;
        z[t][1] = fin && ep.bias != nullptr && ep.glu ? __half2float(ep.bias[ep.up_off + row]) : 0.f;
    }
    if (rank > 0) {  // z += A[row] · u[t]: u from the u CTAs, long done by the time a table CTA is
        if (threadIdx.x == 0)
            while (ld_acquire(ep.sync) < rank) __nanosleep(32);
        __syncthreads();
        for (int k = threadIdx.x; k < T * rank; k += THREADS) u_s[k] = __ldcg(u + k);
        __syncthreads();
        if (fin) {
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                if (p >= parts) break;
                const int4* a4 = reinterpret_cast<const int4*>(ep.lr_a + (size_t)(row + p * ep.up_off) * ep.stride_an);
                for (int c = 0; c < rank / 8; ++c) {
                    const int4 raw = __ldg(a4 + c);
                    const __half2* a2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
                    for (int t = 0; t < T; ++t) {
                        const float* ut = u_s + t * rank + 8 * c;
                        float v = z[t][p];
#pragma unroll
                        for (int q = 0; q < 4; ++q) {
                            const float2 af = __half22float2(a2[q]);
                            v = fmaf(af.x, ut[2 * q], fmaf(af.y, ut[2 * q + 1], v));
                        }
                        z[t][p] = v;
                    }
                }
            }
        }
    }
    int ticket = 0;
    if (threadIdx.x == 0) {
        rp.wait(ep.sync + 2, lo, hi, n_slabs, ep.poll_ns);
        if (ep.glu) rp.wait(ep.sync + 2, ep.up_off + lo, ep.up_off + hi, n_slabs, ep.poll_ns);
        // every wait of this CTA is over: the CTA with the last ticket zeroes the counters when it is done
        // (the host makes sure every row program with rows is waited for by some epilogue CTA)
        ticket = atomicAdd(ep.sync + 1, 1);
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < T; ++t) {
        if (t >= t_valid) break;
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            if (p >= parts) break;
            float acc[8];
#pragma unroll
            for (int v = 0; v < 8; ++v) acc[v] = 0.f;
            if (lo + 8 * lr < hi) {  // 8 rows (N_pad % 8 == 0; rows past hi are summed, not used)
                const __half* base = partial + (size_t)t * N_pad + p * ep.up_off + lo + 8 * lr;
#pragma unroll 8
                for (int s = g; s < n_slabs; s += groups) {
                    const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(base + (size_t)s * T * N_pad));
                    const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
                    for (int v = 0; v < 4; ++v) {
                        const float2 f = __half22float2(h2[v]);
                        acc[2 * v] += f.x;
                        acc[2 * v + 1] += f.y;
                    }
                }
            }
            for (int o = lanes; o < 32; o <<= 1)  // the warp's groups (lanes < 32: several groups per warp)
#pragma unroll
                for (int v = 0; v < 8; ++v) acc[v] += __shfl_xor_sync(0xffffffffu, acc[v], o);
            if (threadIdx.x % 32 < lanes) {
                float4* dst = reinterpret_cast<float4*>(red + (p * WARPS + threadIdx.x / 32) * tile
                                                        + 8 * lr);
                dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
                dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
            }
        }
        __syncthreads();
        if (fin) {
            float zz[2] = {0.f, 0.f};
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                if (p >= parts) break;
                float v = z[t][p];
#pragma unroll
                for (int w = 0; w < WARPS; ++w) v += red[(p * WARPS + w) * tile + i];
                zz[p] = v;
            }
            __half out;
            if (ep.glu) {  // the roundings of the unfused layer followed by a SiLU-mul
                const float gf = __half2float(__float2half_rn(zz[0]));
                out = __hmul(__float2half_rn(gf / (1.f + __expf(-gf))), __float2half_rn(zz[1]));
            } else {
                out = __float2half_rn(zz[0]);
            }
            ep.y[(size_t)t * ep.stride_yt + row] = out;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && ticket == ep.n_epi - 1) {  // the last epilogue CTA past its waits: zero the counters
        for (int p = 0; p < n_row_progs; ++p) ep.sync[2 + p] = 0;
        ep.sync[0] = 0;
        ep.sync[1] = 0;
    }
}

