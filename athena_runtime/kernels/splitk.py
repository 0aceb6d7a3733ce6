"""Split-K partial sums finished by one Triton launch: y = Σ_s partial[s] + (Σ_s u_part[s]) Aᵀ + bias.

The lookup-table kernels (`lut.py` where its epilogue is not fused, `triton_lut.py`) and the fragment kernel
(`frag.py`) write partial sums per slab of index words; `splitk_epilogue` sums them in fp32 and adds the low-rank
term and the bias, or, for a fused gate/up layer (`glu`), returns silu(gate) · up.
"""

from __future__ import annotations

import torch

from athena_runtime.kernels.tuning import Tuning

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: only the references run
    triton = None


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _splitk_epilogue_kernel(
        partial_ptr,
        u_part_ptr,
        lr_a_ptr,
        bias_ptr,
        y_ptr,
        S,
        S_U,
        N,
        RANK,
        UP_OFF,
        stride_ps,
        stride_pt,
        stride_us,
        stride_ut,
        stride_an,
        stride_yt,
        BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr,
        RANK_P2: tl.constexpr,
        S_ITERS: tl.constexpr,
        HAS_LOWRANK: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        GLU: tl.constexpr,
    ):
        """y[t, i] = Σ_s partial[s, t, i] + Σ_r (Σ_s' u_part[s', t, r]) A[i, r] + bias[i]; with GLU the
        output is silu(z[t, i]) · z[t, UP_OFF + i] of that sum z (gate and up rows of one fused layer),
        for i < N. Latency-bound (a few KB per program): every load — A's rows, u, the partial sums
        (S_ITERS blocks of BLOCK_S slabs, unrolled), the bias — is issued before any is used, so they
        overlap in one round trip."""
        pid_n = tl.program_id(0)
        t = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        offs_s = tl.arange(0, BLOCK_S)
        if HAS_LOWRANK:
            offs_r = tl.arange(0, RANK_P2)
            mask_r = offs_r < RANK
            a = tl.load(
                lr_a_ptr + rows[:, None] * stride_an + offs_r[None, :],
                mask=row_mask[:, None] & mask_r[None, :],
                other=0.0,
            )
            if GLU:
                a_up = tl.load(
                    lr_a_ptr + (rows + UP_OFF)[:, None] * stride_an + offs_r[None, :],
                    mask=row_mask[:, None] & mask_r[None, :],
                    other=0.0,
                )
            u = tl.zeros([RANK_P2], dtype=tl.float32)
            for i in tl.static_range(S_ITERS):
                ss = i * BLOCK_S + offs_s
                u += tl.sum(
                    tl.load(
                        u_part_ptr + ss[:, None] * stride_us + t * stride_ut + offs_r[None, :],
                        mask=(ss < S_U)[:, None] & mask_r[None, :],
                        other=0.0,
                    ),
                    axis=0,
                )
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(S_ITERS):
            ss = i * BLOCK_S + offs_s
            p_ptrs = partial_ptr + ss[:, None] * stride_ps + t * stride_pt + rows[None, :]
            p_mask = (ss < S)[:, None] & row_mask[None, :]
            acc += tl.sum(tl.load(p_ptrs, mask=p_mask, other=0.0).to(tl.float32), axis=0)
            if GLU:
                acc_up += tl.sum(tl.load(p_ptrs + UP_OFF, mask=p_mask, other=0.0).to(tl.float32), axis=0)
        if HAS_LOWRANK:
            acc += tl.sum(a.to(tl.float32) * u[None, :], axis=1)
            if GLU:
                acc_up += tl.sum(a_up.to(tl.float32) * u[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            if GLU:
                acc_up += tl.load(bias_ptr + rows + UP_OFF, mask=row_mask, other=0.0).to(tl.float32)
        if GLU:  # the same roundings as the unfused layer + `fused_ops.silu_mul`: bit-identical output
            g = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
            acc = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty) * acc_up.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + t * stride_yt + rows, acc.to(y_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _splitk_epilogue_tile_kernel(
        partial_ptr,
        u_part_ptr,
        lr_a_ptr,
        bias_ptr,
        y_ptr,
        S,
        S_U,
        T,
        N,
        RANK,
        UP_OFF,
        stride_ps,
        stride_pt,
        stride_us,
        stride_ut,
        stride_an,
        stride_yt,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        RANK_P2: tl.constexpr,
        HAS_LOWRANK: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        GLU: tl.constexpr,
    ):
        """The same sum for a [BLOCK_T tokens, BLOCK_N rows] tile: A's rows are read once for all the
        tile's tokens and the low-rank term is one tl.dot (many tokens: the tensor-core path)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = rows < N
        t_mask = offs_t < T
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        s = tl.program_id(0) * 0
        while s < S:
            p_ptrs = partial_ptr + s * stride_ps + offs_t[:, None] * stride_pt + rows[None, :]
            acc += tl.load(p_ptrs, mask=t_mask[:, None] & row_mask[None, :], other=0.0).to(tl.float32)
            if GLU:
                acc_up += tl.load(p_ptrs + UP_OFF, mask=t_mask[:, None] & row_mask[None, :], other=0.0).to(tl.float32)
            s += 1
        if HAS_LOWRANK:
            offs_r = tl.arange(0, RANK_P2)
            mask_r = offs_r < RANK
            u = tl.zeros([BLOCK_T, RANK_P2], dtype=tl.float32)
            s = tl.program_id(0) * 0
            while s < S_U:
                u += tl.load(
                    u_part_ptr + s * stride_us + offs_t[:, None] * stride_ut + offs_r[None, :],
                    mask=t_mask[:, None] & mask_r[None, :],
                    other=0.0,
                ).to(tl.float32)
                s += 1
            a = tl.load(
                lr_a_ptr + rows[:, None] * stride_an + offs_r[None, :],
                mask=row_mask[:, None] & mask_r[None, :],
                other=0.0,
            )
            acc += tl.dot(u.to(a.dtype), tl.trans(a))
            if GLU:
                a_up = tl.load(
                    lr_a_ptr + (rows + UP_OFF)[:, None] * stride_an + offs_r[None, :],
                    mask=row_mask[:, None] & mask_r[None, :],
                    other=0.0,
                )
                acc_up += tl.dot(u.to(a.dtype), tl.trans(a_up))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
            if GLU:
                acc_up += tl.load(bias_ptr + rows + UP_OFF, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        if GLU:  # the same roundings as the unfused layer + `fused_ops.silu_mul`: bit-identical output
            g = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
            acc = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty) * acc_up.to(y_ptr.dtype.element_ty)
        tl.store(
            y_ptr + offs_t[:, None] * stride_yt + rows[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=t_mask[:, None] & row_mask[None, :],
        )


def splitk_epilogue(
    partial,
    u_part,
    lowrank_a,
    bias,
    T: int,
    N: int,
    out_dtype,
    glu: tuple[int, int] | None = None,
    *,
    tuning: Tuning | None = None,
) -> torch.Tensor:
    """Finish split-K partial sums: partial [S, T_, N_pad] fp32 or fp16 (summed in fp32), u_part [S', T_, r]
    fp32 or None. `glu=(up_offset, F)`: return silu(z[:, :F]) · z[:, up_offset:up_offset + F] [T, F] of the
    finished sum z instead of z (a fused gate/up layer; saves the SiLU-mul launch and half the writes).
    `tuning`: default `Tuning.for_device`."""
    S = partial.shape[0]
    up_off, n_out = (glu[0], glu[1]) if glu is not None else (0, N)
    if glu is not None and not (n_out <= up_off and up_off + n_out <= N):
        raise ValueError(f"glu={glu}: gate rows [0, {n_out}) and up rows [{up_off}, {up_off + n_out}) must fit N={N}")
    tuning = tuning or Tuning.for_device(partial.device)
    y = torch.empty(T, n_out, device=partial.device, dtype=out_dtype)
    has_lr = lowrank_a is not None
    rank = lowrank_a.shape[1] if has_lr else 0
    s_u = u_part.shape[0] if has_lr else 0
    # what both kernels take: pointers (unused ones stand in as `partial`), sizes, strides, constexpr flags
    args = (
        partial,
        u_part if has_lr else partial,
        lowrank_a if has_lr else partial,
        bias if bias is not None else partial,
        y,
        S,
        s_u,
    )
    strides = (
        partial.stride(0),
        partial.stride(1),
        u_part.stride(0) if has_lr else 0,
        u_part.stride(1) if has_lr else 0,
        lowrank_a.stride(0) if has_lr else 0,
        y.stride(0),
    )
    flags = dict(RANK_P2=max(16, next_pow2(rank)), HAS_LOWRANK=has_lr, HAS_BIAS=bias is not None, GLU=glu is not None)
    if T > tuning.splitk_tile_min_tokens:  # token tiles: A read once per tile, not once per token
        BLOCK_T, BLOCK_N = 16, 64
        grid = (triton.cdiv(n_out, BLOCK_N), triton.cdiv(T, BLOCK_T))
        _splitk_epilogue_tile_kernel[grid](
            *args, T, n_out, rank, up_off, *strides, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, **flags, num_warps=4
        )
        return y
    n_s = max(S, s_u, 1)
    block_n, block_s, num_warps = _few_token_launch(T, n_out, n_s, tuning)
    _splitk_epilogue_kernel[(triton.cdiv(n_out, block_n), T)](
        *args,
        n_out,
        rank,
        up_off,
        *strides,
        BLOCK_N=block_n,
        BLOCK_S=block_s,
        S_ITERS=triton.cdiv(n_s, block_s),
        **flags,
        num_warps=num_warps,
    )
    return y


def _few_token_launch(T: int, n_out: int, n_s: int, tuning: Tuning) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_S, warps) of the per-token kernel; it is latency-bound: all partials of a row tile in one
    load, one round trip. One token: every slab in one block, 4096-element tiles. More: row tiles narrow enough
    for `splitk_ctas_per_sm` programs per SM (N = 4096 at 128 rows would leave 100 SMs idle)."""
    if T == 1:
        block_s = min(tuning.splitk_t1_max_slabs, max(16, next_pow2(n_s)))
        return (64 if block_s <= 64 else 16), block_s, 4
    block_s = min(tuning.splitk_max_slabs, max(16, next_pow2(n_s)))
    target = tuning.splitk_ctas_per_sm * tuning.sms
    block_n = next((b for b in (128, 64) if triton.cdiv(n_out, b) * T >= target), 32)
    return block_n, block_s, (8 if block_s * block_n >= 64 * 128 else 4)
