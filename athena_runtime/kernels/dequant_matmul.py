"""The dequantize-then-cuBLAS PQ matmul (many tokens): Ŵᵀ [M, N] written as fp16 by a kernel, then one GEMM.

`dequant_matmul(..., dequant="cuda")` takes the CUDA dequantize (`dequant.py`, shared-memory codebooks, ~70-79% of
copy bandwidth on the H100) and "triton" the Triton one below (a gather through L1, ~45%), the portable path. The
low-rank term (`lowrank_mode`, default `default_lowrank_mode`) is folded into Ŵᵀ, added as extra GEMM rows, or
computed first and added by the GEMM's epilogue. `pq_reference.pq_matmul_reference` is the spec.
"""

from __future__ import annotations

import torch

from athena_runtime.kernels import dequant as cuda_dq
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.pq_reference import check_operands, interpreting
from athena_runtime.kernels.splitk import next_pow2, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _pq_dequant_t_kernel(
        qweight_ptr,
        codebook_ptr,
        lr_a_ptr,
        lr_b_ptr,
        wt_ptr,
        N,
        M,
        GW,
        K_ROWS,
        NB,
        RANK,
        stride_qw,
        stride_cbb,
        stride_an,
        stride_br,
        stride_wm,
        D: tl.constexpr,
        NC: tl.constexpr,
        BITS: tl.constexpr,
        PER_WORD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_W: tl.constexpr,
        HAS_LOWRANK: tl.constexpr,
        RANK_P2: tl.constexpr,
        FP32_FOLD: tl.constexpr,
    ):
        """Ŵᵀ[D·j + l, i] = C[i // K_ROWS, j, l, I[i, j]] (+ (A B)ᵀ[D·j + l, i] with the low-rank term
        folded in) for a [BLOCK_W words, BLOCK_N rows] tile. Transposed output: rows are contiguous in
        Ŵᵀ as they are in the word-major indices, so lanes stay on rows from the index load through the
        gather to the store. The fold is one small tl.dot per sub-tile, Bᵀ[cols, r] · Aᵀ[r, rows], with
        Aᵀ's tile loaded once per program: the GEMM that follows then needs no low-rank work at all."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        n_mask = offs_n < N
        blk = tl.minimum(offs_n // K_ROWS, NB - 1)
        cb_rows = codebook_ptr + blk * stride_cbb
        words = tl.load(qweight_ptr + w[:, None] * stride_qw + offs_n[None, :])  # [BLOCK_W, BLOCK_N]
        if HAS_LOWRANK:
            offs_r = tl.arange(0, RANK_P2)
            r_mask = offs_r < RANK
            a_t = tl.load(
                lr_a_ptr + offs_n[None, :] * stride_an + offs_r[:, None],
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            )  # Aᵀ [RANK_P2, BLOCK_N]
        for s in tl.static_range(PER_WORD):
            idx = (words >> (s * BITS)) & (NC - 1)
            j = s * GW + w  # [BLOCK_W]
            for l in tl.static_range(D):
                col = j * D + l
                vals = tl.load(cb_rows[None, :] + (col * NC)[:, None] + idx)  # [BLOCK_W, BLOCK_N]
                if HAS_LOWRANK:
                    b_t = tl.load(
                        lr_b_ptr + offs_r[None, :] * stride_br + col[:, None],
                        mask=(col < M)[:, None] & r_mask[None, :],
                        other=0.0,
                    )  # Bᵀ [BLOCK_W, RANK_P2]
                    if FP32_FOLD:  # fp32 factors (reference-precision runs): no tf32 rounding
                        vals = vals.to(tl.float32) + tl.dot(
                            b_t.to(tl.float32), a_t.to(tl.float32), input_precision="ieee"
                        )
                    else:
                        vals = vals.to(tl.float32) + tl.dot(b_t.to(tl.float16), a_t.to(tl.float16))
                tl.store(
                    wt_ptr + col[:, None] * stride_wm + offs_n[None, :],
                    vals.to(wt_ptr.dtype.element_ty),
                    mask=(col < M)[:, None] & n_mask[None, :],
                )


def triton_dequantize_t(
    qweight,
    codebook,
    geo: PQGeometry,
    dtype=torch.float16,
    *,
    out=None,
    lowrank_a=None,
    lowrank_b=None,
    block_n: int = 128,
    block_w: int = 16,
    num_warps: int = 4,
):
    """Ŵᵀ [M, N] in `dtype` by a Triton kernel (spec: `layout.dequantize_reference`), or (Ŵ + A B)ᵀ when
    the low-rank factors A [N, r], B [r, M] are given. `out`: an [M, N] row-contiguous destination
    (e.g. the top rows of a taller buffer)."""
    if qweight.device.type != "cuda" and not interpreting():
        raise ValueError("pq_dequantize_t needs a CUDA device (or TRITON_INTERPRET=1)")
    if geo.N_pad % block_n or geo.GW % block_w:
        raise ValueError(f"block_n={block_n} must divide N_pad={geo.N_pad} and block_w={block_w} GW={geo.GW}")
    Wt = torch.empty(geo.M, geo.N, device=qweight.device, dtype=dtype) if out is None else out
    if tuple(Wt.shape) != (geo.M, geo.N) or Wt.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous [{geo.M}, {geo.N}] tensor")
    has_lr = lowrank_a is not None
    rank = lowrank_a.shape[1] if has_lr else 0
    grid = (geo.N_pad // block_n, geo.GW // block_w)
    _pq_dequant_t_kernel[grid](
        qweight,
        codebook,
        lowrank_a if has_lr else qweight,
        lowrank_b if has_lr else qweight,
        Wt,
        geo.N,
        geo.M,
        geo.GW,
        geo.k,
        geo.Nb,
        rank,
        qweight.stride(0),
        codebook.stride(0),
        lowrank_a.stride(0) if has_lr else 0,
        lowrank_b.stride(0) if has_lr else 0,
        Wt.stride(0),
        D=geo.d,
        NC=geo.n,
        BITS=geo.bits,
        PER_WORD=geo.per_word,
        BLOCK_N=block_n,
        BLOCK_W=block_w,
        HAS_LOWRANK=has_lr,
        RANK_P2=max(16, next_pow2(rank)),
        num_warps=num_warps,
        FP32_FOLD=has_lr and dtype == torch.float32,
    )
    return Wt


LOWRANK_MODES = ("fold", "rows", "addmm")
DEQUANT_KERNELS = ("triton", "cuda")


def default_lowrank_mode(geo: PQGeometry, dequant: str, rank: int | None = None) -> str:
    """ "fold" with the Triton dequantize, and with the CUDA one where the folding kernel
    (`dequant.dequantize_fold_t`) serves the layer's rank (a multiple of 16 whose fragments fit its registers; the 7B
    recipe's 48; PQLinear pads ranks to 16): the
    low-rank term costs no extra launch or host work there. Otherwise with the CUDA dequantize: "rows"
    when M < N (copying x [T, M] into the wider GEMM operand costs less than writing u Aᵀ [T, N] first in
    "addmm"), else "addmm" ("fold" by an in-place cuBLAS pass over Ŵᵀ tied only at 4096 x 4096 and was
    12-19% slower on the larger shapes, H100, BENCHMARKS.md §3; that pass is gone)."""
    if dequant == "triton":
        return "fold"
    if rank is not None and cuda_dq.fold_supports(geo, rank) is None:
        return "fold"
    return "rows" if geo.M < geo.N else "addmm"


def dequant_matmul(
    x,
    qweight,
    codebook,
    geo: PQGeometry,
    lowrank_a=None,
    lowrank_b=None,
    bias=None,
    *,
    lowrank_mode: str | None = None,
    dequant: str = "triton",
    **tuning,
):
    """Ŵᵀ dequantized by a kernel, then cuBLAS. `dequant`: "triton" (`triton_dequantize_t`) or "cuda"
    (`dequant.dequantize_t`, fp16 only); `tuning` goes to that kernel's wrapper.
    The low-rank term by `lowrank_mode` ("fold", "rows", "addmm"; default `default_lowrank_mode`):
    docs/ARCHITECTURE.md §10 (dequant_matmul.py)."""
    check_operands(x, qweight, codebook, geo, lowrank_a, lowrank_b, bias)
    if dequant not in DEQUANT_KERNELS:
        raise ValueError(f"dequant must be one of {DEQUANT_KERNELS}, got {dequant!r}")
    mode = lowrank_mode or default_lowrank_mode(geo, dequant, None if lowrank_a is None else lowrank_a.shape[1])
    if mode not in LOWRANK_MODES:
        raise ValueError(f"lowrank_mode must be 'fold', 'rows' or 'addmm', got {lowrank_mode!r}")
    has_lr = lowrank_a is not None
    if has_lr and mode == "rows":
        xu, Wt = _rows_operands(x, qweight, codebook, geo, lowrank_a, lowrank_b, dequant, tuning)
        return torch.addmm(bias.to(x.dtype), xu, Wt) if bias is not None else xu @ Wt
    if has_lr and mode == "fold" and dequant == "triton":
        Wt = triton_dequantize_t(qweight, codebook, geo, x.dtype, lowrank_a=lowrank_a, lowrank_b=lowrank_b, **tuning)
    elif dequant == "cuda" and has_lr and mode == "fold":  # the folding kernel (ValueError where it cannot)
        Wt = cuda_dq.dequantize_fold_t(
            qweight, codebook, geo, lowrank_a, lowrank_b, rows_per_chunk=tuning.get("rows_per_chunk")
        )
    elif dequant == "cuda":
        Wt = cuda_dq.dequantize_t(qweight, codebook, geo, x.dtype, **tuning)  # [M, N]
    else:
        Wt = triton_dequantize_t(qweight, codebook, geo, x.dtype, **tuning)  # [M, N]
    if has_lr and mode == "addmm":  # the small product first; the big GEMM adds it in its epilogue (beta = 1)
        u = x @ lowrank_b.t().to(x.dtype)
        y = (
            torch.addmm(bias.to(x.dtype), u, lowrank_a.t().to(x.dtype))
            if bias is not None
            else u @ lowrank_a.t().to(x.dtype)
        )
        return y.addmm_(x, Wt)
    return torch.addmm(bias.to(x.dtype), x, Wt) if bias is not None else x @ Wt


def _rows_operands(x, qweight, codebook, geo: PQGeometry, lowrank_a, lowrank_b, dequant: str, tuning: dict):
    """xu = [x | x Bᵀ | 0] [T, K] and Wt = [Ŵᵀ; Aᵀ; 0] [K, N], K = M + r rounded up to a multiple of 64."""
    T, M, r = x.shape[0], geo.M, lowrank_a.shape[1]
    K = -(-(M + r) // 64) * 64
    Wt = torch.empty(K, geo.N, device=x.device, dtype=x.dtype)
    xu = torch.empty(T, K, device=x.device, dtype=x.dtype)
    torch.mm(x, lowrank_b.t().to(x.dtype), out=xu[:, M : M + r])  # cuBLAS writes u into its columns (ld = K)
    if dequant == "cuda":
        cuda_dq.dequantize_t(qweight, codebook, geo, x.dtype, out=Wt, stacked_a=lowrank_a, **tuning)
        cuda_dq.copy_pad_cols(x, xu, M + r)
    else:
        triton_dequantize_t(qweight, codebook, geo, x.dtype, out=Wt[:M], **tuning)
        Wt[M : M + r].copy_(lowrank_a.t())
        Wt[M + r :].zero_()
        xu[:, :M].copy_(x)
        xu[:, M + r :].zero_()
    return xu, Wt
