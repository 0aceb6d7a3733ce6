/* k-means++ seeding rounds, Lloyd iterations and nearest-centroid assignment for many small k-means problems,
 * on the CPU.
 *
 * The same computation as quantize/kmeans.py's batched PyTorch loop (its docstring is the spec), one
 * problem at a time in one pass over the points instead of ~15 tensor ops per iteration: for the
 * quantizer's shapes (d = 1..8, n = 16..256, K <= 4096 points) the PyTorch version spends most of
 * its time in op overhead and in min-with-index over short rows.
 *
 * Layout (as the PyTorch version): points z[B][d][K] (a point is a column), weights w[B][K]
 * (0 = padding, a zero vector), centroids C[B][d][n]. Scores are ||c||^2 - 2 z.c; ties go to the
 * lowest centroid index. Sums over points run in point order (as scatter_add_ does on the CPU).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int athena_kmeans_abi(void) { return 2; }

#define PB 64 /* points per tile: the scores of a tile stay in L1, the loops over it vectorize */

/* One problem: idx[k], smin[k] = argmin_j / min_j (||c_j||^2 - 2 z_k.c_j). cn: scratch [n]. For each centroid
 * in turn, a tile of points keeps its best score so far (strictly smaller wins: the lowest index on ties). */
static void assign_one(const float *z, int64_t d, int64_t K, const float *C, int64_t n, int64_t *idx, float *smin,
                       float *cn) {
    for (int64_t j = 0; j < n; j++) cn[j] = 0.0f;
    for (int64_t t = 0; t < d; t++)
        for (int64_t j = 0; j < n; j++) cn[j] += C[t * n + j] * C[t * n + j];
    float best[PB], acc[PB];
    int32_t arg[PB];
    for (int64_t k0 = 0; k0 < K; k0 += PB) {
        const int64_t kb = K - k0 < PB ? K - k0 : PB;
        for (int64_t k = 0; k < kb; k++) {
            best[k] = INFINITY;
            arg[k] = 0;
        }
        for (int64_t j = 0; j < n; j++) {
            for (int64_t k = 0; k < kb; k++) acc[k] = 0.0f;
            for (int64_t t = 0; t < d; t++) {
                const float c = C[t * n + j];
                const float *zt = z + t * K + k0;
                for (int64_t k = 0; k < kb; k++) acc[k] += zt[k] * c;
            }
            const float cj = cn[j];
            const int32_t jj = (int32_t)j;
            for (int64_t k = 0; k < kb; k++) {
                const float sc = cj - 2.0f * acc[k];
                const int better = sc < best[k];
                best[k] = better ? sc : best[k];
                arg[k] = better ? jj : arg[k];
            }
        }
        for (int64_t k = 0; k < kb; k++) {
            idx[k0 + k] = arg[k];
            smin[k0 + k] = best[k];
        }
    }
}

/* Nearest centroids for B problems: z [B, d, K], C [B, d, n] -> idx [B, K], smin [B, K]. Returns 0, or -1
 * when scratch memory cannot be had. */
int athena_kmeans_assign(const float *z, const float *C, int64_t B, int64_t d, int64_t K, int64_t n, int64_t *idx,
                         float *smin) {
    float *scratch = malloc(sizeof(float) * n);
    if (!scratch) return -1;
    for (int64_t b = 0; b < B; b++) assign_one(z + b * d * K, d, K, C + b * d * n, n, idx + b * K, smin + b * K, scratch);
    free(scratch);
    return 0;
}

/* Empty clusters of one problem get distinct points of largest squared error (weight 0 never), the
 * first empty cluster the largest; past min(n, K) picks the last one repeats (as kmeans.py). */
static void reseed_empty(const float *z, const float *w, int64_t d, int64_t K, int64_t n, const float *smin,
                         const float *cnt, float *C, float *err, char *taken) {
    for (int64_t k = 0; k < K; k++) {
        float e = smin[k];
        for (int64_t t = 0; t < d; t++) e += z[t * K + k] * z[t * K + k];
        err[k] = w[k] == 0.0f ? -INFINITY : e;
        taken[k] = 0;
    }
    const int64_t n_far = n < K ? n : K;
    int64_t picked = 0, last = 0;
    for (int64_t j = 0; j < n; j++) {
        if (cnt[j] != 0.0f) continue;
        if (picked < n_far) {
            int64_t best = -1;
            for (int64_t k = 0; k < K; k++)
                if (!taken[k] && (best < 0 || err[k] > err[best])) best = k;
            taken[best] = 1;
            last = best;
            picked++;
        }
        for (int64_t t = 0; t < d; t++) C[t * n + j] = z[t * K + last];
    }
}

/* `iters` Lloyd steps (assign, then weighted means) for B problems, C [B, d, n] updated in place.
 * Returns 0, or -1 when scratch memory cannot be had. */
int athena_kmeans_lloyd(const float *z, const float *w, float *C, int64_t B, int64_t d, int64_t K, int64_t n,
                        int64_t iters) {
    int64_t *idx = malloc(sizeof(int64_t) * K);
    float *fscratch = malloc(sizeof(float) * (2 * K + n + (d + 1) * n));
    char *taken = malloc(K);
    if (!idx || !fscratch || !taken) {
        free(idx);
        free(fscratch);
        free(taken);
        return -1;
    }
    float *smin = fscratch, *err = smin + K, *cn = err + K, *sums = cn + n; /* sums [d + 1, n] */
    for (int64_t b = 0; b < B; b++) {
        const float *zb = z + b * d * K, *wb = w + b * K;
        float *Cb = C + b * d * n;
        for (int64_t it = 0; it < iters; it++) {
            assign_one(zb, d, K, Cb, n, idx, smin, cn);
            memset(sums, 0, sizeof(float) * (d + 1) * n);
            float *cnt = sums + d * n;
            for (int64_t k = 0; k < K; k++) {
                const int64_t j = idx[k];
                for (int64_t t = 0; t < d; t++) sums[t * n + j] += zb[t * K + k] * wb[k];
                cnt[j] += wb[k];
            }
            int any_empty = 0;
            for (int64_t j = 0; j < n; j++) {
                if (cnt[j] == 0.0f) {
                    any_empty = 1;
                    for (int64_t t = 0; t < d; t++) Cb[t * n + j] = 0.0f;
                } else {
                    for (int64_t t = 0; t < d; t++) Cb[t * n + j] = sums[t * n + j] / cnt[j];
                }
            }
            if (any_empty) reseed_empty(zb, wb, d, K, n, smin, cnt, Cb, err, taken);
        }
    }
    free(idx);
    free(fscratch);
    free(taken);
    return 0;
}

/* k-means++ seeding in rounds of D^2 sampling (kmeans.py's _seed_rounds): z [B, d, K], w [B, K], race [R, B, K]
 * (weight / Exp(1) keys, drawn by the caller), sizes [R] centres per round (sum n) -> idx [B, n]. Each round picks
 * the `sizes[r]` points of largest D^2 * race (largest first; the lowest index on ties), then lowers D^2 to
 * the squared distance to the nearest new centre. Returns 0, or -1 when scratch memory cannot be had. */
int athena_kmeans_seed(const float *z, const float *w, const float *race, const int64_t *sizes, int64_t R, int64_t B,
                       int64_t d, int64_t K, int64_t n, int64_t *idx) {
    int64_t smax = 1;
    for (int64_t r = 0; r < R; r++) smax = sizes[r] > smax ? sizes[r] : smax;
    float *D2 = malloc(sizeof(float) * (4 * K + smax + d));
    if (!D2) return -1;
    float *zn = D2 + K, *m = zn + K, *acc = m + K, *topv = acc + K, *pt = topv + smax;
    for (int64_t b = 0; b < B; b++) {
        const float *zb = z + b * d * K, *wb = w + b * K;
        int64_t *out = idx + b * n;
        for (int64_t k = 0; k < K; k++) {
            zn[k] = 0.0f;
            D2[k] = wb[k];
        }
        for (int64_t t = 0; t < d; t++)
            for (int64_t k = 0; k < K; k++) zn[k] += zb[t * K + k] * zb[t * K + k];
        int64_t filled = 0;
        for (int64_t r = 0; r < R; r++) {
            const float *rb = race + (r * B + b) * K;
            const int64_t s = sizes[r], first = filled;
            int64_t *topi = out + first, cnt = 0; /* the round's picks, largest key first, written in place */
            for (int64_t k = 0; k < K; k++) {
                const float v = D2[k] * rb[k];
                if (cnt == s && !(v > topv[s - 1])) continue;
                int64_t pos = cnt < s ? cnt++ : s - 1;
                while (pos > 0 && v > topv[pos - 1]) {
                    topv[pos] = topv[pos - 1];
                    topi[pos] = topi[pos - 1];
                    pos--;
                }
                topv[pos] = v;
                topi[pos] = k;
            }
            filled += s;
            if (filled >= n) break;
            for (int64_t k = 0; k < K; k++) m[k] = INFINITY;
            for (int64_t j = first; j < filled; j++) {
                const int64_t p = out[j];
                float pn = 0.0f;
                for (int64_t t = 0; t < d; t++) {
                    pt[t] = zb[t * K + p];
                    pn += pt[t] * pt[t];
                }
                for (int64_t k = 0; k < K; k++) acc[k] = 0.0f;
                for (int64_t t = 0; t < d; t++) {
                    const float c = pt[t];
                    const float *zt = zb + t * K;
                    for (int64_t k = 0; k < K; k++) acc[k] += zt[k] * c;
                }
                for (int64_t k = 0; k < K; k++) {
                    const float dist = (zn[k] - 2.0f * acc[k]) + pn;
                    m[k] = dist < m[k] ? dist : m[k];
                }
            }
            for (int64_t k = 0; k < K; k++) {
                const float v = r == 0 ? m[k] : (m[k] < D2[k] ? m[k] : D2[k]);
                D2[k] = v > 0.0f ? v : 0.0f;
            }
        }
    }
    free(D2);
    return 0;
}
