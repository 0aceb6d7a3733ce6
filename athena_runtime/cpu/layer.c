/* One decoder layer of a decode step in one call (athena_runtime/cpu/decoder.py CPUDecoderLayer): the same sequence
   of compiled ops the per-module path calls from Python (ops.c, linear.c), without the ~25 Python-level calls and
   allocations per layer between them, which cost a small model as much as its weights on the CPU.

   layer_decode, T tokens, each the one new token of its own sequence, float32, hidden size Hd:
       r = h + res (res NULL at the first layer: r = h);     x = rmsnorm(r) * ln1
       qkv = x W_qkvᵀ; RoPE on q and k (cos/sin [T, D]); k, v written into the layer's cache at slot[t]
       a = attention(q, the sequence's cached keys and values)  (paged, grouped-query, sliding window)
       r = a W_oᵀ + r;                                         x = rmsnorm(r) * ln2
       g = x W_guᵀ;  m = silu(g[:, :F]) * g[:, up:up + F];     h_out = m W_downᵀ,  res_out = r
   Scratch: T * (2 Hd + qkv rows + H D + gate/up rows + F) floats, given by the caller. */
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    int64_t kind; /* 0 fp16, 1 int8 (per-row scale), 2 q8g (panels), 3 pq8 (panels) */
    int64_t N, M;
    const void *W;
    const float *scale;
    const float *bias;
    /* pq8 only */
    int64_t Mp, P;
    const int64_t *prow, *pblk, *start;
    int64_t nblk;
    const float *colscale, *colmin;
    int64_t R;
    const uint16_t *A, *B;
} athena_linear;

typedef struct {
    athena_linear qkv, o, gate_up, down;
    const float *ln1, *ln2;
    float eps1, eps2;
    int64_t Hd, H, Hkv, D, F, up;
    void *kc, *vc;
    int64_t fp16, block_size, window;
    float scale;
} athena_layer;

void f16_linear(const float *x, int64_t T, int64_t M, const uint16_t *W, const float *scale, const float *bias,
                float *y, int64_t N, int threads);
void i8_linear(const float *x, int64_t T, int64_t M, const int8_t *W, const float *scale, const float *bias,
               float *y, int64_t N, int threads);
int q8g_linear(const float *x, int64_t T, int64_t M, const int8_t *W, const float *scale, const float *bias,
               float *y, int64_t N, int threads);
int pq8_linear(const float *x, int64_t T, int64_t M, int64_t Mp, const uint8_t *Wp, int64_t P, const int64_t *prow,
               const int64_t *pblk, const int64_t *start, int64_t nblk, const float *colscale, const float *colmin,
               int64_t R, const uint16_t *A, const uint16_t *Bm, const float *bias, float *y, int64_t N,
               int threads);
void rmsnorm_add(const float *x, const float *res, const float *w, float eps, float *y, float *r, int64_t T,
                 int64_t H);
void rope_(float *x, int64_t T, int64_t stride, int64_t heads, int64_t D, const float *cos_, const float *sin_);
void silu_mul(const float *y, int64_t T, int64_t stride, int64_t F, int64_t up, float *out);
void kv_write(const float *k, const float *v, int64_t T, int64_t stride, const int64_t *slot, void *kc, void *vc,
              int64_t W, int fp16);
int attn_decode(const float *q, int64_t S, int64_t q_stride, int64_t H, int64_t Hkv, int64_t D, const void *kc,
                const void *vc, int fp16, const int32_t *tables, int64_t tstride, const int32_t *lens, int64_t bs,
                float scale, int64_t window, float *out, int threads);

/* y [T, N] = x [T, M] Wᵀ (+ bias) in the layer's format; nonzero when a scratch allocation failed. */
int linear_run(const athena_linear *L, const float *x, int64_t T, float *y, int threads) {
    switch (L->kind) {
    case 0: f16_linear(x, T, L->M, L->W, L->scale, L->bias, y, L->N, threads); return 0;
    case 1: i8_linear(x, T, L->M, L->W, L->scale, L->bias, y, L->N, threads); return 0;
    case 2: return q8g_linear(x, T, L->M, L->W, L->scale, L->bias, y, L->N, threads);
    case 3:
        return pq8_linear(x, T, L->M, L->Mp, L->W, L->P, L->prow, L->pblk, L->start, L->nblk, L->colscale,
                          L->colmin, L->R, L->A, L->B, L->bias, y, L->N, threads);
    default: return 2;
    }
}

int layer_decode(const athena_layer *L, const float *h, const float *res, float *h_out, float *res_out, int64_t T,
                 const float *cos_, const float *sin_, const int64_t *slot, const int32_t *tables, int64_t tstride,
                 const int32_t *lens, float *scratch, int threads) {
    int64_t Hd = L->Hd, Q = L->qkv.N, HD = L->H * L->D, KV = L->Hkv * L->D;
    float *x = scratch, *qkv = x + T * Hd, *a = qkv + T * Q, *o = a + T * HD, *gu = o + T * Hd,
          *m = gu + T * L->gate_up.N;
    rmsnorm_add(h, res, L->ln1, L->eps1, x, res_out, T, Hd);
    if (linear_run(&L->qkv, x, T, qkv, threads)) return 1;
    rope_(qkv, T, Q, L->H + L->Hkv, L->D, cos_, sin_);
    kv_write(qkv + HD, qkv + HD + KV, T, Q, slot, L->kc, L->vc, KV, (int)L->fp16);
    if (attn_decode(qkv, T, Q, L->H, L->Hkv, L->D, L->kc, L->vc, (int)L->fp16, tables, tstride, lens, L->block_size,
                    L->scale, L->window, a, threads))
        return 1;
    if (linear_run(&L->o, a, T, o, threads)) return 1;
    rmsnorm_add(o, res_out, L->ln2, L->eps2, x, res_out, T, Hd);
    if (linear_run(&L->gate_up, x, T, gu, threads)) return 1;
    silu_mul(gu, T, L->gate_up.N, L->F, L->up, m);
    return linear_run(&L->down, m, T, h_out, threads);
}

/* A decode step's whole layer stack, Ls[0 .. n), every layer on the same RoPE: h [T, Hd] is layer 0's input and,
   updated in place, the last layer's output; res [T, Hd] receives the residual stream (layer 0 starts it, no input).
   One call per step instead of one per layer: no Python, no GIL hand-over between layers. Scratch: the largest
   layer's (layer_desc.scratch_floats). */
int stack_decode(const athena_layer *const *Ls, int64_t n, float *h, float *res, int64_t T, const float *cos_,
                 const float *sin_, const int64_t *slot, const int32_t *tables, int64_t tstride, const int32_t *lens,
                 float *scratch, int threads) {
    for (int64_t i = 0; i < n; i++)
        if (layer_decode(Ls[i], h, i ? res : NULL, h, res, T, cos_, sin_, slot, tables, tstride, lens, scratch,
                         threads))
            return 1;
    return 0;
}

/* The ABI version build.py checks after loading (bump on any change of the structs or signatures). */
int athena_cpu_layer_abi(void) { return 2; }
