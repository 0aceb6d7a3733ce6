"""Fused element-wise kernels of the decoder layer: each replaces a chain of small PyTorch ops.

Why and how they round: docs/ARCHITECTURE.md §10 (fused_ops.py).

    add_rmsnorm(x, residual, w)   r = x + residual (in x's dtype);  y = w · (r / rms(r))     1 kernel, was ~8
    rope_(q, k, cos, sin)         q, k rotated in place (half-split convention)              1 kernel, was ~10
      (qk_norm=...)               Qwen3 / Gemma 3: each head RMS-normed first, same kernel    was ~20 more
    silu_mul(gate, up)            silu(gate) · up                                            1 kernel, was 2
    gelu_tanh_mul(gate, up)       gelu_tanh(gate) · up (Gemma)                               1 kernel, was 2
    scatter_rows_pair_(...)       a[idx] = a_src; b[idx] = b_src  (the fp16 KV-cache write)   1 kernel, was 2

Every function has a PyTorch reference with the same signature (`*_reference`: the spec and the CPU path).
"""

from __future__ import annotations

import torch

from athena_runtime.kernels.pq_reference import interpreting
from athena_runtime.kernels.splitk import next_pow2 as _next_pow2
from athena_runtime.kernels.splitk import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _add_rmsnorm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        y_ptr,
        r_out_ptr,
        H,
        eps,
        stride_x,
        stride_r,
        stride_y,
        stride_ro,
        HAS_RES: tl.constexpr,
        UNIT_OFFSET: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program per token: r = x (+ res), y = w · fp16(r · rsqrt(mean(r²) + eps));
        UNIT_OFFSET (Gemma): y = fp16((r · rsqrt(mean(r²) + eps)) · (1 + w)), all in float32."""
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        x = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = x.to(tl.float32) + tl.load(res_ptr + t * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
            r = r.to(x.dtype)  # the residual stream is kept in the model dtype
            tl.store(r_out_ptr + t * stride_ro + offs, r, mask=mask)
        else:
            r = x
        rf = r.to(tl.float32)
        inv = tl.rsqrt(tl.sum(rf * rf, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        if UNIT_OFFSET:
            y = (rf * inv) * (1.0 + w.to(tl.float32))
        else:
            y = w.to(tl.float32) * (rf * inv).to(x.dtype).to(tl.float32)
        tl.store(y_ptr + t * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr,
        k_ptr,
        cos_ptr,
        sin_ptr,
        qw_ptr,
        kw_ptr,
        eps,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_c,
        H,
        HALF: tl.constexpr,
        BLOCK: tl.constexpr,
        NORM: tl.constexpr,
        UNIT_OFFSET: tl.constexpr,
    ):
        """One program per (token, head) of q and k together (heads H.. are k's), in place:
        x[:h], x[h:] = x1 c1 − x2 s1, x2 c2 + x1 s2. NORM: x is first RMS-normed over the head with the
        weights qw (q heads) / kw (k heads), rounded to x's dtype as `add_rmsnorm` does."""
        t = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        if h < H:
            base = q_ptr + t * stride_qt + h * stride_qh
            w_ptr = qw_ptr
        else:
            base = k_ptr + t * stride_kt + (h - H) * stride_kh
            w_ptr = kw_ptr
        x1 = tl.load(base + offs, mask=mask, other=0.0)
        x2 = tl.load(base + HALF + offs, mask=mask, other=0.0)
        if NORM:
            f1 = x1.to(tl.float32)
            f2 = x2.to(tl.float32)
            inv = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / (2 * HALF) + eps)
            w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
            if UNIT_OFFSET:
                x1 = ((f1 * inv) * (1.0 + w1)).to(x1.dtype)
                x2 = ((f2 * inv) * (1.0 + w2)).to(x2.dtype)
            else:
                x1 = (w1 * (f1 * inv).to(x1.dtype).to(tl.float32)).to(x1.dtype)
                x2 = (w2 * (f2 * inv).to(x2.dtype).to(tl.float32)).to(x2.dtype)
        c1 = tl.load(cos_ptr + t * stride_c + offs, mask=mask, other=0.0)
        c2 = tl.load(cos_ptr + t * stride_c + HALF + offs, mask=mask, other=0.0)
        s1 = tl.load(sin_ptr + t * stride_c + offs, mask=mask, other=0.0)
        s2 = tl.load(sin_ptr + t * stride_c + HALF + offs, mask=mask, other=0.0)
        # same rounding as x·cos + rotate_half(x)·sin in the model dtype: each product rounded, then summed
        a1 = (x1 * c1).to(tl.float32) + (-x2 * s1).to(tl.float32)
        a2 = (x2 * c2).to(tl.float32) + (x1 * s2).to(tl.float32)
        tl.store(base + offs, a1.to(x1.dtype), mask=mask)
        tl.store(base + HALF + offs, a2.to(x1.dtype), mask=mask)

    @triton.jit
    def _scatter_pair_kernel(
        a_dst, b_dst, a_src, b_src, idx_ptr, stride_ad, stride_bd, stride_as, stride_bs, R, BLOCK: tl.constexpr
    ):
        """Program (t, which): row t of a_src (which = 0) or b_src (1) into row idx[t] of its destination."""
        t = tl.program_id(0)
        row = tl.load(idx_ptr + t).to(tl.int64)
        offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < R
        if tl.program_id(1) == 0:
            tl.store(a_dst + row * stride_ad + offs, tl.load(a_src + t * stride_as + offs, mask=mask), mask=mask)
        else:
            tl.store(b_dst + row * stride_bd + offs, tl.load(b_src + t * stride_bs + offs, mask=mask), mask=mask)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, F, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < F
        g = tl.load(g_ptr + t * stride_g + offs, mask=mask, other=0.0)
        u = tl.load(u_ptr + t * stride_u + offs, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu rounds to the input dtype
        tl.store(y_ptr + t * stride_y + offs, s * u, mask=mask)

    @triton.jit
    def _gelu_tanh_mul_kernel(g_ptr, u_ptr, y_ptr, F, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < F
        g = tl.load(g_ptr + t * stride_g + offs, mask=mask, other=0.0)
        u = tl.load(u_ptr + t * stride_u + offs, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        # 0.5·x·(1 + tanh(z)) = x · sigmoid(2z), z = sqrt(2/π)·(x + 0.044715·x³); rounded like F.gelu
        z = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        s = (gf / (1.0 + tl.exp(tl.minimum(-2.0 * z, 80.0)))).to(g.dtype)  # (clamped: no inf)
        tl.store(y_ptr + t * stride_y + offs, s * u, mask=mask)


def _triton_ok(t: torch.Tensor, use_triton: bool | None) -> bool:
    if use_triton is None:
        return t.is_cuda and triton is not None
    if use_triton and not (t.is_cuda or interpreting()):
        raise ValueError("the fused Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    return use_triton


# ------------------------------------------------------------------------------- RMSNorm (+ residual)
def add_rmsnorm_reference(x, residual, weight, eps, unit_offset: bool = False, out_dtype: torch.dtype | None = None):
    """(y, r): r = x + residual (or x when residual is None), y = weight · rmsnorm(r); with `unit_offset`
    (Gemma) y = (rmsnorm(r) · (1 + weight)) in float32, rounded to `out_dtype` (default r's dtype: a float32
    residual stream can feed float16 layers)."""
    r = x if residual is None else x + residual
    rf = r.float()
    n = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (n * (1.0 + weight.float())).to(out_dtype or r.dtype), r
    y = weight * n.to(r.dtype)
    return (y if out_dtype is None else y.to(out_dtype)), r


def add_rmsnorm(
    x,
    residual,
    weight,
    eps,
    use_triton: bool | None = None,
    unit_offset: bool = False,
    out_dtype: torch.dtype | None = None,
):
    if not _triton_ok(x, use_triton):
        return add_rmsnorm_reference(x, residual, weight, eps, unit_offset, out_dtype)
    if residual is not None and residual.dtype != x.dtype:  # (Gemma's float32 stream takes float32 branches)
        x = x.to(residual.dtype)
    if x.dim() != 2 or x.stride(-1) != 1 or (residual is not None and residual.shape != x.shape):
        raise ValueError(
            f"add_rmsnorm takes x [T, H] (row-contiguous) and a residual of the same shape, got {tuple(x.shape)}"
        )
    T, H = x.shape
    y_dtype = out_dtype or (x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype))
    y = torch.empty(T, H, device=x.device, dtype=y_dtype)
    r = torch.empty_like(x) if residual is not None else x
    if T:
        _add_rmsnorm_kernel[(T,)](
            x,
            residual if residual is not None else x,
            weight,
            y,
            r,
            H,
            eps,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            y.stride(0),
            r.stride(0),
            HAS_RES=residual is not None,
            UNIT_OFFSET=unit_offset,
            BLOCK=_next_pow2(H),
            num_warps=4 if H <= 4096 else 8,
        )
    return y, r


# ------------------------------------------------------------------------------- rotary embedding
def rope_reference(x, cos, sin):
    """x [T, heads, D], cos/sin [T, D] -> rotated copy (x·cos + rotate_half(x)·sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


def rope_(q, k, cos, sin, use_triton: bool | None = None, qk_norm=None):
    """Rotate q [T, H, D] and k [T, Hkv, D] in place; returns (q, k). `qk_norm` = (q_weight [D], k_weight [D],
    eps, unit_offset): RMS-norm each head of q and k first (Qwen3, Gemma 3), in the same kernel."""
    if not _triton_ok(q, use_triton):
        if qk_norm is not None:
            wq, wk, eps, unit = qk_norm
            q = add_rmsnorm_reference(q, None, wq, eps, unit)[0]
            k = add_rmsnorm_reference(k, None, wk, eps, unit)[0]
        return rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    D = q.shape[-1]
    if D % 2 or cos.shape != (q.shape[0], D) or sin.shape != cos.shape:
        raise ValueError(f"rope_: head_dim {D} must be even and cos/sin [T, {D}], got {tuple(cos.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    if q.stride(-1) != 1 or k.stride(-1) != 1 or k.shape[0] != q.shape[0] or k.shape[-1] != D:
        raise ValueError("rope_ needs q [T, H, D] and k [T, Hkv, D] with the head dimension contiguous")
    wq, wk, eps, unit = qk_norm if qk_norm is not None else (q, q, 0.0, False)
    if qk_norm is not None and (wq.shape != (D,) or wk.shape != (D,)):
        raise ValueError(f"rope_: q/k norm weights must be [{D}], got {tuple(wq.shape)}, {tuple(wk.shape)}")
    if q.shape[0] and q.shape[1] + k.shape[1]:  # one launch for both
        _rope_kernel[(q.shape[0], q.shape[1] + k.shape[1])](
            q,
            k,
            cos,
            sin,
            wq,
            wk,
            eps,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            q.shape[1],
            HALF=D // 2,
            BLOCK=_next_pow2(D // 2),
            NORM=qk_norm is not None,
            UNIT_OFFSET=bool(unit),
            num_warps=1 if D <= 128 else 2,
        )
    return q, k


# ------------------------------------------------------------------------------- SiLU-gated MLP
def silu_mul_reference(gate, up):
    """gate, up [T, F] -> silu(gate) · up [T, F]."""
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate, up, use_triton: bool | None = None):
    return _gated_mul("silu", gate, up, use_triton)


# ------------------------------------------------------------------------------- GELU(tanh)-gated MLP
def gelu_tanh_mul_reference(gate, up):
    """gate, up [T, F] -> gelu_tanh(gate) · up [T, F] (transformers' gelu_pytorch_tanh)."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def gelu_tanh_mul(gate, up, use_triton: bool | None = None):
    return _gated_mul("gelu_tanh", gate, up, use_triton)


def _gated_mul(act: str, gate, up, use_triton: bool | None):
    """act(gate) · up by the activation's kernel (or its reference); both wrappers' checks and launch."""
    if not _triton_ok(gate, use_triton):
        return silu_mul_reference(gate, up) if act == "silu" else gelu_tanh_mul_reference(gate, up)
    if gate.dim() != 2 or gate.shape != up.shape or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(
            f"{act}_mul takes gate and up [T, F] row-contiguous, got {tuple(gate.shape)}, {tuple(up.shape)}"
        )
    T, F = gate.shape
    y = torch.empty(T, F, device=gate.device, dtype=gate.dtype)
    BLOCK = 1024
    if T:
        kernel = _silu_mul_kernel if act == "silu" else _gelu_tanh_mul_kernel
        kernel[(T, triton.cdiv(F, BLOCK))](
            gate, up, y, F, gate.stride(0), up.stride(0), y.stride(0), BLOCK=BLOCK, num_warps=4
        )
    return y


GATED_ACTIVATIONS = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}  # ModelConfig.hidden_act -> act(gate) · up


# ------------------------------------------------------------------------------- paired row scatter
def scatter_rows_pair_reference(a, b, a_src, b_src, index):
    """a[index] = a_src and b[index] = b_src (rows of 2-D tensors), in place."""
    a.index_copy_(0, index, a_src.to(a.dtype))
    b.index_copy_(0, index, b_src.to(b.dtype))


def scatter_rows_pair_(a, b, a_src, b_src, index, use_triton: bool | None = None):
    """Both scatters of `scatter_rows_pair_reference` in one launch (a and b: [rows, R], same R)."""
    if not _triton_ok(a, use_triton):
        return scatter_rows_pair_reference(a, b, a_src, b_src, index)
    T, R = a_src.shape
    if (
        b_src.shape != (T, R)
        or a.shape[1] != R
        or b.shape[1] != R
        or index.shape != (T,)
        or any(x.stride(-1) != 1 for x in (a, b, a_src, b_src))
    ):
        raise ValueError("scatter_rows_pair_ takes [rows, R] destinations, [T, R] sources and a [T] index")
    if a_src.dtype != a.dtype or b_src.dtype != b.dtype:
        a_src, b_src = a_src.to(a.dtype), b_src.to(b.dtype)
    if T:
        block = min(1024, _next_pow2(R))
        _scatter_pair_kernel[(T, 2, -(-R // block))](
            a,
            b,
            a_src,
            b_src,
            index,
            a.stride(0),
            b.stride(0),
            a_src.stride(0),
            b_src.stride(0),
            R,
            BLOCK=block,
            num_warps=4 if block >= 512 else 1,
        )
