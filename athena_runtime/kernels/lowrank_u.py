"""u = x Bᵀ for many tokens: the first product of the low-rank residual on the prefill path.

cuBLAS takes ~16 µs for x [2048, 4096] · Bᵀ [4096, 48] on an H100 (its skinny-output kernels), three
times the read of x at full bandwidth (bench/diag/prefill_lr.py). Here each program owns BLOCK_T tokens
and all r ≤ 128 ranks and walks the whole inner dimension with tensor-core dots (fp32 accumulation):
x is read once from memory, B (r × M, a few hundred KB) from L2 by every program. `out` may be a
strided view (the prefill "rows" mode writes u into columns of a wider operand).
"""
from __future__ import annotations

import logging

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: matmul only
    triton = None

log = logging.getLogger(__name__)
_logged: set = set()

MAX_RANK = 128
MIN_TOKENS = 64  # below this the product is tiny: matmul
BLOCK_T, BLOCK_K = 16, 128

if triton is not None:

    @triton.jit
    def _lowrank_u_kernel(x_ptr, b_ptr, u_ptr, T, M, R, stride_xt, stride_br, stride_ut,
                          BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, R_P2: tl.constexpr, K_ITERS: tl.constexpr):
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_r = tl.arange(0, R_P2)
        offs_k = tl.arange(0, BLOCK_K)
        mask_t = offs_t < T
        mask_r = offs_r < R
        acc = tl.zeros([BLOCK_T, R_P2], dtype=tl.float32)
        for i in range(K_ITERS):  # constexpr trip count: pipelined loads (one compile per model width M)
            cols = i * BLOCK_K + offs_k
            mask_k = cols < M
            xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + cols[None, :], mask=mask_t[:, None] & mask_k[None, :],
                         other=0.0)
            bv = tl.load(b_ptr + offs_r[:, None] * stride_br + cols[None, :], mask=mask_r[:, None] & mask_k[None, :],
                         other=0.0)
            acc = tl.dot(xv, tl.trans(bv.to(xv.dtype)), acc)
        tl.store(u_ptr + offs_t[:, None] * stride_ut + offs_r[None, :], acc.to(u_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_r[None, :])


def lowrank_u_reference(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return x @ B.t().to(x.dtype)


def use_kernel(x: torch.Tensor, B: torch.Tensor) -> bool:
    """The Triton kernel runs for CUDA fp16/bf16 x with >= MIN_TOKENS rows and rank <= MAX_RANK."""
    from athena_runtime.kernels.pq_gemv import interpreting
    return (triton is not None and (x.device.type == "cuda" or interpreting()) and x.dtype in (torch.float16, torch.bfloat16)
            and x.dim() == 2 and x.shape[0] >= MIN_TOKENS and 1 <= B.shape[0] <= MAX_RANK and x.stride(1) == 1)


def lowrank_u(x: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None, *, block_t: int = BLOCK_T,
              block_k: int = BLOCK_K, num_warps: int = 4) -> torch.Tensor:
    """x [T, M], B [r, M] -> u = x Bᵀ [T, r] in x's dtype (into `out`, which may have any row stride).
    `block_t`, `block_k`, `num_warps`: the launch (benchmarks)."""
    if x.dim() != 2 or B.dim() != 2 or B.shape[1] != x.shape[1]:
        raise ValueError(f"lowrank_u: x [T, M] and B [r, M], got {tuple(x.shape)} and {tuple(B.shape)}")
    T, r = x.shape[0], B.shape[0]
    if out is not None and (tuple(out.shape) != (T, r) or out.stride(1) != 1 or out.dtype != x.dtype):
        raise ValueError(f"lowrank_u: out must be {x.dtype} [{T}, {r}] with unit column stride")
    if not use_kernel(x, B):
        if x.device.type == "cuda" and x.shape[0] >= MIN_TOKENS and (x.dtype, r) not in _logged:
            _logged.add((x.dtype, r))
            log.info("lowrank_u: cuBLAS for x %s rank %d (the Triton kernel takes fp16/bf16, rank <= %d)",
                     x.dtype, r, MAX_RANK)
        return torch.mm(x, B.t().to(x.dtype), out=out) if out is not None else lowrank_u_reference(x, B)
    B = B.contiguous()
    u = out if out is not None else torch.empty(T, r, device=x.device, dtype=x.dtype)
    _lowrank_u_kernel[(triton.cdiv(T, block_t),)](
        x, B, u, T, x.shape[1], r, x.stride(0), B.stride(0), u.stride(0),
        BLOCK_T=block_t, BLOCK_K=block_k, R_P2=max(16, 1 << (r - 1).bit_length()), K_ITERS=triton.cdiv(x.shape[1], block_k),
        num_warps=num_warps, num_stages=3)
    return u
