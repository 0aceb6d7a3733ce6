// PQ matmul for a batch of decode tokens: codebook entries looked up straight into tensor-core fragments.
//
// With d = 2, one codebook entry is two adjacent columns of Ŵ — exactly the pair of fp16 values a
// thread holds in a register of an mma.m16n8k16 B fragment (B[k = 2c, 2c+1][n = g]). So a 32-bit
// shared-memory load of the entry *is* the operand: no decoded Ŵ tile is written or re-read, and a
// weight costs half a lookup (one load per two weights) plus its share of the tensor-core work.
//
//     Y[t, i] = Σ_k x[t, k] Ŵ[i, k]:   A = x tile [16 tokens, 16 k]   (ldmatrix from shared memory)
//                                      B = Ŵᵀ tile [16 k, 8 rows]     (two codebook lookups per thread)
//                                      C = fp32 [16 tokens, 8 rows]   (registers, over the CTA's K range)
//
// CTA (row tile of R = 64·NR rows, K split), 8 warps side by side over rows (8·NR rows each, all T_PAD
// tokens). K is walked in stages of 8 index words = PER_WORD k-steps of 16 columns: with the plane
// layout (`layout.py`), slot s of words w0..w0+7 holds groups s·GW + w0 + p, p = 0..7, i.e. 16
// contiguous columns of x, and column pair p of the k-step is group p. A stage in shared memory:
//     Wd  index words [8][R + 8]                  padded so a warp's word loads hit 32 banks
//     Cb  codebook lines [PER_WORD][8][2][n] fp16 as stored (the 8 groups of a slot are 2 KB in a row)
//     Xs  x columns [T_PAD][PER_WORD·16 + 8]      zero-filled past the tokens / columns
//     Bs  B rows [8][PER_WORD·16 + 8]             low-rank CTAs only (below)
// all requested with cp.async, STAGES - 1 stages ahead. Each stage's codebook lines are then transposed
// once into one interleaved buffer (the two coordinates of an entry side by side, so a B-operand
// register is ONE 32-bit lookup); the four groups one lookup instruction touches (c = lane % 4) own
// four separate bank octets, and the transpose's own reads and writes are free of bank conflicts.
//
// The low-rank share u = x Bᵀ: CTAs of row tile j < rank / 8 also multiply their split's x columns by
// B rows 8j .. 8j + 7 (one more n8 operand per k-step, from Bs), giving u partial sums [S, T_PAD, rank];
// ranks that do not fit that (`in_kernel_lowrank`) fall back to u by cuBLAS. Split-K partial sums (fp16,
// [S, T_PAD, N_pad]) are finished by the Triton split-K epilogue (splitk.py), which adds A·u and the bias (and, for a
// fused gate/up layer, returns silu(gate)·up). Instantiated for d = 2, b = 6 (the default
// recipe); sm_80-class instructions only (cp.async, ldmatrix, mma.sync): Ada and Hopper alike.
// Host side and launch shapes: athena_runtime/kernels/frag.py.
#include "common.cuh"

namespace athena {
constexpr int WORDS = 8, WARPS = THREADS / 32;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

template <int T_PAD, int NR, int BITS>
struct FragGeometry {
    static constexpr int NC = 1 << BITS, PER_WORD = 32 / BITS, R = 64 * NR;
    static constexpr int WD_LD = R + 8;                    // words; a warp's word loads hit 32 banks
    static constexpr int XS_LD = PER_WORD * 16 + 8;        // halves; 16-byte rows, conflict-free ldmatrix
    static constexpr int WD_WORDS = WORDS * WD_LD, CB_WORDS = PER_WORD * WORDS * NC, XS_WORDS = T_PAD * XS_LD / 2;
    static constexpr int BS_WORDS = 8 * XS_LD / 2;         // 8 rows of B (low-rank) beside the x columns
    static constexpr int STAGE_WORDS = WD_WORDS + CB_WORDS + XS_WORDS + BS_WORDS;
};

// interleaved codebook: entry e of group p (0..7) of a slot at word ((p>>2)·8 + e>>3)·32 + (p&3)·8 + (e&7)
// (n = 64): the four groups one lookup instruction touches (p = c or c + 4, c = lane % 4) own eight banks each
__device__ __forceinline__ int icb_word(int p, int e) { return ((p >> 2) * 8 + (e >> 3)) * 32 + (p & 3) * 8 + (e & 7); }
// raw codebook line chunk q (8 entries) of group p, coordinate l, in the staging copy (halves): chunks
// rotated by 2·(p & 3) so the transpose's 8-byte reads of four groups hit distinct banks
__device__ __forceinline__ int raw_half(int p, int l, int q) { return (p * 2 + l) * 64 + 8 * ((q + 2 * (p & 3)) & 7); }

// grid (ceil(N_pad / R), S); THREADS threads; dynamic shared memory: frag.py smem_bytes
template <int T_PAD, int NR, int BITS, int STAGES>
__global__ void __launch_bounds__(THREADS, 2) frag_kernel(
    const __half* __restrict__ x, int stride_xt, int t_valid, int M,     // x [t_valid, M]
    const int* __restrict__ qweight, int N_pad,                          // [GW, N_pad]
    const __half* __restrict__ codebook, int G_pad,                      // [Nb, G_pad, 2, NC]
    int GW, int k_rows, int words_per_split,
    __half* __restrict__ partial,                                        // [S, T_PAD, N_pad]
    const __half* __restrict__ lr_b, int stride_br, int rank,            // B [rank, M] (rank % 8 == 0) or null
    float* __restrict__ u_part)                                          // [S, T_PAD, rank]
{
    using Geo = FragGeometry<T_PAD, NR, BITS>;
    constexpr int NC = Geo::NC, PER_WORD = Geo::PER_WORD, R = Geo::R, WD_LD = Geo::WD_LD, XS_LD = Geo::XS_LD;
    static_assert(NC == 64, "the interleaved codebook layout is written for n = 64");
    constexpr int WD_CHUNKS = WORDS * R / 4, CB_CHUNKS = PER_WORD * WORDS * 2 * NC / 8, X_CHUNKS = T_PAD * PER_WORD * 2;
    constexpr int B_CHUNKS = 8 * PER_WORD * 2;
    static_assert(B_CHUNKS <= THREADS && WORDS * 2 * NC / 8 * 2 == THREADS, "one chunk of B per thread; two slots per 256 threads");
    constexpr int MT = T_PAD / 16;
    extern __shared__ __align__(16) uint32_t smem[];
    uint32_t* icb = smem + STAGES * Geo::STAGE_WORDS;  // the current stage's interleaved codebooks

    const int row0 = blockIdx.x * R, split = blockIdx.y;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
    const int w_begin = split * words_per_split, w_end = min(w_begin + words_per_split, GW);
    const int n_stages = (w_end - w_begin) / WORDS;
    const __half* cb_blk = codebook + (size_t)(row0 / k_rows) * G_pad * 2 * NC;
    // the low-rank share u = x Bᵀ: CTA column blockIdx.x < rank / 8 also multiplies its split's x columns
    // by B rows 8·blockIdx.x .. +8 (warp m < MT: tokens 16m .. 16m + 15)
    const bool lr_cta = lr_b != nullptr && (int)blockIdx.x * 8 < rank;
    const int lr_row = 8 * blockIdx.x;

    // a stage: index words [WORDS][R], codebook lines [PER_WORD][WORDS][2][NC] (fp16, chunks rotated),
    // x columns [T_PAD][PER_WORD·16] (+ B rows [8][PER_WORD·16] in low-rank CTAs); all cp.async
    // Per-thread parts of the copy and transpose addresses, fixed for the whole K walk: with 256 threads
    // a thread's j-th index-word chunk is word column w_t + j·(256 / (R/4)) of the same rows, its j-th
    // codebook chunk and transpose unit are slot s_t + 2j of the same (group, coordinate, chunk).
    static_assert(THREADS == 256 && 256 % (R / 4) == 0 && WD_CHUNKS % THREADS == 0, "address strides below");
    constexpr int WD_PT = WD_CHUNKS / THREADS, WD_STEP = THREADS / (R / 4);
    constexpr int SLOT_PT = (PER_WORD + 1) / 2;  // slots s_t + 2j < PER_WORD, s_t = tid / 128
    const int s_t = tid >> 7;
    const int wd_q = tid % (R / 4), wd_row = row0 + 4 * wd_q;
    const bool wd_ok = wd_row < N_pad;
    const int wd_src = (tid / (R / 4)) * N_pad + min(wd_row, N_pad - 4);
    const uint32_t wd_dst = 4 * ((tid / (R / 4)) * WD_LD + 4 * wd_q);
    const int cb_q = tid & 7, cb_l = (tid >> 3) & 1, cb_p = (tid >> 4) & 7;
    const int cb_src = (s_t * GW + cb_p) * 2 * NC + cb_l * NC + 8 * cb_q;
    const uint32_t cb_dst = 2 * (s_t * WORDS * 2 * NC + raw_half(cb_p, cb_l, cb_q));
    const int tr_p = (tid & 3) + 4 * ((tid >> 6) & 1), tr_h = (tid >> 2) & 1, tr_q = (tid >> 3) & 7;
    const int tr_src = s_t * WORDS * 2 * NC + raw_half(tr_p, 0, tr_q) + 4 * tr_h;   // halves
    const int tr_dst = s_t * WORDS * NC + icb_word(tr_p, 8 * tr_q + 4 * tr_h);      // words

    auto stage_base = [&](int st) { return smem + (st % STAGES) * Geo::STAGE_WORDS; };
    // a stage: index words [WORDS][R], codebook lines [PER_WORD][WORDS][2][NC] (fp16, chunks rotated),
    // x columns [T_PAD][PER_WORD·16] (+ B rows [8][PER_WORD·16] in low-rank CTAs); all cp.async
    auto issue = [&](int st) {
        uint32_t* base = stage_base(st);
        const int w0 = w_begin + st * WORDS;
        const uint32_t wd = smem_addr(base), cb = smem_addr(base + Geo::WD_WORDS);
        const uint32_t xs = smem_addr(base + Geo::WD_WORDS + Geo::CB_WORDS);
        const int* wsrc = qweight + (size_t)w0 * N_pad + wd_src;
#pragma unroll
        for (int j = 0; j < WD_PT; ++j)
            cp_async16(wd + wd_dst + 4 * j * WD_STEP * WD_LD, wsrc + (size_t)j * WD_STEP * N_pad, wd_ok);
        const __half* csrc = cb_blk + (size_t)w0 * 2 * NC + cb_src;
#pragma unroll
        for (int j = 0; j < SLOT_PT; ++j)
            if (s_t + 2 * j < PER_WORD)
                cp_async16(cb + cb_dst + 2 * j * (2 * WORDS * 2 * NC), csrc + (size_t)j * 2 * GW * 2 * NC, true);
        for (int e = tid; e < X_CHUNKS; e += THREADS) {
            const int t = e / (PER_WORD * 2), s = (e / 2) % PER_WORD, h = e % 2;
            const int col = 2 * (s * GW + w0) + 8 * h;
            const bool ok = t < t_valid && col < M;
            cp_async16(xs + 2 * (t * XS_LD + s * 16 + 8 * h), x + (ok ? (size_t)t * stride_xt + col : 0), ok);
        }
        if (lr_cta && tid < B_CHUNKS) {
            const uint32_t bs = xs + 4 * Geo::XS_WORDS;
            const int r = tid / (PER_WORD * 2), s = (tid / 2) % PER_WORD, h = tid % 2;
            const int col = 2 * (s * GW + w0) + 8 * h;
            const bool ok = lr_row + r < rank && col < M;
            cp_async16(bs + 2 * (r * XS_LD + s * 16 + 8 * h), lr_b + (ok ? (size_t)(lr_row + r) * stride_br + col : 0), ok);
        }
    };
    // raw lines -> interleaved half2 entries; unit u = (s, p>>2, q, h, p&3) from high to low bits: a warp's
    // 8-byte reads and 16-byte writes are both free of bank conflicts
    auto transpose = [&](const uint32_t* base) {
        const unsigned short* raw = reinterpret_cast<const unsigned short*>(base + Geo::WD_WORDS) + tr_src;
#pragma unroll
        for (int j = 0; j < SLOT_PT; ++j) {
            if (s_t + 2 * j < PER_WORD) {
                const unsigned short* line = raw + j * 2 * WORDS * 2 * NC;
                const uint2 lo = *reinterpret_cast<const uint2*>(line);
                const uint2 hi = *reinterpret_cast<const uint2*>(line + NC);
                *reinterpret_cast<uint4*>(icb + tr_dst + j * 2 * WORDS * NC) =
                    make_uint4(__byte_perm(lo.x, hi.x, 0x5410), __byte_perm(lo.x, hi.x, 0x7632),
                               __byte_perm(lo.y, hi.y, 0x5410), __byte_perm(lo.y, hi.y, 0x7632));
            }
        }
    };

    float acc[MT][NR][4], uacc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < NR; ++n)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[m][n][v] = 0.f;

#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {  // prologue: STAGES - 1 stages requested
        if (st < n_stages) issue(st);
        cp_async_commit();
    }

    const int wrow = warp * 8 * NR;  // this warp's first row in the tile
    // ldmatrix row address of this lane: matrix q = lane / 8 -> tokens (q & 1)·8 + lane % 8, k (q >> 1)·8
    const int xs_lane = 2 * (((lane >> 3) & 1) * 8 + (lane & 7)) * XS_LD + 2 * (lane >> 4) * 8;
    const int icb_lo = icb_word(c, 0), icb_hi = icb_word(c + 4, 0);  // groups p = c and p = c + 4
    const bool lr_warp = lr_cta && warp < MT;

    for (int st = 0; st < n_stages; ++st) {
        cp_async_wait<STAGES - 2>();  // this stage has landed (later ones may be in flight)
        __syncthreads();              // ... for every thread; everyone is done with stage st - 1 and icb
        if (st + STAGES - 1 < n_stages) issue(st + STAGES - 1);  // into the buffer stage st - 1 used
        cp_async_commit();
        const uint32_t* base = stage_base(st);
        transpose(base);
        __syncthreads();

        const uint32_t xs_s = smem_addr(base + Geo::WD_WORDS + Geo::CB_WORDS) + xs_lane;
        const uint32_t* bs = base + Geo::WD_WORDS + Geo::CB_WORDS + Geo::XS_WORDS;
        uint32_t wlo[NR], whi[NR];
#pragma unroll
        for (int n = 0; n < NR; ++n) {
            wlo[n] = base[c * WD_LD + wrow + 8 * n + g];
            whi[n] = base[(c + 4) * WD_LD + wrow + 8 * n + g];
        }
#pragma unroll
        for (int s = 0; s < PER_WORD; ++s) {
            uint32_t a[MT][4];
#pragma unroll
            for (int m = 0; m < MT; ++m)
                ldmatrix_x4(xs_s + 2 * (m * 16 * XS_LD + s * 16), a[m][0], a[m][1], a[m][2], a[m][3]);
            // column pair c of the k-step is group p = c (word c), pair c + 4 is group c + 4 (word c + 4);
            // icb_word(p, e) = icb_word(p, 0) + (e & 7) + 32 (e >> 3) = icb_word(p, 0) + e + 3 (e & ~7)
            const uint32_t* slot = icb + s * WORDS * NC;
            uint32_t b0[NR], b1[NR];
#pragma unroll
            for (int n = 0; n < NR; ++n) {
                const uint32_t elo = (wlo[n] >> (BITS * s)) & (NC - 1), ehi = (whi[n] >> (BITS * s)) & (NC - 1);
                b0[n] = slot[icb_lo + elo + 3 * (elo & ~7u)];
                b1[n] = slot[icb_hi + ehi + 3 * (ehi & ~7u)];
            }
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int n = 0; n < NR; ++n) mma16816(acc[m][n], a[m], b0[n], b1[n]);
            if (lr_warp) {  // B rows as the n8 operand: b = B[row g][k 2c, 2c+1] and [k 2c + 8, 2c + 9]
                const uint32_t* brow = bs + g * (XS_LD / 2) + s * 8 + c;
#pragma unroll
                for (int m = 0; m < MT; ++m)
                    if (m == warp) mma16816(uacc, a[m], brow[0], brow[4]);
            }
        }
    }
    cp_async_wait<0>();

    // ---- fp16 partial sums: C[m][n] holds (token 16m + g (+8), rows wrow + 8n + 2c, +1)
    __half* out = partial + (size_t)split * T_PAD * N_pad;
#pragma unroll
    for (int n = 0; n < NR; ++n) {
        const int row = row0 + wrow + 8 * n + 2 * c;
        if (row >= N_pad) continue;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const int t = 16 * m + g;
            if (t < t_valid)
                *reinterpret_cast<__half2*>(out + (size_t)t * N_pad + row) = __floats2half2_rn(acc[m][n][0], acc[m][n][1]);
            if (t + 8 < t_valid)
                *reinterpret_cast<__half2*>(out + (size_t)(t + 8) * N_pad + row) = __floats2half2_rn(acc[m][n][2], acc[m][n][3]);
        }
    }
    if (lr_warp) {  // u partial sums over this split's columns: (token 16·warp + g (+8), ranks lr_row + 2c, +1)
        float* u = u_part + (size_t)split * T_PAD * rank + lr_row + 2 * c;
        const int t = 16 * warp + g;
        *reinterpret_cast<float2*>(u + (size_t)t * rank) = make_float2(uacc[0], uacc[1]);
        *reinterpret_cast<float2*>(u + (size_t)(t + 8) * rank) = make_float2(uacc[2], uacc[3]);
    }
}

}  // namespace athena
