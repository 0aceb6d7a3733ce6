/* CPU linear layers with compressed weights and fp32 activations (athena_runtime/cpu/linear.py).

   i8_linear:  y[t, n] = scale[n] * sum_m x[t, m] * W[n, m] (+ bias[n])     W int8 [N, M]
   f16_linear: y[t, n] =            sum_m x[t, m] * W[n, m] (+ bias[n])     W float16 bits [N, M]
   q8g_linear: y[t, n] = sum_g scale[n, g] * sum_{m in group g} x[t, m] * W[n, m] (+ bias[n])
               W int8 [N, M], groups of 32 columns (the last one may be shorter), scale float32 [N, ceil(M/32)],
               both stored in panels of 8 rows (see the q8g section)
   pq8_linear: a PQ layer's exact u8 form (linear.py), W stored in panels of 8 rows (see the pq8 section):
               rows [start[b], start[b+1]) of block b have
               W_eff[n, m] = colmin[b, m] + colscale[b, m] * W[n, m] + sum_r A[n, r] B[r, m], W uint8 [N, M],
               so y[t, n] = sum_m (x[t, m] colscale[b, m]) W[n, m] + sum_m x[t, m] colmin[b, m]
                            + sum_r A[n, r] (sum_m B[r, m] x[t, m]) (+ bias[n])
               A float16 bits [N, R] stored per panel as [P][R][8 rows], B float16 bits [R, M] (R may be 0).

   x [T, M] and y [T, N] float32, row-major and contiguous. Accumulation in float32. Decode is
   memory-bound: each weight row is converted in registers once per pair of tokens (x rows stay in
   L1/L2). Rows are split over OpenMP threads (the process's OpenMP
   runtime: PyTorch's, so torch.set_num_threads governs it; `threads` is passed explicitly).
   Built with -march=native by build.py; without AVX2 the scalar loops below run. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "half.h"

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256 load_i8x8(const int8_t *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

static inline __m256 load_u8x8(const uint8_t *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

static inline __m256 load_f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
#endif

/* Register blocking (AVX2 has 16 vector registers): one token against 8 rows (8 independent FMA
   chains: a single chain would be bound by FMA latency, not memory), or 2 tokens against 4 rows.
   Each weight vector is converted once and used for every token of the block. */
#ifdef __AVX2__
#define BLOCKS(SUFFIX, WTYPE, LOADW)                                                                \
static inline void rows8_t1_##SUFFIX(const float *x, int64_t M, const WTYPE *w, float *out) {       \
    __m256 a[8];                                                                                    \
    for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();                                         \
    int64_t m = 0;                                                                                  \
    for (; m + 8 <= M; m += 8) {                                                                    \
        __m256 xv = _mm256_loadu_ps(x + m);                                                         \
        for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(xv, LOADW(w + r * M + m), a[r]);         \
    }                                                                                               \
    for (int r = 0; r < 8; r++) out[r] = hsum8(a[r]);                                               \
    for (; m < M; m++)                                                                              \
        for (int r = 0; r < 8; r++) out[r] += x[m] * SCALAR_##SUFFIX(w[r * M + m]);                 \
}                                                                                                   \
static inline void rows4_t2_##SUFFIX(const float *x, int64_t M, const WTYPE *w, float *out) {       \
    __m256 a[4][2];                                                                                 \
    for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();                            \
    int64_t m = 0;                                                                                  \
    for (; m + 8 <= M; m += 8) {                                                                    \
        __m256 x0 = _mm256_loadu_ps(x + m), x1 = _mm256_loadu_ps(x + M + m);                        \
        for (int r = 0; r < 4; r++) {                                                               \
            __m256 wv = LOADW(w + r * M + m);                                                       \
            a[r][0] = _mm256_fmadd_ps(x0, wv, a[r][0]);                                             \
            a[r][1] = _mm256_fmadd_ps(x1, wv, a[r][1]);                                             \
        }                                                                                           \
    }                                                                                               \
    for (int r = 0; r < 4; r++) { out[2 * r] = hsum8(a[r][0]); out[2 * r + 1] = hsum8(a[r][1]); }   \
    for (; m < M; m++)                                                                              \
        for (int r = 0; r < 4; r++) {                                                               \
            float wm = SCALAR_##SUFFIX(w[r * M + m]);                                               \
            out[2 * r] += x[m] * wm;                                                                \
            out[2 * r + 1] += x[M + m] * wm;                                                        \
        }                                                                                           \
}
#else
#define BLOCKS(SUFFIX, WTYPE, LOADW)
#endif

/* One row, one token (tails and builds without AVX2). */
#define ROW1(SUFFIX, WTYPE)                                                                         \
static inline float row1_##SUFFIX(const float *x, int64_t M, const WTYPE *w) {                      \
    float s = 0.0f;                                                                                 \
    for (int64_t m = 0; m < M; m++) s += x[m] * SCALAR_##SUFFIX(w[m]);                              \
    return s;                                                                                       \
}

#define SCALAR_i8(v) ((float)(v))
#define SCALAR_f16(v) half_to_float(v)
BLOCKS(i8, int8_t, load_i8x8)
BLOCKS(f16, uint16_t, load_f16x8)
ROW1(i8, int8_t)
ROW1(f16, uint16_t)

#define ROWS_PER_TASK 32

/* Rows [n0, n1) of y for all T tokens. */
#ifdef __AVX2__
#define ROWS_SIMD(SUFFIX)                                                                           \
    int64_t t = 0;                                                                                  \
    for (; t + 2 <= T; t += 2) {                                                                    \
        const float *xt = x + t * M;                                                                \
        for (; n + 4 <= n1; n += 4) {                                                               \
            float o[8];                                                                             \
            rows4_t2_##SUFFIX(xt, M, W + n * M, o);                                                 \
            for (int r = 0; r < 4; r++) {                                                           \
                y[t * N + n + r] = o[2 * r] * SC(n + r) + B(n + r);                                 \
                y[(t + 1) * N + n + r] = o[2 * r + 1] * SC(n + r) + B(n + r);                       \
            }                                                                                       \
        }                                                                                           \
        for (; n < n1; n++) {                                                                       \
            y[t * N + n] = row1_##SUFFIX(xt, M, W + n * M) * SC(n) + B(n);                          \
            y[(t + 1) * N + n] = row1_##SUFFIX(xt + M, M, W + n * M) * SC(n) + B(n);                \
        }                                                                                           \
        n = n0;                                                                                     \
    }                                                                                               \
    if (t < T) {                                                                                    \
        const float *xt = x + t * M;                                                                \
        for (; n + 8 <= n1; n += 8) {                                                               \
            float o[8];                                                                             \
            rows8_t1_##SUFFIX(xt, M, W + n * M, o);                                                 \
            for (int r = 0; r < 8; r++) y[t * N + n + r] = o[r] * SC(n + r) + B(n + r);             \
        }                                                                                           \
        for (; n < n1; n++) y[t * N + n] = row1_##SUFFIX(xt, M, W + n * M) * SC(n) + B(n);          \
    }
#else
#define ROWS_SIMD(SUFFIX)                                                                           \
    for (int64_t t = 0; t < T; t++)                                                                 \
        for (n = n0; n < n1; n++) y[t * N + n] = row1_##SUFFIX(x + t * M, M, W + n * M) * SC(n) + B(n);
#endif

#define SC(n) (scale ? scale[n] : 1.0f)
#define B(n) (bias ? bias[n] : 0.0f)
#define LINEAR(NAME, SUFFIX, WTYPE)                                                                 \
void NAME(const float *x, int64_t T, int64_t M, const WTYPE *W, const float *scale,                 \
          const float *bias, float *y, int64_t N, int threads) {                                    \
    int64_t tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;                                        \
    _Pragma("omp parallel for schedule(dynamic) num_threads(threads) if(threads > 1 && tasks > 1)")  \
    for (int64_t task = 0; task < tasks; task++) {                                                  \
        int64_t n0 = task * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;    \
        int64_t n = n0;                                                                             \
        ROWS_SIMD(SUFFIX)                                                                           \
    }                                                                                               \
}

LINEAR(i8_linear, i8, int8_t)
LINEAR(f16_linear, f16, uint16_t)

/* ---------------------------------------------------------------------------------------------- q8g
   int8 weights with one float32 scale per 32 columns of a row, stored in panels of 8 rows (the last one padded
   with zero rows): panel p is [G][8 rows][32 columns] int8 (columns padded with zeros to G·32) and its scales
   [G][8] float32, so a thread reads one sequential stream (see the pq8 section). */
#define QG 32
static inline void q8g_panel(const float *x, int64_t G, const int8_t *w, const float *s, float *out) {
#ifdef __AVX2__
    __m256 a[8];
    for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++, w += 8 * QG, s += 8) {
        _mm_prefetch((const char *)(w + 1024), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + 1088), _MM_HINT_T0);
        const float *xg = x + g * QG;
        __m256 x0 = _mm256_loadu_ps(xg), x1 = _mm256_loadu_ps(xg + 8), x2 = _mm256_loadu_ps(xg + 16),
               x3 = _mm256_loadu_ps(xg + 24);
        for (int r = 0; r < 8; r++) {
            const int8_t *wr = w + r * QG;
            __m256 p = _mm256_mul_ps(x0, load_i8x8(wr));
            p = _mm256_fmadd_ps(x1, load_i8x8(wr + 8), p);
            p = _mm256_fmadd_ps(x2, load_i8x8(wr + 16), p);
            p = _mm256_fmadd_ps(x3, load_i8x8(wr + 24), p);
            a[r] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(s + r), a[r]);
        }
    }
    for (int r = 0; r < 8; r++) out[r] = hsum8(a[r]);
#else
    for (int r = 0; r < 8; r++) out[r] = 0.0f;
    for (int64_t g = 0; g < G; g++, w += 8 * QG, s += 8)
        for (int r = 0; r < 8; r++) {
            float part = 0.0f;
            for (int c = 0; c < QG; c++) part += x[g * QG + c] * (float)w[r * QG + c];
            out[r] += part * s[r];
        }
#endif
}

/* x [T, M]; the panels hold N rows; the columns past M are zero in W, so x is read through a padded copy. */
int q8g_linear(const float *x, int64_t T, int64_t M, const int8_t *W, const float *scale, const float *bias,
               float *y, int64_t N, int threads) {
    int64_t G = (M + QG - 1) / QG, P = (N + 7) / 8;
    float *xp = (float *)malloc(sizeof(float) * (size_t)(T * G * QG + 1));
    if (!xp) return 1;
    for (int64_t t = 0; t < T; t++) {
        memcpy(xp + t * G * QG, x + t * M, sizeof(float) * (size_t)M);
        for (int64_t m = M; m < G * QG; m++) xp[t * G * QG + m] = 0.0f;
    }
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1 && P > 1)
    for (int64_t p = 0; p < P; p++) {
        int64_t n0 = p * 8, rows = N - n0 < 8 ? N - n0 : 8;
        for (int64_t t = 0; t < T; t++) {
            float o[8];
            q8g_panel(xp + t * G * QG, G, W + p * 8 * G * QG, scale + p * 8 * G, o);
            for (int64_t r = 0; r < rows; r++) y[t * N + n0 + r] = o[r] + B(n0 + r);
        }
    }
    free(xp);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- pq8 */
/* The u8 weights of pq8_linear are stored in panels of PR = 8 rows: panel p holds rows prow[p] .. prow[p] + 8 of
   one codebook block (pblk[p]; a block's last panel is padded with zero rows) as [Mp / 8][8 rows][8 columns]
   bytes, Mp = M rounded up to 8 (zero columns). Each 64-byte cache line is 8 columns of all 8 rows, so a thread
   reads its panels as one sequential stream (with the row-major layout the 8 rows were 8 streams, and a decode
   step ran at a third of the memory bandwidth, measured on the 2-core EPYC). */
#define PR 8
#define PF_BYTES 1024 /* software prefetch distance: measured best of 0 / 1024 / 2048 on the 2-core EPYC */

static inline float dot_f16(const uint16_t *w, const float *x, int64_t M) {
    float s = 0.0f;
    int64_t m = 0;
#ifdef __AVX2__
    __m256 a = _mm256_setzero_ps();
    for (; m + 8 <= M; m += 8) a = _mm256_fmadd_ps(load_f16x8(w + m), _mm256_loadu_ps(x + m), a);
    s = hsum8(a);
#endif
    for (; m < M; m++) s += half_to_float(w[m]) * x[m];
    return s;
}

/* out[r] = sum_m x[m] * panel[m / 8][r][m % 8] for one token over one panel (Mp columns). */
static inline void panel_u8(const float *x, int64_t Mp, const uint8_t *w, float *out) {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t m = 0; m < Mp; m += 8, w += 64) {
        _mm_prefetch((const char *)(w + PF_BYTES), _MM_HINT_T0);
        __m256 xv = _mm256_loadu_ps(x + m);
        a0 = _mm256_fmadd_ps(xv, load_u8x8(w), a0);
        a1 = _mm256_fmadd_ps(xv, load_u8x8(w + 8), a1);
        a2 = _mm256_fmadd_ps(xv, load_u8x8(w + 16), a2);
        a3 = _mm256_fmadd_ps(xv, load_u8x8(w + 24), a3);
        a4 = _mm256_fmadd_ps(xv, load_u8x8(w + 32), a4);
        a5 = _mm256_fmadd_ps(xv, load_u8x8(w + 40), a5);
        a6 = _mm256_fmadd_ps(xv, load_u8x8(w + 48), a6);
        a7 = _mm256_fmadd_ps(xv, load_u8x8(w + 56), a7);
    }
    out[0] = hsum8(a0), out[1] = hsum8(a1), out[2] = hsum8(a2), out[3] = hsum8(a3);
    out[4] = hsum8(a4), out[5] = hsum8(a5), out[6] = hsum8(a6), out[7] = hsum8(a7);
#else
    for (int r = 0; r < PR; r++) out[r] = 0.0f;
    for (int64_t m = 0; m < Mp; m += 8, w += 64)
        for (int r = 0; r < PR; r++)
            for (int c = 0; c < 8; c++) out[r] += x[m + c] * (float)w[r * 8 + c];
#endif
}

/* Several tokens at once: RR rows of the panel (from row r0) x TT tokens (x rows `ld` apart), each weight vector
   converted once for all TT tokens (RR * TT accumulators; RR * TT <= 12 leaves registers for the operands). */
#ifdef __AVX2__
#define PANEL_RT(RR, TT)                                                                                         \
static inline void panel_u8_r##RR##_t##TT(const float *x, int64_t ld, int64_t Mp, const uint8_t *w, int r0,      \
                                          float *out) {                                                          \
    __m256 a[RR][TT];                                                                                            \
    for (int r = 0; r < RR; r++) for (int t = 0; t < TT; t++) a[r][t] = _mm256_setzero_ps();                     \
    w += r0 * 8;                                                                                                 \
    for (int64_t m = 0; m < Mp; m += 8, w += 64) {                                                               \
        _mm_prefetch((const char *)(w + PF_BYTES), _MM_HINT_T0);                                                 \
        for (int r = 0; r < RR; r++) {                                                                           \
            __m256 wv = load_u8x8(w + r * 8);                                                                    \
            for (int t = 0; t < TT; t++) a[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * ld + m), wv, a[r][t]); \
        }                                                                                                        \
    }                                                                                                            \
    for (int r = 0; r < RR; r++) for (int t = 0; t < TT; t++) out[t * PR + r0 + r] = hsum8(a[r][t]);             \
}
PANEL_RT(4, 2)
PANEL_RT(4, 3)
PANEL_RT(2, 4)
#endif

/* out[t * PR + r] for tokens [0, TT) of x (rows ld apart), TT <= 4, over one panel. */
static inline void panel_u8_tokens(const float *x, int64_t ld, int TT, int64_t Mp, const uint8_t *w, float *out) {
#ifdef __AVX2__
    switch (TT) {
    case 2: panel_u8_r4_t2(x, ld, Mp, w, 0, out); panel_u8_r4_t2(x, ld, Mp, w, 4, out); return;
    case 3: panel_u8_r4_t3(x, ld, Mp, w, 0, out); panel_u8_r4_t3(x, ld, Mp, w, 4, out); return;
    case 4:
        for (int r0 = 0; r0 < PR; r0 += 2) panel_u8_r2_t4(x, ld, Mp, w, r0, out);
        return;
    default: break;
    }
#endif
    for (int t = 0; t < TT; t++) panel_u8(x + t * ld, Mp, w, out + t * PR);
}

/* y[t, n] = sum_m (x[t, m] colscale[b, m]) U[n, m] + sum_m x[t, m] colmin[b, m] + sum_r A[n, r] (B x[t])[r]
   (+ bias[n]) for the rows of every panel; returns 1 when its scratch buffer cannot be allocated. */
int pq8_linear(const float *x, int64_t T, int64_t M, int64_t Mp, const uint8_t *Wp, int64_t P, const int64_t *prow,
               const int64_t *pblk, const int64_t *start, int64_t nblk, const float *colscale, const float *colmin,
               int64_t R, const uint16_t *A, const uint16_t *Bm, const float *bias, float *y, int64_t N,
               int threads) {
    float *xs = (float *)malloc(sizeof(float) * (size_t)(T * nblk * Mp + T * nblk + T * R + 1));
    if (!xs) return 1;
    float *cst = xs + T * nblk * Mp, *z = cst + T * nblk; /* x·colscale [nblk, T, Mp], x·colmin [nblk, T], Bx [T, R] */
    for (int64_t b = 0; b < nblk; b++)
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * M, *cs = colscale + b * M, *cm = colmin + b * M;
            float *o = xs + (b * T + t) * Mp, c = 0.0f;
            for (int64_t m = 0; m < M; m++) { o[m] = xt[m] * cs[m]; c += xt[m] * cm[m]; }
            for (int64_t m = M; m < Mp; m++) o[m] = 0.0f;
            cst[b * T + t] = c;
        }
    for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < R; r++) z[t * R + r] = dot_f16(Bm + r * M, x + t * M, M);
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1 && P > 1)
    for (int64_t p = 0; p < P; p++) {
        int64_t b = pblk[p], n0 = prow[p], rows = start[b + 1] - n0 < PR ? start[b + 1] - n0 : PR;
        const uint8_t *w = Wp + p * PR * Mp;
        const uint16_t *Ap = A + p * R * PR;
        float oo[4 * PR];
        for (int64_t t = 0; t < T; t++) {
            int64_t tt = t % 4;
            if (tt == 0) panel_u8_tokens(xs + (b * T + t) * Mp, Mp, T - t < 4 ? (int)(T - t) : 4, Mp, w, oo);
            float *o = oo + tt * PR;
            const float *zt = z + t * R;
#ifdef __AVX2__
            __m256 v = _mm256_add_ps(_mm256_loadu_ps(o), _mm256_set1_ps(cst[b * T + t]));
            for (int64_t k = 0; k < R; k++) v = _mm256_fmadd_ps(load_f16x8(Ap + k * PR), _mm256_set1_ps(zt[k]), v);
            _mm256_storeu_ps(o, v);
#else
            for (int r = 0; r < PR; r++) {
                o[r] += cst[b * T + t];
                for (int64_t k = 0; k < R; k++) o[r] += half_to_float(Ap[k * PR + r]) * zt[k];
            }
#endif
            for (int64_t r = 0; r < rows; r++) y[t * N + n0 + r] = o[r] + B(n0 + r);
        }
    }
    free(xs);
    return 0;
}

/* The ABI version build.py checks after loading (bump on any signature change). */
int athena_cpu_linear_abi(void) { return 4; }

