"""PQ prefill kernel (many tokens): y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias, Ŵ dequantized tile by tile in registers.

A program owns a [BLOCK_M tokens, BLOCK_N rows] output tile and walks the index words in tiles of
BLOCK_W words. With the plane layout (`layout.py`), slot s of a word tile holds groups
j = s·GW + w0 … s·GW + w0 + BLOCK_W − 1, i.e. one contiguous run of columns per coordinate l:
    W_sl[i, w] = C[i // k, j, l, I[i, j]]    (a gather from the l-major codebook, L1/L2 resident)
    x_sl[t, w] = x[t, D·j + l]
    acc += x_sl · W_slᵀ                      (tl.dot, K = BLOCK_W, fp32 accumulator)
so each index is unpacked once per output tile and each centroid value goes straight to the
tensor cores. The low-rank term enters as one more K-step: acc += u · A_tileᵀ with u = x Bᵀ.

Few tokens (T <= BLOCK_M): SPLIT_K > 1 splits the words over programs; partial sums go to
`pq_gemv.splitk_epilogue`, and the first row tile of every split computes its share of u.

Also here: `pq_dequantize_t` (the whole Ŵᵀ as fp16, for the dequantize-then-cuBLAS path and for
`PQLinear.dequantize_weight` on the GPU) and `pq_dequant_matmul`, that path itself, with the Triton
or the CUDA dequantize (`pq_cuda_dequant.py`). Every wrapper has a PyTorch reference with the same
signature.
"""
from __future__ import annotations

import logging

import torch

from athena_runtime.kernels.layout import PQGeometry, dequantize_reference
from athena_runtime.kernels.pq_gemv import (
    _next_pow2, check_operands, num_sms, pq_gemv_reference, splitk_epilogue, triton,
)
from athena_runtime.log_once import log_once

log = logging.getLogger(__name__)

if triton is not None:
    import triton.language as tl

    from athena_runtime.kernels.pq_gemv import _lowrank_partial

    @triton.jit
    def _pq_dot_kernel(
        # pointers
        x_ptr, qweight_ptr, codebook_ptr, u_ptr, lr_a_ptr, lr_b_ptr, bias_ptr, y_ptr, partial_ptr, u_part_ptr,
        # sizes
        T, N, M, GW, K_ROWS, NB, RANK,
        # strides
        stride_xt, stride_qw, stride_cbb, stride_ut, stride_an, stride_br, stride_yt,
        stride_ps, stride_pt, stride_us, stride_ut2,
        # meta
        D: tl.constexpr, NC: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
        TILES_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, RANK_P2: tl.constexpr, LR_ITERS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_m = tl.cdiv(T, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # grouped order: GROUP_M token tiles share a run of row tiles in L2
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows (< N_pad: no mask on index loads)
        offs_w = tl.arange(0, BLOCK_W)
        m_mask = offs_m < T
        blk = tl.minimum(offs_n // K_ROWS, NB - 1)
        cb_rows = codebook_ptr + blk * stride_cbb  # [BLOCK_N] codebook block of each row
        n_tiles = GW // BLOCK_W
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ti in range(TILES_PER_SPLIT):
            tile = pid_k * TILES_PER_SPLIT + ti
            if tile < n_tiles:
                w = tile * BLOCK_W + offs_w  # [BLOCK_W] word columns
                # [BLOCK_W, BLOCK_N], rows contiguous: lanes own rows, so one gather instruction reads one
                # group's codebook line
                words = tl.load(qweight_ptr + w[:, None] * stride_qw + offs_n[None, :])
                for s in tl.static_range(PER_WORD):
                    idx = (words >> (s * BITS)) & (NC - 1)
                    j = s * GW + w  # [BLOCK_W] groups of slot s
                    for l in tl.static_range(D):
                        col = j * D + l
                        w_tile = tl.load(cb_rows[None, :] + ((j * D + l) * NC)[:, None] + idx)  # Ŵᵀ tile [BLOCK_W, BLOCK_N]
                        x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xt + col[None, :],
                                         mask=m_mask[:, None] & (col < M)[None, :], other=0.0)  # [BLOCK_M, BLOCK_W]
                        acc = tl.dot(x_tile, w_tile.to(x_tile.dtype), acc)

        if SPLIT_K == 1:
            if HAS_LOWRANK:  # one more K-step: u [BLOCK_M, r] · A[rows, r]ᵀ
                offs_r = tl.arange(0, RANK_P2)
                r_mask = offs_r < RANK
                u = tl.load(u_ptr + offs_m[:, None] * stride_ut + offs_r[None, :],
                            mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                a = tl.load(lr_a_ptr + offs_n[:, None] * stride_an + offs_r[None, :],
                            mask=(offs_n < N)[:, None] & r_mask[None, :], other=0.0)
                acc = tl.dot(u, tl.trans(a.to(u.dtype)), acc)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            y_ptrs = y_ptr + offs_m[:, None] * stride_yt + offs_n[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < N)[None, :])
        else:
            p_ptrs = partial_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pt + offs_n[None, :]
            tl.store(p_ptrs, acc, mask=m_mask[:, None])
            if HAS_LOWRANK:  # this split's share of u = x Bᵀ, rank blocks of 16 spread over the row tiles
                for i in tl.static_range(LR_ITERS):
                    rb = pid + i * tl.num_programs(0)
                    if rb * 16 < RANK:
                        _lowrank_partial(x_ptr, lr_b_ptr, u_part_ptr, T, M, GW, RANK,
                                         pid_k * TILES_PER_SPLIT * BLOCK_W, pid_k, rb * 16,
                                         stride_xt, stride_br, stride_us, stride_ut2,
                                         BLOCK_M, D, PER_WORD, TILES_PER_SPLIT * BLOCK_W, 64)

    @triton.jit
    def _pq_dequant_t_kernel(
        qweight_ptr, codebook_ptr, lr_a_ptr, lr_b_ptr, wt_ptr,
        N, M, GW, K_ROWS, NB, RANK,
        stride_qw, stride_cbb, stride_an, stride_br, stride_wm,
        D: tl.constexpr, NC: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, HAS_LOWRANK: tl.constexpr, RANK_P2: tl.constexpr,
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
            a_t = tl.load(lr_a_ptr + offs_n[None, :] * stride_an + offs_r[:, None],
                          mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # Aᵀ [RANK_P2, BLOCK_N]
        for s in tl.static_range(PER_WORD):
            idx = (words >> (s * BITS)) & (NC - 1)
            j = s * GW + w  # [BLOCK_W]
            for l in tl.static_range(D):
                col = j * D + l
                vals = tl.load(cb_rows[None, :] + (col * NC)[:, None] + idx)  # [BLOCK_W, BLOCK_N]
                if HAS_LOWRANK:
                    b_t = tl.load(lr_b_ptr + offs_r[None, :] * stride_br + col[:, None],
                                  mask=(col < M)[:, None] & r_mask[None, :], other=0.0)  # Bᵀ [BLOCK_W, RANK_P2]
                    if FP32_FOLD:  # fp32 factors (reference-precision runs): no tf32 rounding
                        vals = vals.to(tl.float32) + tl.dot(b_t.to(tl.float32), a_t.to(tl.float32),
                                                            input_precision="ieee")
                    else:
                        vals = vals.to(tl.float32) + tl.dot(b_t.to(tl.float16), a_t.to(tl.float16))
                tl.store(wt_ptr + col[:, None] * stride_wm + offs_n[None, :], vals.to(wt_ptr.dtype.element_ty),
                         mask=(col < M)[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------- references
def pq_gemm_reference(x, qweight, codebook, geo: PQGeometry, lowrank_a=None, lowrank_b=None, bias=None, **tuning):
    """The spec (same as the decode reference): dequantize, then matmul in fp32."""
    return pq_gemv_reference(x, qweight, codebook, geo, lowrank_a, lowrank_b, bias)


def pq_dequantize_t_reference(qweight, codebook, geo: PQGeometry, dtype=torch.float16):
    """Ŵᵀ [M, N] (contiguous)."""
    return dequantize_reference(qweight, codebook, geo).t().contiguous().to(dtype)


def pq_dequant_matmul_reference(x, qweight, codebook, geo: PQGeometry, lowrank_a=None, lowrank_b=None, bias=None):
    return pq_gemv_reference(x, qweight, codebook, geo, lowrank_a, lowrank_b, bias)


# ----------------------------------------------------------------------------------- wrappers
def default_split_k(geo: PQGeometry, n_row_tiles: int, n_w_tiles: int, device) -> int:
    """Enough (row tile, split) programs for ~2 waves, but at least 2 word tiles per split."""
    target = 2 * num_sms(device)
    split = max(1, min(-(-target // n_row_tiles), n_w_tiles // 2))
    return split


def pq_gemm(x, qweight, codebook, geo: PQGeometry, lowrank_a=None, lowrank_b=None, bias=None, *,
            block_m: int | None = None, block_n: int | None = None, block_w: int = 32,
            split_k: int | None = None, group_m: int = 8, num_warps: int | None = None, num_stages: int = 2):
    """Triton dequantize-in-registers + tl.dot kernel. x [T, M] -> y [T, N] in x's dtype."""
    check_operands(x, qweight, codebook, geo, lowrank_a, lowrank_b, bias)
    T = x.shape[0]
    if block_m is None:
        block_m = 16 if T <= 16 else (64 if T <= 64 else 128)
    if block_n is None:  # 128x128 spills on sm_89 (mma.sync accumulators in registers); fine with wgmma
        wide = x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 9
        block_n = 128 if (T > 64 and wide) else 64
    if num_warps is None:
        num_warps = 4 if block_m * block_n < 64 * 64 else 8
    if geo.GW % block_w or block_w < 16:
        raise ValueError(f"block_w={block_w} must be a multiple of 16 dividing GW={geo.GW}")
    if geo.N_pad % block_n:
        raise ValueError(f"block_n={block_n} must divide N_pad={geo.N_pad}")
    x = x.contiguous()
    n_row_tiles = -(-geo.N // block_n)
    n_w_tiles = geo.GW // block_w
    n_m_tiles = -(-T // block_m)
    if split_k is None:
        split_k = default_split_k(geo, n_row_tiles, n_w_tiles, x.device) if n_m_tiles == 1 else 1
    if split_k > 1 and n_m_tiles != 1:
        raise ValueError("split_k > 1 needs T <= block_m")
    tiles_per_split = -(-n_w_tiles // split_k)
    split_k = -(-n_w_tiles // tiles_per_split)  # no empty splits
    has_lr = lowrank_a is not None
    rank = lowrank_a.shape[1] if has_lr else 0
    rank_p2 = max(16, _next_pow2(rank))

    u = None
    if has_lr and split_k == 1:
        u = (x @ lowrank_b.t().to(x.dtype))  # [T, r] (cuBLAS), enters as one more K-step
    y = torch.empty(T, geo.N, device=x.device, dtype=x.dtype) if split_k == 1 else None
    partial = torch.empty(split_k, T, geo.N_pad, device=x.device, dtype=torch.float32) if split_k > 1 else None
    u_part = torch.empty(split_k, T, max(rank, 1), device=x.device, dtype=torch.float32) \
        if (has_lr and split_k > 1) else None
    dummy = x
    grid = (n_m_tiles * n_row_tiles, split_k)
    _pq_dot_kernel[grid](
        x, qweight, codebook, u if u is not None else dummy, lowrank_a if has_lr else dummy,
        lowrank_b if has_lr else dummy, bias if bias is not None else dummy,
        y if y is not None else dummy, partial if partial is not None else dummy,
        u_part if u_part is not None else dummy,
        T, geo.N, geo.M, geo.GW, geo.k, geo.Nb, rank,
        x.stride(0), qweight.stride(0), codebook.stride(0),
        u.stride(0) if u is not None else 0, lowrank_a.stride(0) if has_lr else 0,
        lowrank_b.stride(0) if has_lr else 0, y.stride(0) if y is not None else 0,
        partial.stride(0) if partial is not None else 0, partial.stride(1) if partial is not None else 0,
        u_part.stride(0) if u_part is not None else 0, u_part.stride(1) if u_part is not None else 0,
        D=geo.d, NC=geo.n, BITS=geo.bits, PER_WORD=geo.per_word,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w,
        TILES_PER_SPLIT=tiles_per_split, SPLIT_K=split_k, GROUP_M=group_m,
        HAS_BIAS=bias is not None, HAS_LOWRANK=has_lr, RANK_P2=rank_p2,
        LR_ITERS=-(-(-(-rank // 16)) // (n_m_tiles * n_row_tiles)),
        num_warps=num_warps, num_stages=num_stages,
    )
    if split_k == 1:
        return y
    return splitk_epilogue(partial, u_part, lowrank_a, bias, T, geo.N, x.dtype)


def pq_dequantize_t(qweight, codebook, geo: PQGeometry, dtype=torch.float16, *, out=None,
                    lowrank_a=None, lowrank_b=None, block_n: int = 128, block_w: int = 16, num_warps: int = 4):
    """Ŵᵀ [M, N] in `dtype` by a Triton kernel (reference: pq_dequantize_t_reference), or (Ŵ + A B)ᵀ when
    the low-rank factors A [N, r], B [r, M] are given. `out`: an [M, N] row-contiguous destination
    (e.g. the top rows of a taller buffer)."""
    if qweight.device.type != "cuda" and not _interp():
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
        qweight, codebook, lowrank_a if has_lr else qweight, lowrank_b if has_lr else qweight, Wt,
        geo.N, geo.M, geo.GW, geo.k, geo.Nb, rank,
        qweight.stride(0), codebook.stride(0), lowrank_a.stride(0) if has_lr else 0,
        lowrank_b.stride(0) if has_lr else 0, Wt.stride(0),
        D=geo.d, NC=geo.n, BITS=geo.bits, PER_WORD=geo.per_word, BLOCK_N=block_n, BLOCK_W=block_w,
        HAS_LOWRANK=has_lr, RANK_P2=max(16, _next_pow2(rank)), num_warps=num_warps,
        FP32_FOLD=has_lr and dtype == torch.float32,
    )
    return Wt


LOWRANK_MODES = ("fold", "rows", "addmm")
DEQUANT_KERNELS = ("triton", "cuda")


def default_lowrank_mode(geo: PQGeometry, dequant: str, rank: int | None = None) -> str:
    """"fold" with the Triton dequantize, and with the CUDA one where the folding kernel
    (`pq_cuda_fold`) serves the layer's rank (a multiple of 16 whose fragments fit its registers; the 7B
    recipe's 48; PQLinear pads ranks to 16): the
    low-rank term costs no extra launch or host work there. Otherwise with the CUDA dequantize: "rows"
    when M < N (copying x [T, M] into the wider GEMM operand costs less than writing u Aᵀ [T, N] first in
    "addmm"), else "addmm" ("fold" by an in-place cuBLAS pass over Ŵᵀ tied only at 4096 x 4096 and was
    12-19% slower on the larger shapes, H100, BENCHMARKS.md §3)."""
    if dequant == "triton":
        return "fold"
    if rank is not None:
        from athena_runtime.kernels import pq_cuda_fold
        if pq_cuda_fold.supports(geo, rank):
            return "fold"
    return "rows" if geo.M < geo.N else "addmm"


def pq_dequant_matmul(x, qweight, codebook, geo: PQGeometry, lowrank_a=None, lowrank_b=None, bias=None, *,
                      lowrank_mode: str | None = None, dequant: str = "triton", **tuning):
    """Ŵᵀ dequantized by a kernel, then cuBLAS. `dequant`: "triton" (`pq_dequantize_t`) or "cuda"
    (`pq_cuda_dequant.pq_dequantize_t_cuda`, fp16 only); `tuning` goes to that kernel's wrapper.
    The low-rank term, by `lowrank_mode` (default: `default_lowrank_mode`):
    "fold": y = x (Ŵ + A B)ᵀ by one plain GEMM: the Triton dequantize writes (Ŵ + A B)ᵀ (a small
    tensor-core product per tile), so does the CUDA `pq_cuda_fold` kernel where it serves the layer's
    rank; otherwise, after the CUDA dequantize, Ŵᵀ += Bᵀ Aᵀ by cuBLAS in place (a pass over the
    weight, whose cost does not grow with the tokens);
    "rows": r more inner-dimension rows, [x | u | 0] · [Ŵᵀ ; Aᵀ ; 0] = x Ŵᵀ + u Aᵀ with u = x Bᵀ: one GEMM,
    no extra pass over the [T, N] output (inner dimension K = M + r padded to a multiple of 64 with
    zeros); u is written by cuBLAS straight into its columns of the [T, K] operand, and with the CUDA
    dequantize [Ŵᵀ; Aᵀ; 0] comes from one launch and [x | · | 0] from one copy kernel;
    "addmm": y = u Aᵀ (+ bias) first, then y += x Ŵᵀ by the main GEMM with beta = 1: the read of y rides
    in its epilogue (the old order, y += u Aᵀ after the main GEMM, was a separate read-and-write pass)."""
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
        Wt = pq_dequantize_t(qweight, codebook, geo, x.dtype, lowrank_a=lowrank_a, lowrank_b=lowrank_b, **tuning)
    elif dequant == "cuda" and has_lr and mode == "fold" and _fold_kernel(geo, lowrank_a.shape[1], x.dtype):
        from athena_runtime.kernels import pq_cuda_fold
        Wt = pq_cuda_fold.pq_dequantize_fold_t_cuda(qweight, codebook, geo, lowrank_a, lowrank_b,
                                                    rows_per_chunk=tuning.get("rows_per_chunk"))
    elif dequant == "cuda":
        from athena_runtime.kernels import pq_cuda_dequant
        Wt = pq_cuda_dequant.pq_dequantize_t_cuda(qweight, codebook, geo, x.dtype, **tuning)  # [M, N]
        if has_lr and mode == "fold":  # Ŵᵀ += Bᵀ Aᵀ: cuBLAS, fp32 accumulation, one rounding per weight
            Wt.addmm_(lowrank_b.t().to(x.dtype), lowrank_a.t().to(x.dtype))
    else:
        Wt = pq_dequantize_t(qweight, codebook, geo, x.dtype, **tuning)  # [M, N]
    if has_lr and mode == "addmm":  # the small product first; the big GEMM adds it in its epilogue (beta = 1)
        u = x @ lowrank_b.t().to(x.dtype)
        y = torch.addmm(bias.to(x.dtype), u, lowrank_a.t().to(x.dtype)) if bias is not None \
            else u @ lowrank_a.t().to(x.dtype)
        return y.addmm_(x, Wt)
    return torch.addmm(bias.to(x.dtype), x, Wt) if bias is not None else x @ Wt


def _fold_kernel(geo: PQGeometry, rank: int, dtype) -> bool:
    """Whether the CUDA "fold" runs the folding kernel (else the cuBLAS pass over Ŵᵀ, logged once)."""
    from athena_runtime.kernels import pq_cuda_fold
    if pq_cuda_fold.usable(geo, rank, dtype):
        return True
    log_once(log, ("pq_gemm", "fold-cublas", geo, rank), logging.WARNING, "CUDA fold %dx%d rank %d: folding kernel "
             "unavailable (recipe, rank or build); Ŵᵀ += Bᵀ Aᵀ by cuBLAS", geo.N, geo.M, rank)
    return False


def _rows_operands(x, qweight, codebook, geo: PQGeometry, lowrank_a, lowrank_b, dequant: str, tuning: dict):
    """xu = [x | x Bᵀ | 0] [T, K] and Wt = [Ŵᵀ; Aᵀ; 0] [K, N], K = M + r rounded up to a multiple of 64."""
    T, M, r = x.shape[0], geo.M, lowrank_a.shape[1]
    K = -(-(M + r) // 64) * 64
    Wt = torch.empty(K, geo.N, device=x.device, dtype=x.dtype)
    xu = torch.empty(T, K, device=x.device, dtype=x.dtype)
    torch.mm(x, lowrank_b.t().to(x.dtype), out=xu[:, M:M + r])  # cuBLAS writes u into its columns (ld = K)
    if dequant == "cuda":
        from athena_runtime.kernels import pq_cuda_dequant
        pq_cuda_dequant.pq_dequantize_t_cuda(qweight, codebook, geo, x.dtype, out=Wt, stacked_a=lowrank_a, **tuning)
        pq_cuda_dequant.copy_pad_cols(x, xu, M + r)
    else:
        pq_dequantize_t(qweight, codebook, geo, x.dtype, out=Wt[:M], **tuning)
        Wt[M:M + r].copy_(lowrank_a.t())
        Wt[M + r:].zero_()
        xu[:, :M].copy_(x)
        xu[:, M + r:].zero_()
    return xu, Wt


def _interp() -> bool:
    from athena_runtime.kernels.pq_gemv import interpreting
    return interpreting()
