"""PQ decode kernel (few tokens): y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias with a per-group lookup table.

For a token x and column group j, the table entry of centroid c is
    L[t, j, c] = Σ_l C[β, j, c, l] · x[t, d·j + l]
so one output is y[t, i] = Σ_j L[t, j, I[i, j]]: one table read and one add per index, instead of
d centroid loads and d FMAs. Each program owns a slab of SLAB_W index words (PER_WORD·SLAB_W groups)
and a chunk of rows inside one codebook block (β fixed): it builds the slab's table once (fp16 or
fp32, tokens innermost, in a per-program scratch area read through L1) and streams ROWS_PER_CHUNK
rows of packed indices through it. Lanes own rows, so a warp reads one group's table (n fp16 = 128
bytes for n=64, one cache line) per lookup. Split-K partial sums [S, T, N_pad] (fp32) are finished by
`splitk_epilogue`, which also adds the low-rank term (from per-slab partials of u = x Bᵀ, whose
rank blocks of 16 are spread over the row-chunk programs of each slab) and the bias.

Layout of qweight / codebook: `athena_runtime.kernels.layout`. `pq_gemv` and
`pq_gemv_reference` take the same arguments; the reference is the spec.
"""
from __future__ import annotations

import functools
import os

import torch

from athena_runtime.kernels.layout import PQGeometry, dequantize_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: only the reference runs
    triton = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def check_layer_tensors(qweight, codebook, geo: PQGeometry):
    """The kernel-layout shapes of a layer's index words and codebook (layout.py)."""
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (geo.GW, geo.N_pad):
        raise ValueError(f"qweight must be int32 {(geo.GW, geo.N_pad)}, got {qweight.dtype} {tuple(qweight.shape)}")
    if tuple(codebook.shape) != (geo.Nb, geo.G_pad, geo.d, geo.n):
        raise ValueError(f"codebook must be {(geo.Nb, geo.G_pad, geo.d, geo.n)}, got {tuple(codebook.shape)}")


def check_cuda_fp16(name: str, x, codebook, geo: PQGeometry, served: bool = True):
    """What the CUDA kernel wrappers need on top of `check_operands`: fp16 CUDA operands and a layer /
    token count the kernel is instantiated for (`served`)."""
    if x.device.type != "cuda" or x.dtype != torch.float16 or codebook.dtype != torch.float16 or not served:
        raise ValueError(f"{name}: unsupported layer or input (T={x.shape[0]}, bits={geo.bits}, d={geo.d}, k={geo.k}, "
                         f"M={geo.M}, x {x.dtype} on {x.device.type}, codebook {codebook.dtype}); it takes fp16 CUDA "
                         f"tensors")


def check_operands(x, qweight, codebook, geo: PQGeometry, lowrank_a, lowrank_b, bias):
    """Shared argument checks of the PQ kernel wrappers."""
    if x.dim() != 2 or x.shape[1] != geo.M:
        raise ValueError(f"x must be [T, {geo.M}], got {tuple(x.shape)}")
    check_layer_tensors(qweight, codebook, geo)
    if (lowrank_a is None) != (lowrank_b is None):
        raise ValueError("lowrank_a and lowrank_b come together")
    if lowrank_a is not None and (lowrank_a.shape[0] != geo.N or lowrank_b.shape[1] != geo.M
                                  or lowrank_a.shape[1] != lowrank_b.shape[0]):
        raise ValueError(f"low-rank factors {tuple(lowrank_a.shape)} x {tuple(lowrank_b.shape)} do not fit [{geo.N}, {geo.M}]")
    if bias is not None and tuple(bias.shape) != (geo.N,):
        raise ValueError(f"bias must be [{geo.N}], got {tuple(bias.shape)}")
    tensors = [t for t in (x, qweight, codebook, lowrank_a, lowrank_b, bias) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("all operands must be on one device")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError("Triton PQ kernels need a CUDA device (or TRITON_INTERPRET=1)")
    if not all(t.is_contiguous() for t in tensors[1:]):
        raise ValueError("qweight, codebook, low-rank factors and bias must be contiguous")


# ------------------------------------------------------------------------------- reference
def pq_gemv_reference(x, qweight, codebook, geo: PQGeometry, lowrank_a=None, lowrank_b=None, bias=None, **tuning):
    """The spec: dequantize Ŵ, then y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias in fp32, returned in x's dtype."""
    xf = x.float()
    y = xf @ dequantize_reference(qweight, codebook, geo).float().t()  # [T, N]
    if lowrank_a is not None:
        y = y + (xf @ lowrank_b.float().t()) @ lowrank_a.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _lowrank_partial(
        x_ptr, lr_b_ptr, u_part_ptr,
        T, M, GW, RANK, w_begin, pid_s, r_begin,
        stride_xt, stride_br, stride_us, stride_ut,
        T_P2: tl.constexpr, D: tl.constexpr, PER_WORD: tl.constexpr, N_WORDS: tl.constexpr,
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
                xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + cols[None, :],
                             mask=mask_t[:, None] & mask_c[None, :], other=0.0)  # [TT, BLOCK_C]
                bv = tl.load(lr_b_ptr + offs_r[:, None] * stride_br + cols[None, :],
                             mask=mask_r[:, None] & mask_c[None, :], other=0.0)  # [16, BLOCK_C]
                u = tl.dot(xv, tl.trans(bv.to(xv.dtype)), u)
        tl.store(u_part_ptr + pid_s * stride_us + offs_t[:, None] * stride_ut + offs_r[None, :], u,
                 mask=mask_t[:, None] & mask_r[None, :])

    @triton.jit
    def _pq_lut_gemv_kernel(
        # pointers
        x_ptr, qweight_ptr, codebook_ptr, lut_ptr, partial_ptr, lr_b_ptr, u_part_ptr,
        # sizes
        T, N, M, GW, K_ROWS, CHUNKS_PER_BLOCK, RANK,
        # strides
        stride_xt, stride_qw, stride_cbb, stride_ps, stride_pt, stride_br, stride_us, stride_ut,
        # meta
        T_P2: tl.constexpr, D: tl.constexpr, NC: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr,
        SLAB_W: tl.constexpr, ROWS_PER_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, LUT_FP16: tl.constexpr,
        HAS_LOWRANK: tl.constexpr, LR_ITERS: tl.constexpr,
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
        ENTRY_DTYPE: tl.constexpr = tl.float16 if LUT_FP16 else tl.float32  # fp16: two entries per HFMA2
        for s in tl.static_range(PER_WORD):
            j = s * GW + w0 + offs_w  # [SLAB_W]
            entry = tl.zeros([T_P2, SLAB_W, NC], dtype=ENTRY_DTYPE)
            for l in tl.static_range(D):
                cv = tl.load(cb_blk + (j[:, None] * D + l) * NC + offs_c[None, :])  # [SLAB_W, NC]
                col = j * D + l
                x_mask = (offs_t[:, None] < T) & (col[None, :] < M)
                xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + col[None, :], mask=x_mask, other=0.0)
                entry += xv.to(ENTRY_DTYPE)[:, :, None] * cv.to(ENTRY_DTYPE)[None, :, :]
            lut_ptrs = lut_base + ((s * SLAB_W + offs_w)[None, :, None] * NC + offs_c[None, None, :]) * T_P2 \
                + offs_t[:, None, None]
            tl.store(lut_ptrs, entry)
        if HAS_LOWRANK:  # this slab's share of u = x Bᵀ, rank blocks of 16 spread over the row programs
            for i in tl.static_range(LR_ITERS):
                rb = pid_r + i * tl.num_programs(0)
                if rb * 16 < RANK:
                    _lowrank_partial(x_ptr, lr_b_ptr, u_part_ptr, T, M, GW, RANK, w0, pid_s, rb * 16,
                                     stride_xt, stride_br, stride_us, stride_ut,
                                     T_P2, D, PER_WORD, SLAB_W, 64)
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
                    words = tl.load(qweight_ptr + (w0 + w) * stride_qw + rows, mask=row_mask, other=0,
                                    cache_modifier=".cg")  # [BLOCK_N]
                    for s in tl.static_range(PER_WORD):
                        idx = (words >> (s * BITS)) & (NC - 1)
                        tab = lut_base + (s * SLAB_W + w) * NC * T_P2  # table of group s·GW + w0 + w
                        v = tl.load(tab + idx[:, None] * T_P2 + offs_t[None, :])  # [BLOCK_N, T_P2]
                        acc += v.to(tl.float32)
                p_ptrs = partial_ptr + pid_s * stride_ps + offs_t[None, :] * stride_pt + rows[:, None]
                tl.store(p_ptrs, acc, mask=row_mask[:, None] & t_mask[None, :])

    @triton.jit
    def _splitk_epilogue_kernel(
        partial_ptr, u_part_ptr, lr_a_ptr, bias_ptr, y_ptr,
        S, S_U, N, RANK, UP_OFF,
        stride_ps, stride_pt, stride_us, stride_ut, stride_an, stride_yt,
        BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, RANK_P2: tl.constexpr, S_ITERS: tl.constexpr,
        HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr,
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
            a = tl.load(lr_a_ptr + rows[:, None] * stride_an + offs_r[None, :],
                        mask=row_mask[:, None] & mask_r[None, :], other=0.0)
            if GLU:
                a_up = tl.load(lr_a_ptr + (rows + UP_OFF)[:, None] * stride_an + offs_r[None, :],
                               mask=row_mask[:, None] & mask_r[None, :], other=0.0)
            u = tl.zeros([RANK_P2], dtype=tl.float32)
            for i in tl.static_range(S_ITERS):
                ss = i * BLOCK_S + offs_s
                u += tl.sum(tl.load(u_part_ptr + ss[:, None] * stride_us + t * stride_ut + offs_r[None, :],
                                    mask=(ss < S_U)[:, None] & mask_r[None, :], other=0.0), axis=0)
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
        partial_ptr, u_part_ptr, lr_a_ptr, bias_ptr, y_ptr,
        S, S_U, T, N, RANK, UP_OFF,
        stride_ps, stride_pt, stride_us, stride_ut, stride_an, stride_yt,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, RANK_P2: tl.constexpr,
        HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr,
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
                u += tl.load(u_part_ptr + s * stride_us + offs_t[:, None] * stride_ut + offs_r[None, :],
                             mask=t_mask[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
                s += 1
            a = tl.load(lr_a_ptr + rows[:, None] * stride_an + offs_r[None, :],
                        mask=row_mask[:, None] & mask_r[None, :], other=0.0)
            acc += tl.dot(u.to(a.dtype), tl.trans(a))
            if GLU:
                a_up = tl.load(lr_a_ptr + (rows + UP_OFF)[:, None] * stride_an + offs_r[None, :],
                               mask=row_mask[:, None] & mask_r[None, :], other=0.0)
                acc_up += tl.dot(u.to(a.dtype), tl.trans(a_up))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
            if GLU:
                acc_up += tl.load(bias_ptr + rows + UP_OFF, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        if GLU:  # the same roundings as the unfused layer + `fused_ops.silu_mul`: bit-identical output
            g = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
            acc = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty) * acc_up.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_t[:, None] * stride_yt + rows[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & row_mask[None, :])


TILE_EPILOGUE_MIN_TOKENS = 4  # above this many tokens the epilogue works on [16 tokens, 64 rows] tiles


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=64)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def splitk_epilogue(partial, u_part, lowrank_a, bias, T: int, N: int, out_dtype, glu: tuple[int, int] | None = None,
                    *, block_n: int | None = None, block_s: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Finish split-K partial sums: partial [S, T_, N_pad] fp32 or fp16 (summed in fp32), u_part [S', T_, r]
    fp32 or None. `glu=(up_offset, F)`: return silu(z[:, :F]) · z[:, up_offset:up_offset + F] [T, F] of the
    finished sum z instead of z (a fused gate/up layer; saves the SiLU-mul launch and half the writes).
    `block_n`, `block_s`, `num_warps`: override the few-token kernel's launch (benchmarks)."""
    S = partial.shape[0]
    up_off, n_out = (glu[0], glu[1]) if glu is not None else (0, N)
    if glu is not None and not (n_out <= up_off and up_off + n_out <= N):
        raise ValueError(f"glu={glu}: gate rows [0, {n_out}) and up rows [{up_off}, {up_off + n_out}) must fit N={N}")
    y = torch.empty(T, n_out, device=partial.device, dtype=out_dtype)
    has_lr = lowrank_a is not None
    rank = lowrank_a.shape[1] if has_lr else 0
    s_u = u_part.shape[0] if has_lr else 0
    # what both kernels take: pointers (unused ones stand in as `partial`), strides, constexpr flags
    ptrs = (partial, u_part if has_lr else partial, lowrank_a if has_lr else partial,
            bias if bias is not None else partial, y)
    strides = (partial.stride(0), partial.stride(1), u_part.stride(0) if has_lr else 0,
               u_part.stride(1) if has_lr else 0, lowrank_a.stride(0) if has_lr else 0, y.stride(0))
    flags = dict(RANK_P2=max(16, _next_pow2(rank)), HAS_LOWRANK=has_lr, HAS_BIAS=bias is not None, GLU=glu is not None)
    if T > TILE_EPILOGUE_MIN_TOKENS:  # token tiles: A read once per tile, not once per token
        BLOCK_T, BLOCK_N = 16, 64
        _splitk_epilogue_tile_kernel[(triton.cdiv(n_out, BLOCK_N), triton.cdiv(T, BLOCK_T))](
            *ptrs, S, s_u, T, n_out, rank, up_off, *strides, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, **flags, num_warps=4)
        return y
    # the epilogue is latency-bound: all partials of a row tile in one load, one round trip
    n_s = max(S, s_u, 1)
    if T == 1:  # every slab in one block (up to 256), 4096-element tiles: H100 sweep, bench/diag/lut_parts
        # --sweep (4096 x 11008, 140 slabs: 16.3 -> 15.3 µs a call; 14336 x 4096: 17.5 -> 16.9; others ±0.1)
        block_s = block_s or min(256, max(16, _next_pow2(n_s)))
        BLOCK_N = block_n or (64 if block_s <= 64 else 16)
        num_warps = num_warps or 4
    else:  # <= 64 slabs a block; row tiles narrow enough for ~2 programs per SM (N = 4096 at 128 rows
        # would leave 100 SMs idle)
        block_s = block_s or min(64, max(16, _next_pow2(n_s)))
        target = 2 * num_sms(partial.device)
        BLOCK_N = block_n or next((b for b in (128, 64) if triton.cdiv(n_out, b) * T >= target), 32)
        num_warps = num_warps or (8 if block_s * BLOCK_N >= 64 * 128 else 4)
    _splitk_epilogue_kernel[(triton.cdiv(n_out, BLOCK_N), T)](
        *ptrs, S, s_u, n_out, rank, up_off, *strides, BLOCK_N=BLOCK_N, BLOCK_S=block_s,
        S_ITERS=triton.cdiv(n_s, block_s), **flags, num_warps=num_warps,
    )
    return y


def row_chunks(geo: PQGeometry, rows_per_chunk: int) -> tuple[int, int]:
    """(chunks per codebook block, number of row programs) for chunks that never cross a block."""
    chunks_per_block = -(-min(geo.k, geo.N) // rows_per_chunk)
    return chunks_per_block, geo.Nb * chunks_per_block


def choose_slab_w(geo: PQGeometry, rows_per_chunk: int, device, slabs=(32, 16, 8, 4)) -> int:
    """The widest slab that still gives >= 1.5 programs per SM (wide slabs: fewer partial sums)."""
    _, n_row = row_chunks(geo, rows_per_chunk)
    target = 1.5 * num_sms(device)
    ok = [s for s in slabs if geo.GW % s == 0]
    return next((s for s in ok if n_row * (geo.GW // s) >= target), ok[-1])


def pq_gemv(x, qweight, codebook, geo: PQGeometry, lowrank_a=None, lowrank_b=None, bias=None, *,
            lut_fp16: bool = True, slab_w: int | None = None, rows_per_chunk: int | None = None,
            block_n: int = 128, num_warps: int = 4, glu: tuple[int, int] | None = None):
    """Triton lookup-table kernel for few tokens. x [T, M] -> y [T, N] in x's dtype (silu(gate) · up [T, F]
    with `glu=(up_offset, F)`, see `splitk_epilogue`)."""
    check_operands(x, qweight, codebook, geo, lowrank_a, lowrank_b, bias)
    if geo.n > 256:
        raise ValueError(f"the lookup-table kernel takes n <= 256, got n={geo.n}")
    T = x.shape[0]
    T_P2 = _next_pow2(T)
    if rows_per_chunk is None:
        rows_per_chunk = 1024  # tall chunks amortize the table over many rows
    if slab_w is None and T_P2 == 1 and geo.GW % 8 == 0:
        slab_w = 8  # T = 1: measured best or within 10% of the best on the 7B shapes (kernels.md sweep)
    if slab_w is None:  # table <= 20 KB per program
        slab_w = choose_slab_w(geo, rows_per_chunk, x.device,
                               tuple(s for s in (32, 16, 8, 4, 2, 1) if s * T_P2 <= 32) or (1,))
    if geo.GW % slab_w:
        raise ValueError(f"slab_w={slab_w} must divide GW={geo.GW}")
    n_slabs = geo.GW // slab_w
    chunks_per_block, n_row_progs = row_chunks(geo, rows_per_chunk)
    has_lr = lowrank_a is not None
    rank = lowrank_a.shape[1] if has_lr else 0
    x = x.contiguous()

    lut_size = geo.per_word * slab_w * T_P2 * geo.n
    lut = torch.empty(n_row_progs * n_slabs * lut_size, device=x.device,
                      dtype=torch.float16 if lut_fp16 else torch.float32)
    partial = torch.empty(n_slabs, T, geo.N_pad, device=x.device, dtype=torch.float32)
    u_part = torch.empty(n_slabs, T, max(rank, 1), device=x.device, dtype=torch.float32) if has_lr else partial
    grid = (n_row_progs, n_slabs)
    _pq_lut_gemv_kernel[grid](
        x, qweight, codebook, lut, partial, lowrank_b if has_lr else x, u_part,
        T, geo.N, geo.M, geo.GW, geo.k, chunks_per_block, rank,
        x.stride(0), qweight.stride(0), codebook.stride(0), partial.stride(0), partial.stride(1),
        lowrank_b.stride(0) if has_lr else 0, u_part.stride(0), u_part.stride(1),
        T_P2=T_P2, D=geo.d, NC=geo.n, BITS=geo.bits, PER_WORD=geo.per_word,
        SLAB_W=slab_w, ROWS_PER_CHUNK=rows_per_chunk, BLOCK_N=min(block_n, rows_per_chunk), LUT_FP16=lut_fp16,
        HAS_LOWRANK=has_lr, LR_ITERS=-(-(-(-rank // 16)) // n_row_progs), num_warps=num_warps,
    )
    return splitk_epilogue(partial, u_part if has_lr else None, lowrank_a, bias, T, geo.N, x.dtype, glu)
