/* The CPU fast path's element-wise and attention ops for decode steps (athena_runtime/cpu/decoder.py),
   one call each instead of several PyTorch ops (a decode step of a small model is op-bound on the CPU).
   float32 activations; the KV cache stores float32 or float16 (bits); row strides in elements.

   rmsnorm_add:  r = x + res (res may be NULL: r = x), y = w * r / sqrt(mean(r^2) + eps)       [T, H]
   rope_:        in place, per head of `heads` heads of D: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
                 with cos/sin [T, D] (both halves, as the model computes them)
   silu_mul:     out[t, f] = silu(y[t, f]) * y[t, up + f]
   kv_write:     K and V rows [T, W] into slots `slot[t]` of a layer's cache [slots, W] (float32 or float16)
   attn_decode:  one query token per sequence over its paged cache (block table, length, sliding window),
                 grouped-query heads, softmax in float32 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "half.h"

void rmsnorm_add(const float *x, const float *res, const float *w, float eps, float *y, float *r,
                 int64_t T, int64_t H) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * H, *rt = res ? res + t * H : NULL;
        float *ot = r + t * H, *yt = y + t * H;
        double ss = 0.0;
        for (int64_t i = 0; i < H; i++) {
            float v = rt ? xt[i] + rt[i] : xt[i];
            ot[i] = v;
            ss += (double)v * v;
        }
        float inv = 1.0f / sqrtf((float)(ss / (double)H) + eps);
        for (int64_t i = 0; i < H; i++) yt[i] = w[i] * (ot[i] * inv);
    }
}

void rope_(float *x, int64_t T, int64_t stride, int64_t heads, int64_t D, const float *cos_, const float *sin_) {
    int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_ + t * D, *s = sin_ + t * D;
        for (int64_t h = 0; h < heads; h++) {
            float *p = x + t * stride + h * D;
            for (int64_t i = 0; i < half; i++) {
                float x1 = p[i], x2 = p[half + i];
                p[i] = x1 * c[i] - x2 * s[i];
                p[half + i] = x2 * c[half + i] + x1 * s[half + i];
            }
        }
    }
}

void silu_mul(const float *y, int64_t T, int64_t stride, int64_t F, int64_t up, float *out) {
    for (int64_t t = 0; t < T; t++) {
        const float *g = y + t * stride, *u = g + up;
        float *o = out + t * F;
        for (int64_t f = 0; f < F; f++) o[f] = g[f] / (1.0f + expf(-g[f])) * u[f];
    }
}

void kv_write(const float *k, const float *v, int64_t T, int64_t stride, const int64_t *slot, void *kc, void *vc,
              int64_t W, int fp16) {
    for (int64_t t = 0; t < T; t++) {
        const float *kt = k + t * stride, *vt = v + t * stride;
        if (fp16) {
            uint16_t *kd = (uint16_t *)kc + slot[t] * W, *vd = (uint16_t *)vc + slot[t] * W;
            for (int64_t i = 0; i < W; i++) { kd[i] = float_to_half(kt[i]); vd[i] = float_to_half(vt[i]); }
        } else {
            memcpy((float *)kc + slot[t] * W, kt, sizeof(float) * W);
            memcpy((float *)vc + slot[t] * W, vt, sizeof(float) * W);
        }
    }
}

static inline float dot_row(const float *q, const void *k, int64_t D, int fp16) {
    float s = 0.0f;
    int64_t i = 0;
#ifdef __AVX2__
    __m256 a = _mm256_setzero_ps();
    if (fp16) {
        for (; i + 8 <= D; i += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i),
                                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)k + i))), a);
    } else {
        for (; i + 8 <= D; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps((const float *)k + i), a);
    }
    __m128 lo = _mm256_castps256_ps128(a), hi = _mm256_extractf128_ps(a, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    s = _mm_cvtss_f32(lo);
#endif
    for (; i < D; i++) s += q[i] * (fp16 ? half_to_float(((const uint16_t *)k)[i]) : ((const float *)k)[i]);
    return s;
}

static inline void axpy_row(float *o, float p, const void *v, int64_t D, int fp16) {
    int64_t i = 0;
#ifdef __AVX2__
    __m256 pv = _mm256_set1_ps(p);
    for (; i + 8 <= D; i += 8) {
        __m256 vv = fp16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)v + i)))
                         : _mm256_loadu_ps((const float *)v + i);
        _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pv, vv, _mm256_loadu_ps(o + i)));
    }
#endif
    for (; i < D; i++) o[i] += p * (fp16 ? half_to_float(((const uint16_t *)v)[i]) : ((const float *)v)[i]);
}

/* q [S, H*D] (row stride q_stride), out [S, H*D]; caches [slots, Hkv*D]; tables int32 [S, tstride]; lens int32 [S].
   window > 0: keys at positions p > len - 1 - window only. Returns 1 if out of memory. */
int attn_decode(const float *q, int64_t S, int64_t q_stride, int64_t H, int64_t Hkv, int64_t D, const void *kc,
                const void *vc, int fp16, const int32_t *tables, int64_t tstride, const int32_t *lens, int64_t bs,
                float scale, int64_t window, float *out, int threads) {
    int64_t Lmax = 1;
    for (int64_t s = 0; s < S; s++) Lmax = lens[s] > Lmax ? lens[s] : Lmax;
    int64_t work = S * H * Lmax * D;
    int64_t W = Hkv * D, group = H / Hkv;
    int fail = 0;
    #pragma omp parallel num_threads(threads) if(threads > 1 && work > (1 << 18))
    {
        float *p = (float *)malloc(sizeof(float) * (size_t)Lmax);
        if (!p) {
            #pragma omp atomic write
            fail = 1;
        }
        #pragma omp for schedule(dynamic)
        for (int64_t sh = 0; sh < S * H; sh++) {
            if (!p) continue;
            int64_t s = sh / H, h = sh % H, hk = h / group, L = lens[s];
            int64_t p0 = window > 0 && L - window > 0 ? L - window : 0;
            const float *qh = q + s * q_stride + h * D;
            const int32_t *tab = tables + s * tstride;
            float m = -INFINITY, sum = 0.0f;
            for (int64_t pos = p0; pos < L; pos++) {
                int64_t slot = (int64_t)tab[pos / bs] * bs + pos % bs;
                const void *kr = fp16 ? (const void *)((const uint16_t *)kc + slot * W + hk * D)
                                      : (const void *)((const float *)kc + slot * W + hk * D);
                float sc = dot_row(qh, kr, D, fp16) * scale;
                p[pos - p0] = sc;
                m = sc > m ? sc : m;
            }
            for (int64_t i = 0; i < L - p0; i++) { p[i] = expf(p[i] - m); sum += p[i]; }
            float *o = out + s * H * D + h * D;
            memset(o, 0, sizeof(float) * D);
            for (int64_t pos = p0; pos < L; pos++) {
                int64_t slot = (int64_t)tab[pos / bs] * bs + pos % bs;
                const void *vr = fp16 ? (const void *)((const uint16_t *)vc + slot * W + hk * D)
                                      : (const void *)((const float *)vc + slot * W + hk * D);
                axpy_row(o, p[pos - p0] / sum, vr, D, fp16);
            }
        }
        free(p);
    }
    return fail;
}

/* The ABI version build.py checks after loading (bump on any signature change). */
int athena_cpu_ops_abi(void) { return 1; }
