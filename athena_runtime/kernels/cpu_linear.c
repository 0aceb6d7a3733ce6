/* CPU linear layers with compressed weights and fp32 activations (athena_runtime/cpu_linear.py).

   i8_linear:  y[t, n] = scale[n] * sum_m x[t, m] * W[n, m] (+ bias[n])     W int8 [N, M]
   f16_linear: y[t, n] =            sum_m x[t, m] * W[n, m] (+ bias[n])     W float16 bits [N, M]

   x [T, M] and y [T, N] float32, row-major and contiguous. Accumulation in float32. Decode is
   memory-bound: each weight row is converted in registers once per pair of tokens (x rows stay in
   L1/L2). Rows are split over OpenMP threads (the process's OpenMP
   runtime: PyTorch's, so torch.set_num_threads governs it; `threads` is passed explicitly).
   Built with -march=native by cpu_linear.py; without AVX2 the scalar loops below run. */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

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

static inline __m256 load_f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
#endif

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

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
#define SCALAR_f16(v) f16_to_f32(v)
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
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1 && tasks > 1)")  \
    for (int64_t task = 0; task < tasks; task++) {                                                  \
        int64_t n0 = task * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;    \
        int64_t n = n0;                                                                             \
        ROWS_SIMD(SUFFIX)                                                                           \
    }                                                                                               \
}

LINEAR(i8_linear, i8, int8_t)
LINEAR(f16_linear, f16, uint16_t)

/* The ABI version cpu_linear.py checks after loading (bump on any signature change). */
int athena_cpu_linear_abi(void) { return 1; }
