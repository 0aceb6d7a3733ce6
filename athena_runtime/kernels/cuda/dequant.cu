// Ŵᵀ [M, N] as fp16 by a CUDA kernel, for the dequantize-then-cuBLAS path (prefill, many tokens).
//
//     Ŵᵀ[D·j + l, i] = C[i // k, j, l, I[i, j]]      (a pure gather: the output is bit-exact)
//
// The Triton kernel (dequant_matmul.py) gathers centroids through L1 and runs at about a third of copy
// bandwidth (H100). Here the gather reads shared memory, as in lut.cu:
//
//     CTA (row chunk, slab of SLAB_W index words), THREADS = 256; a chunk never crosses a codebook block
//       1. the chunk's codebook lines for the slab's PER_WORD·SLAB_W groups -> shared memory, l-major
//          as in the layout (for one (group, l) the n fp16 values are one 128-byte line at n = 64);
//          the thread's index words for the first pass are requested before, so both latencies overlap
//       2. passes of 1024 rows: a thread owns 4 consecutive rows (one int4 per word, streaming load);
//          for each word w, slot s and coordinate l it looks up 4 values and writes them with one
//          8-byte store to Ŵᵀ[D·j + l, 4q .. 4q+3]: a warp writes 256 contiguous bytes, and its 32
//          lanes read one group's line, so the lookups are free of bank conflicts whatever the indices
// Rows >= N and columns >= M are not written; neither are rows of a quad that belong to the
// neighbouring chunk (a codebook block of k % 4 != 0 rows: those quads are written element-wise).
//
// For the low-rank term of prefill ("rows", see dequant_matmul.py) the same launch can also
// fill E more rows of a taller destination: out[M + e, i] = A[i, e] for e < r, 0 for r <= e < E (one
// more grid column, about one slab's work), and `copy_pad_cols` builds [x | · | 0] for the GEMM.
//
// Host side, launch shapes and the PyTorch spec: athena_runtime/kernels/dequant.py.
#include "common.cuh"

namespace athena {
constexpr int DQ_MIN_BLOCKS = 2;  // __launch_bounds__: <= 128 registers (no spills, sm_89 / sm_90), 2 CTAs per SM

// fp16 values travel as raw 16-bit patterns (the gather is a copy); two patterns -> one 32-bit word
__device__ __forceinline__ uint32_t pair(uint32_t lo, uint32_t hi) { return __byte_perm(lo, hi, 0x5410); }


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
// out[col_s + D w + l, 4 r4 .. 4 r4 + 3] = C[l][entry of word w], one 8-byte store each (no tests). `tab_s`: the
// slot's codebook lines in shared memory; unrolled by template recursion over (w, l), so that each line's offset is
// a compile-time immediate of the 32-bit shared load (common.cuh).
template <int BITS, int D, int SLAB_W, int W = 0, int L = 0>
__device__ __forceinline__ void dequant_slot(const int4 (&words)[SLAB_W], int s, SmemAddr tab_s, uint16_t* dst,
                                             long long stride_out) {
    if constexpr (W < SLAB_W) {
        constexpr int OFF = (W * D + L) * (1 << BITS) * 2;
        const int4 wq = words[W];
        const SmemAddr a0 = tab_s + entry_offset<BITS>(wq.x, s), a1 = tab_s + entry_offset<BITS>(wq.y, s);
        const SmemAddr a2 = tab_s + entry_offset<BITS>(wq.z, s), a3 = tab_s + entry_offset<BITS>(wq.w, s);
        *reinterpret_cast<uint2*>(dst) = make_uint2(pair(lds_u16<OFF>(a0), lds_u16<OFF>(a1)),
                                                    pair(lds_u16<OFF>(a2), lds_u16<OFF>(a3)));
        if constexpr (L + 1 < D) dequant_slot<BITS, D, SLAB_W, W, L + 1>(words, s, tab_s, dst + stride_out, stride_out);
        else dequant_slot<BITS, D, SLAB_W, W + 1, 0>(words, s, tab_s, dst + stride_out, stride_out);
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

// grid (Nb * chunks_per_blk, GW / SLAB_W [+ 1 when extra_rows > 0]): chunks of rows_per_chunk rows that never
// cross a codebook block of k_rows rows, the extra column writes the rows below Ŵᵀ; THREADS threads,
// PER_WORD * SLAB_W * D * NC * 2 bytes of dynamic shared memory. The algorithm: the comment at the top.
template <int BITS, int D, int SLAB_W>
__global__ void __launch_bounds__(THREADS, DQ_MIN_BLOCKS) dequant_kernel(
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
    const SmemAddr cb_a = smem_addr32(cb_s);                        // its 32-bit shared address (common.cuh)

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
                    dequant_slot<BITS, D, SLAB_W>(cur, s, cb_a + s * SLAB_W * D * NC * 2, o + (size_t)col_s * stride_out,
                                                  stride_out);
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

}  // namespace athena
