/* CPU linear layers with compressed weights and fp32 activations (athena_runtime/cpu/linear.py).

   i8_linear:  y[t, n] = scale[n] * sum_m x[t, m] * W[n, m] (+ bias[n])     W int8 [N, M]
   f16_linear: y[t, n] =            sum_m x[t, m] * W[n, m] (+ bias[n])     W float16 bits [N, M]
   q8g_linear: y[t, n] = sum_g scale[n, g] * sum_{m in group g} x[t, m] * W[n, m] (+ bias[n])
               W int8 [N, M], groups of 32 columns (the last one may be shorter), scale float32 [N, ceil(M/32)]
   pq8_linear: a PQ layer's exact u8 form (linear.py): rows [start[b], start[b+1]) of block b have
               W_eff[n, m] = colmin[b, m] + colscale[b, m] * W[n, m] + sum_r A[n, r] B[r, m], W uint8 [N, M],
               so y[t, n] = sum_m (x[t, m] colscale[b, m]) W[n, m] + sum_m x[t, m] colmin[b, m]
                            + sum_r A[n, r] (sum_m B[r, m] x[t, m]) (+ bias[n])
               A float16 bits [N, R], B float16 bits [R, M] (R may be 0).

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
#define SCALAR_u8(v) ((float)(v))
#define SCALAR_f16(v) half_to_float(v)
BLOCKS(i8, int8_t, load_i8x8)
BLOCKS(u8, uint8_t, load_u8x8)
BLOCKS(f16, uint16_t, load_f16x8)
ROW1(i8, int8_t)
ROW1(u8, uint8_t)
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
   int8 weights with one float32 scale per 32 columns of a row (the last group may be shorter). */
#define QG 32
static inline float q8g_row1(const float *x, int64_t M, const int8_t *w, const float *s) {
    float acc = 0.0f;
    for (int64_t g0 = 0; g0 < M; g0 += QG) {
        int64_t g1 = g0 + QG < M ? g0 + QG : M;
        float part = 0.0f;
        for (int64_t m = g0; m < g1; m++) part += x[m] * (float)w[m];
        acc += part * s[g0 / QG];
    }
    return acc;
}

#ifdef __AVX2__
/* RR rows x TT tokens (TT = 1 or 2), full groups only (M0 = M rounded down to 32); returns raw sums. */
#define Q8G_BLOCK(RR, TT)                                                                           \
static inline void q8g_r##RR##_t##TT(const float *x, int64_t M, int64_t M0, const int8_t *w,        \
                                     const float *s, int64_t G, float *out) {                       \
    __m256 a[RR][TT];                                                                               \
    for (int r = 0; r < RR; r++) for (int t = 0; t < TT; t++) a[r][t] = _mm256_setzero_ps();        \
    for (int64_t m = 0; m < M0; m += QG) {                                                          \
        for (int r = 0; r < RR; r++) {                                                              \
            const int8_t *wr = w + r * M + m;                                                       \
            __m256 w0 = load_i8x8(wr), w1 = load_i8x8(wr + 8), w2 = load_i8x8(wr + 16),             \
                   w3 = load_i8x8(wr + 24);                                                         \
            __m256 sc = _mm256_broadcast_ss(s + r * G + m / QG);                                    \
            for (int t = 0; t < TT; t++) {                                                          \
                const float *xt = x + t * M + m;                                                    \
                __m256 g = _mm256_mul_ps(_mm256_loadu_ps(xt), w0);                                  \
                g = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 8), w1, g);                                \
                g = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 16), w2, g);                               \
                g = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 24), w3, g);                               \
                a[r][t] = _mm256_fmadd_ps(g, sc, a[r][t]);                                          \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    for (int r = 0; r < RR; r++) for (int t = 0; t < TT; t++) out[t * RR + r] = hsum8(a[r][t]);     \
}
Q8G_BLOCK(8, 1)
Q8G_BLOCK(4, 2)
#endif

/* the tail group (columns M0..M) of row w for token x */
static inline float q8g_tail(const float *x, int64_t M, int64_t M0, const int8_t *w, const float *s) {
    if (M0 >= M) return 0.0f;
    float part = 0.0f;
    for (int64_t m = M0; m < M; m++) part += x[m] * (float)w[m];
    return part * s[M0 / QG];
}

void q8g_linear(const float *x, int64_t T, int64_t M, const int8_t *W, const float *scale,
                const float *bias, float *y, int64_t N, int threads) {
    int64_t G = (M + QG - 1) / QG, M0 = M / QG * QG;
    int64_t tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    #pragma omp parallel for schedule(dynamic) num_threads(threads) if(threads > 1 && tasks > 1)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t n0 = task * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
        int64_t t = 0;
#ifdef __AVX2__
        for (; t + 2 <= T; t += 2) {
            const float *xt = x + t * M;
            int64_t n = n0;
            for (; n + 4 <= n1; n += 4) {
                float o[8];
                q8g_r4_t2(xt, M, M0, W + n * M, scale + n * G, G, o);
                for (int r = 0; r < 4; r++)
                    for (int u = 0; u < 2; u++)
                        y[(t + u) * N + n + r] = o[u * 4 + r] + q8g_tail(xt + u * M, M, M0, W + (n + r) * M,
                                                                         scale + (n + r) * G) + B(n + r);
            }
            for (; n < n1; n++)
                for (int u = 0; u < 2; u++)
                    y[(t + u) * N + n] = q8g_row1(xt + u * M, M, W + n * M, scale + n * G) + B(n);
        }
        if (t < T) {
            const float *xt = x + t * M;
            int64_t n = n0;
            for (; n + 8 <= n1; n += 8) {
                float o[8];
                q8g_r8_t1(xt, M, M0, W + n * M, scale + n * G, G, o);
                for (int r = 0; r < 8; r++)
                    y[t * N + n + r] = o[r] + q8g_tail(xt, M, M0, W + (n + r) * M, scale + (n + r) * G) + B(n + r);
            }
            for (; n < n1; n++) y[t * N + n] = q8g_row1(xt, M, W + n * M, scale + n * G) + B(n);
        }
#else
        (void)M0;
        for (; t < T; t++)
            for (int64_t n = n0; n < n1; n++) y[t * N + n] = q8g_row1(x + t * M, M, W + n * M, scale + n * G) + B(n);
#endif
    }
}

/* ---------------------------------------------------------------------------------------------- pq8 */
/* raw dot products x[t] . W[n] for rows [n0, n1), all tokens (u8 weights) */
static void dots_u8(const float *x, int64_t T, int64_t M, const uint8_t *W, int64_t n0, int64_t n1,
                    float *y, int64_t N) {
    const float *scale = NULL, *bias = NULL;
    int64_t n = n0;
    ROWS_SIMD(u8)
}

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

int pq8_linear(const float *x, int64_t T, int64_t M, const uint8_t *W, int64_t N, int64_t nblk,
               const int64_t *start, const float *colscale, const float *colmin, int64_t R,
               const uint16_t *A, const uint16_t *Bm, const float *bias, float *y, int threads) {
    float *xs = (float *)malloc(sizeof(float) * (size_t)(T * nblk * M + T * nblk + T * R + 1));
    if (!xs) return 1;
    float *cst = xs + T * nblk * M, *z = cst + T * nblk;  /* x·colscale [nblk, T, M], x·colmin [nblk, T], Bx [T, R] */
    for (int64_t b = 0; b < nblk; b++)
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * M, *cs = colscale + b * M, *cm = colmin + b * M;
            float *o = xs + (b * T + t) * M, c = 0.0f;
            for (int64_t m = 0; m < M; m++) { o[m] = xt[m] * cs[m]; c += xt[m] * cm[m]; }
            cst[b * T + t] = c;
        }
    for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < R; r++) z[t * R + r] = dot_f16(Bm + r * M, x + t * M, M);
    int64_t tasks = 0;
    for (int64_t b = 0; b < nblk; b++) tasks += (start[b + 1] - start[b] + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    #pragma omp parallel for schedule(dynamic) num_threads(threads) if(threads > 1 && tasks > 1)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = 0, k = task, per;
        while (k >= (per = (start[b + 1] - start[b] + ROWS_PER_TASK - 1) / ROWS_PER_TASK)) { k -= per; b++; }
        int64_t n0 = start[b] + k * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < start[b + 1] ? n0 + ROWS_PER_TASK : start[b + 1];
        dots_u8(xs + b * T * M, T, M, W, n0, n1, y, N);
        for (int64_t t = 0; t < T; t++)
            for (int64_t n = n0; n < n1; n++) {
                float v = y[t * N + n] + cst[b * T + t] + B(n);
                for (int64_t r = 0; r < R; r++) v += half_to_float(A[n * R + r]) * z[t * R + r];
                y[t * N + n] = v;
            }
    }
    free(xs);
    return 0;
}

/* Ŵ float32 [N, M] of pq8_linear's form (low-rank term excluded): for prompt chunks, which multiply faster
   through PyTorch's sgemm than through the register-blocked loops above. */
void pq8_dequant(const uint8_t *W, int64_t N, int64_t M, int64_t nblk, const int64_t *start, const float *colscale,
                 const float *colmin, float *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1 && N * M > (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        int64_t b = 0;
        while (b + 1 < nblk && n >= start[b + 1]) b++;
        const float *cs = colscale + b * M, *cm = colmin + b * M;
        const uint8_t *w = W + n * M;
        float *o = out + n * M;
        int64_t m = 0;
#ifdef __AVX2__
        for (; m + 8 <= M; m += 8)
            _mm256_storeu_ps(o + m, _mm256_fmadd_ps(load_u8x8(w + m), _mm256_loadu_ps(cs + m), _mm256_loadu_ps(cm + m)));
#endif
        for (; m < M; m++) o[m] = cm[m] + cs[m] * (float)w[m];
    }
}

/* The ABI version build.py checks after loading (bump on any signature change). */
int athena_cpu_linear_abi(void) { return 3; }

