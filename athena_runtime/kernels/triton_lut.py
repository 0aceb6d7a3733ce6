"""Triton lookup-table PQ kernel for a few tokens: the portable path where the CUDA one (`lut.py`) cannot run.

The algorithm: docs/ARCHITECTURE.md §10 (triton_lut.py). `pq_reference.pq_matmul_reference` is the spec.
"""

from __future__ import annotations

import torch

from athena_runtime.kernels.layout import PQGeometry, row_chunks
from athena_runtime.kernels.pq_reference import check_operands
from athena_runtime.kernels.splitk import next_pow2, splitk_epilogue, triton
from athena_runtime.kernels.tuning import Tuning

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _lowrank_partial(
        x_ptr,
        lr_b_ptr,
        u_part_ptr,
        T,
        M,
        GW,
        RANK,
        w_begin,
        pid_s,
        r_begin,
        stride_xt,
        stride_br,
        stride_us,
        stride_ut,
        T_P2: tl.constexpr,
        D: tl.constexpr,
        PER_WORD: tl.constexpr,
        N_WORDS: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """u_part[pid_s, t, r] = Σ_col x[t, col] B[r, col] for the 16 ranks r_begin … r_begin + 15 and
        the columns of words [w_begin, w_begin + N_WORDS). Callers spread rank blocks over programs."""
        TT: tl.constexpr = T_P2 if T_P2 > 16 else 16  # tl.dot needs >= 16 rows
        offs_t = tl.arange(0, TT)
        offs_r = r_begin + tl.arange(0, 16)
        offs_c = tl.arange(0, BLOCK_C)
        mask_t = offs_t < T
        mask_r = offs_r < RANK
        u = tl.zeros([TT, 16], dtype=tl.float32)
        for s in tl.static_range(PER_WORD):  # plane s: columns [D(s·GW + w_begin), +D·N_WORDS), inside the plane
            c_lo = D * (s * GW + w_begin)
            c_hi = tl.minimum(tl.minimum(c_lo + D * N_WORDS, D * (s + 1) * GW), M)
            for c in tl.static_range(0, D * N_WORDS, BLOCK_C):
                cols = c_lo + c + offs_c
                mask_c = cols < c_hi
                xv = tl.load(
                    x_ptr + offs_t[:, None] * stride_xt + cols[None, :],
                    mask=mask_t[:, None] & mask_c[None, :],
                    other=0.0,
                )  # [TT, BLOCK_C]
                bv = tl.load(
                    lr_b_ptr + offs_r[:, None] * stride_br + cols[None, :],
                    mask=mask_r[:, None] & mask_c[None, :],
                    other=0.0,
                )  # [16, BLOCK_C]
                u = tl.dot(xv, tl.trans(bv.to(xv.dtype)), u)
        tl.store(
            u_part_ptr + pid_s * stride_us + offs_t[:, None] * stride_ut + offs_r[None, :],
            u,
            mask=mask_t[:, None] & mask_r[None, :],
        )

    @triton.jit
    def _pq_lut_gemv_kernel(
        # pointers
        x_ptr,
        qweight_ptr,
        codebook_ptr,
        lut_ptr,
        partial_ptr,
        lr_b_ptr,
        u_part_ptr,
        # sizes
        T,
        N,
        M,
        GW,
        K_ROWS,
        CHUNKS_PER_BLOCK,
        RANK,
        # strides
        stride_xt,
        stride_qw,
        stride_cbb,
        stride_ps,
        stride_pt,
        stride_br,
        stride_us,
        stride_ut,
        # meta
        T_P2: tl.constexpr,
        D: tl.constexpr,
        NC: tl.constexpr,
        BITS: tl.constexpr,
        PER_WORD: tl.constexpr,
        SLAB_W: tl.constexpr,
        ROWS_PER_CHUNK: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_LOWRANK: tl.constexpr,
        LR_ITERS: tl.constexpr,
    ):
        pid_r = tl.program_id(0)  # (codebook block, row chunk)
        pid_s = tl.program_id(1)  # slab of SLAB_W words
        blk = pid_r // CHUNKS_PER_BLOCK
        row_start = blk * K_ROWS + (pid_r % CHUNKS_PER_BLOCK) * ROWS_PER_CHUNK
        row_end = tl.minimum(tl.minimum(row_start + ROWS_PER_CHUNK, (blk + 1) * K_ROWS), N)
        w0 = pid_s * SLAB_W
        LUT_SIZE: tl.constexpr = PER_WORD * SLAB_W * T_P2 * NC
        lut_base = lut_ptr + (pid_s * tl.num_programs(0) + pid_r).to(tl.int64) * LUT_SIZE

        offs_t = tl.arange(0, T_P2)
        offs_w = tl.arange(0, SLAB_W)
        offs_c = tl.arange(0, NC)
        # ---- 1. table L[s, w, c, t] = Σ_l C[blk, j, l, c] x[t, D j + l] for group j = s·GW + w0 + w
        # (tokens innermost: one vector load per index fetches every token's entry)
        cb_blk = codebook_ptr + blk * stride_cbb
        ENTRY_DTYPE: tl.constexpr = tl.float16  # two entries per HFMA2
        for s in tl.static_range(PER_WORD):
            j = s * GW + w0 + offs_w  # [SLAB_W]
            entry = tl.zeros([T_P2, SLAB_W, NC], dtype=ENTRY_DTYPE)
            for l in tl.static_range(D):
                cv = tl.load(cb_blk + (j[:, None] * D + l) * NC + offs_c[None, :])  # [SLAB_W, NC]
                col = j * D + l
                x_mask = (offs_t[:, None] < T) & (col[None, :] < M)
                xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + col[None, :], mask=x_mask, other=0.0)
                entry += xv.to(ENTRY_DTYPE)[:, :, None] * cv.to(ENTRY_DTYPE)[None, :, :]
            lut_ptrs = (
                lut_base
                + ((s * SLAB_W + offs_w)[None, :, None] * NC + offs_c[None, None, :]) * T_P2
                + offs_t[:, None, None]
            )
            tl.store(lut_ptrs, entry)
        if HAS_LOWRANK:  # this slab's share of u = x Bᵀ, rank blocks of 16 spread over the row programs
            for i in tl.static_range(LR_ITERS):
                rb = pid_r + i * tl.num_programs(0)
                if rb * 16 < RANK:
                    _lowrank_partial(
                        x_ptr,
                        lr_b_ptr,
                        u_part_ptr,
                        T,
                        M,
                        GW,
                        RANK,
                        w0,
                        pid_s,
                        rb * 16,
                        stride_xt,
                        stride_br,
                        stride_us,
                        stride_ut,
                        T_P2,
                        D,
                        PER_WORD,
                        SLAB_W,
                        64,
                    )
        tl.debug_barrier()  # the table is read by other threads of this program

        # ---- 2. stream the rows: y[t, i] += L[s, w, t, I[i, s·GW + w0 + w]]; lanes own consecutive rows,
        # so for one word all lanes read the same group's table (one line)
        offs_n = tl.arange(0, BLOCK_N)
        t_mask = offs_t < T
        for r in range(ROWS_PER_CHUNK // BLOCK_N):
            r0 = row_start + r * BLOCK_N
            if r0 < row_end:
                rows = r0 + offs_n
                row_mask = rows < row_end
                acc = tl.zeros([BLOCK_N, T_P2], dtype=tl.float32)
                for w in tl.static_range(SLAB_W):
                    words = tl.load(
                        qweight_ptr + (w0 + w) * stride_qw + rows, mask=row_mask, other=0, cache_modifier=".cg"
                    )  # [BLOCK_N]
                    for s in tl.static_range(PER_WORD):
                        idx = (words >> (s * BITS)) & (NC - 1)
                        tab = lut_base + (s * SLAB_W + w) * NC * T_P2  # table of group s·GW + w0 + w
                        v = tl.load(tab + idx[:, None] * T_P2 + offs_t[None, :])  # [BLOCK_N, T_P2]
                        acc += v.to(tl.float32)
                p_ptrs = partial_ptr + pid_s * stride_ps + offs_t[None, :] * stride_pt + rows[:, None]
                tl.store(p_ptrs, acc, mask=row_mask[:, None] & t_mask[None, :])


def choose_slab_w(geo: PQGeometry, rows_per_chunk: int, tuning: Tuning, slabs=(32, 16, 8, 4)) -> int:
    """The widest slab that still gives `triton_lut_ctas_per_sm` programs per SM (wide slabs: fewer partial sums)."""
    _, n_row = row_chunks(geo, rows_per_chunk)
    target = tuning.triton_lut_ctas_per_sm * tuning.sms
    ok = [s for s in slabs if geo.GW % s == 0]
    return next((s for s in ok if n_row * (geo.GW // s) >= target), ok[-1])


def triton_lut_matmul(
    x,
    qweight,
    codebook,
    geo: PQGeometry,
    lowrank_a=None,
    lowrank_b=None,
    bias=None,
    *,
    slab_w: int | None = None,
    rows_per_chunk: int | None = None,
    block_n: int = 128,
    num_warps: int = 4,
    glu: tuple[int, int] | None = None,
):
    """Triton lookup-table kernel for few tokens. x [T, M] -> y [T, N] in x's dtype (silu(gate) · up [T, F]
    with `glu=(up_offset, F)`, see `splitk_epilogue`)."""
    check_operands(x, qweight, codebook, geo, lowrank_a, lowrank_b, bias)
    if geo.n > 256:
        raise ValueError(f"the lookup-table kernel takes n <= 256, got n={geo.n}")
    T = x.shape[0]
    T_P2 = next_pow2(T)
    tuning = Tuning.for_device(x.device)
    rows_per_chunk = rows_per_chunk or tuning.triton_lut_rows
    if slab_w is None and T_P2 == 1 and geo.GW % tuning.triton_lut_t1_slab_w == 0:
        slab_w = tuning.triton_lut_t1_slab_w
    if slab_w is None:  # table <= 20 KB per program
        slab_w = choose_slab_w(
            geo, rows_per_chunk, tuning, tuple(s for s in (32, 16, 8, 4, 2, 1) if s * T_P2 <= 32) or (1,)
        )
    if geo.GW % slab_w:
        raise ValueError(f"slab_w={slab_w} must divide GW={geo.GW}")
    n_slabs = geo.GW // slab_w
    chunks_per_block, n_row_progs = row_chunks(geo, rows_per_chunk)
    has_lr = lowrank_a is not None
    rank = lowrank_a.shape[1] if has_lr else 0
    x = x.contiguous()

    lut_size = geo.per_word * slab_w * T_P2 * geo.n
    lut = torch.empty(n_row_progs * n_slabs * lut_size, device=x.device, dtype=torch.float16)
    partial = torch.empty(n_slabs, T, geo.N_pad, device=x.device, dtype=torch.float32)
    u_part = torch.empty(n_slabs, T, max(rank, 1), device=x.device, dtype=torch.float32) if has_lr else partial
    grid = (n_row_progs, n_slabs)
    _pq_lut_gemv_kernel[grid](
        x,
        qweight,
        codebook,
        lut,
        partial,
        lowrank_b if has_lr else x,
        u_part,
        T,
        geo.N,
        geo.M,
        geo.GW,
        geo.k,
        chunks_per_block,
        rank,
        x.stride(0),
        qweight.stride(0),
        codebook.stride(0),
        partial.stride(0),
        partial.stride(1),
        lowrank_b.stride(0) if has_lr else 0,
        u_part.stride(0),
        u_part.stride(1),
        T_P2=T_P2,
        D=geo.d,
        NC=geo.n,
        BITS=geo.bits,
        PER_WORD=geo.per_word,
        SLAB_W=slab_w,
        ROWS_PER_CHUNK=rows_per_chunk,
        BLOCK_N=min(block_n, rows_per_chunk),
        HAS_LOWRANK=has_lr,
        LR_ITERS=-(-((rank + 15) // 16) // n_row_progs),
        num_warps=num_warps,
    )
    return splitk_epilogue(partial, u_part if has_lr else None, lowrank_a, bias, T, geo.N, x.dtype, glu, tuning=tuning)
