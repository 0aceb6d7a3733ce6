"""The Triton paged decode-attention kernel (flash-decoding) and its wrapper; `paged_attention.py` holds
the PyTorch reference (the spec), the SDPA prefill / mixed-batch paths and the path chooser, and
re-exports what is here. Same arguments and result as `paged_attention_reference`, one query per
sequence.
"""

from __future__ import annotations

import torch

from athena_runtime.kernels.tuning import Tuning

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference path is used
    triton = None

_FORMAT_CODES = {"fp16": 0, "int8": 1, "int4": 2}  # the unquantized class may also hold float32


# --------------------------------------------------------------------------------------------
# Triton decode kernel: flash-decoding, tiles of several pages, the context split across programs
# --------------------------------------------------------------------------------------------
# The algorithm (tiles, splits, the combine): docs/ARCHITECTURE.md §10 (paged_decode.py).

if triton is not None:

    @triton.jit
    def _load_kv_tile(
        data_ptr,
        scale_ptr,
        zero_ptr,
        data_offs,
        scale_offs,
        t_mask,
        KV_FORMAT: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        GROUPS: tl.constexpr,
        TILE_TOKENS: tl.constexpr,
    ):
        """One [TILE_TOKENS, BLOCK_D] tile of K or V dequantized to float32 in registers (kv_cache.py):
        fp16 as stored, int8 q·s, int4 z + n·s with the nibble n of element d in byte d // 2.
        `data_offs`, `scale_offs` [TILE_TOKENS, 1]: each token's offset; `t_mask` [TILE_TOKENS].

        GROUPS = BLOCK_D // GROUP_SIZE when that is a power of two: the scales (and zeros) are then
        loaded once per group ([TILE_TOKENS, GROUPS]) and broadcast over the group by a reshape, and
        int4 bytes are loaded once and split into their two nibbles by a join (compiled, per-element
        scale and byte gathers cost ~1.5x the registers). GROUPS = 0: per-element gathers."""
        offs_d = tl.arange(0, BLOCK_D)
        mask = t_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        if KV_FORMAT == 0:
            x = tl.load(data_ptr + data_offs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        elif GROUPS == 0:
            group_offs = scale_offs + offs_d[None, :] // GROUP_SIZE
            scale = tl.load(scale_ptr + group_offs, mask=mask, other=0.0).to(tl.float32)
            if KV_FORMAT == 1:
                q = tl.load(data_ptr + data_offs + offs_d[None, :], mask=mask, other=0).to(tl.float32)
                x = q * scale
            else:
                zero = tl.load(zero_ptr + group_offs, mask=mask, other=0.0).to(tl.float32)
                packed = tl.load(data_ptr + data_offs + offs_d[None, :] // 2, mask=mask, other=0).to(tl.int32)
                n = ((packed >> ((offs_d[None, :] % 2) * 4)) & 0xF).to(tl.float32)
                x = n * scale + zero
        else:
            offs_g = tl.arange(0, GROUPS)
            g_mask = t_mask[:, None] & (offs_g[None, :] < HEAD_DIM // GROUP_SIZE)
            scale = tl.load(scale_ptr + scale_offs + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
            if KV_FORMAT == 1:
                q = tl.load(data_ptr + data_offs + offs_d[None, :], mask=mask, other=0).to(tl.float32)
                x = tl.reshape(q, [TILE_TOKENS, GROUPS, GROUP_SIZE]) * scale[:, :, None]
            else:
                zero = tl.load(zero_ptr + scale_offs + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
                offs_b = tl.arange(0, BLOCK_D // 2)  # byte b holds elements 2b (low nibble), 2b + 1 (high)
                b_mask = t_mask[:, None] & (offs_b[None, :] < HEAD_DIM // 2)
                packed = tl.load(data_ptr + data_offs + offs_b[None, :], mask=b_mask, other=0).to(tl.int32)
                n = tl.reshape(tl.join(packed & 0xF, (packed >> 4) & 0xF), [TILE_TOKENS, GROUPS, GROUP_SIZE])
                x = n.to(tl.float32) * scale[:, :, None] + zero[:, :, None]
            x = tl.reshape(x, [TILE_TOKENS, BLOCK_D])
        return x

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,
        out_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        k_ptr,
        v_ptr,
        k_scale_ptr,
        v_scale_ptr,
        k_zero_ptr,
        v_zero_ptr,
        sink_ptr,
        block_tables_ptr,
        seq_lens_ptr,
        qk_scale,
        softcap,
        window,
        num_pages,
        num_splits,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_ms,
        stride_mh,
        stride_as,
        stride_ah,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_sb,
        stride_st,
        stride_sh,
        stride_bt,
        QUERIES_PER_KV: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TILE_TOKENS: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        GROUPS: tl.constexpr,
        KV_FORMAT: tl.constexpr,
        USE_WINDOW: tl.constexpr,
        HAS_SINK: tl.constexpr,
        SPLIT: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        """qk_scale: sm_scale·log2(e), or without SOFTCAP's log2(e): then scores c·tanh(s / c) are moved to
        log2 units after the cap (c = softcap)."""
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        offs_q = tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, TILE_TOKENS)  # token of the tile
        d_mask = offs_d < HEAD_DIM
        q_mask = (offs_q[:, None] < QUERIES_PER_KV) & d_mask[None, :]
        heads = kv_head * QUERIES_PER_KV + offs_q
        q_ptrs = q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [BLOCK_Q, BLOCK_D], q's dtype: tl.dot operand
        q32 = q.to(tl.float32)
        q_vec = tl.sum(q32, axis=0)  # [BLOCK_D]: the one row when BLOCK_Q == 1
        q_sink = tl.zeros([BLOCK_Q], dtype=tl.float32)  # q·sink_key: added to the score of position 0
        if HAS_SINK:
            sink = tl.load(sink_ptr + kv_head * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
            q_sink = tl.sum(q32 * sink[None, :], axis=1)

        seq_len = tl.load(seq_lens_ptr + seq)
        first = seq_len * 0  # first visible key position
        if USE_WINDOW:
            first = tl.maximum(seq_len - window, 0)
        # This split's tiles (module comment): every tile in [first_tile, last_tile) holds a visible key.
        first_tile = first // TILE_TOKENS
        last_tile = tl.cdiv(seq_len, TILE_TOKENS)
        tiles_per_split = tl.cdiv(last_tile - first_tile, num_splits)
        tile = first_tile + split * tiles_per_split
        end = tl.minimum(tile + tiles_per_split, last_tile)

        m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)  # running max (log2 units)
        l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)  # running sum of exp2
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        # A while loop, not range(): TRITON_INTERPRET (numpy >= 2.4) cannot take a loaded scalar as a
        # range bound; compiled, both lower to one loop over this split's tiles.
        # q·k and p·v: with one query head per KV head (MHA, BLOCK_Q = 1) as 2D broadcast products
        # reduced in fp32; with a GQA group (BLOCK_Q >= 16, padded rows) as tl.dot in q's dtype with
        # fp32 accumulation (float32 stays float32: "ieee"). p and V are rounded to q's dtype, as
        # flash attention does; dequantized K is taken as two fp16 parts, k_hi + k_lo, since
        # rounding it alone put int8 outputs 1.5x past the tests' fp16 tolerance (2e-3), and it costs
        # one more tensor-core product. The 3D broadcast form [BLOCK_Q, TILE_TOKENS, BLOCK_D] costs
        # 1.5-2x the registers for MHA and spills for groups of 4-8 (compiled for sm_89 / sm_90 and
        # counted).
        while tile < end:
            offs_tok = tile * TILE_TOKENS + offs_t  # key positions [TILE_TOKENS]
            page = offs_tok // BLOCK_SIZE  # logical block of each token, and its row in the block
            row = (offs_tok % BLOCK_SIZE)[:, None]
            t_mask = (offs_tok < seq_len) & (offs_tok >= first) & (page < num_pages)
            # The physical block of each token: one gather per tile (the tokens of a page read the same
            # table entry), so a tile costs one dependent load before its K/V loads, not one per page.
            phys = tl.load(block_tables_ptr + seq * stride_bt + page, mask=t_mask, other=0).to(tl.int64)
            data_offs = phys[:, None] * stride_kb + row * stride_kt + kv_head * stride_kh
            scale_offs = phys[:, None] * stride_sb + row * stride_st + kv_head * stride_sh
            # V is loaded before the scores are computed so that both tiles' loads are in flight together.
            k = _load_kv_tile(
                k_ptr,
                k_scale_ptr,
                k_zero_ptr,
                data_offs,
                scale_offs,
                t_mask,
                KV_FORMAT,
                HEAD_DIM,
                BLOCK_D,
                GROUP_SIZE,
                GROUPS,
                TILE_TOKENS,
            )  # [TILE_TOKENS, BLOCK_D]
            v = _load_kv_tile(
                v_ptr,
                v_scale_ptr,
                v_zero_ptr,
                data_offs,
                scale_offs,
                t_mask,
                KV_FORMAT,
                HEAD_DIM,
                BLOCK_D,
                GROUP_SIZE,
                GROUPS,
                TILE_TOKENS,
            )
            if BLOCK_Q == 1:
                s = tl.sum(q_vec[None, :] * k, axis=1)[None, :]  # [1, TILE_TOKENS]
            else:
                k_hi = k.to(q.dtype)
                s = tl.dot(q, tl.trans(k_hi), input_precision="ieee")  # [BLOCK_Q, TILE_TOKENS]
                if KV_FORMAT != 0:  # dequantized keys are no fp16 values: add the rounding error's scores
                    s += tl.dot(q, tl.trans((k - k_hi.to(tl.float32)).to(q.dtype)), input_precision="ieee")
            if HAS_SINK:
                s = s + tl.where(offs_tok[None, :] == 0, q_sink[:, None], 0.0)
            s = s * qk_scale
            if SOFTCAP:  # c·tanh(s / c) = c·(1 - 2 / (exp(2s / c) + 1)), finite for any s; then log2 units
                s = (softcap - 2.0 * softcap / (tl.exp(tl.minimum(2.0 * s / softcap, 80.0)) + 1.0)) * 1.4426950408889634
            s = tl.where(t_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if BLOCK_Q == 1:
                acc = acc * alpha[:, None] + tl.sum(tl.sum(p, axis=0)[:, None] * v, axis=0)[None, :]
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
            m_i = m_new
            tile += 1

        if SPLIT:  # partial results [S, H, NUM_SPLITS(, D)] for _combine_splits_kernel
            q_valid = offs_q < QUERIES_PER_KV
            ml_offs = seq * stride_ms + heads * stride_mh + split
            tl.store(m_ptr + ml_offs, m_i, mask=q_valid)
            tl.store(l_ptr + ml_offs, l_i, mask=q_valid)
            acc_ptrs = acc_ptr + seq * stride_as + heads[:, None] * stride_ah + split * HEAD_DIM + offs_d[None, :]
            tl.store(acc_ptrs, acc, mask=q_mask)
        else:
            l_i = tl.where(l_i == 0.0, 1.0, l_i)  # an empty sequence (padding) gives zeros, not NaN
            out = acc / l_i[:, None]
            out_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _combine_splits_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        num_splits,
        stride_ms,
        stride_mh,
        stride_as,
        stride_ah,
        stride_ot,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        BLOCK_SPLITS: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program per (sequence, query head): merge the splits' (m, l, acc) (module comment)."""
        seq = tl.program_id(0)
        head = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_SPLITS)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < num_splits
        d_mask = offs_d < HEAD_DIM
        ml_offs = seq * stride_ms + head * stride_mh + offs_s
        m = tl.load(m_ptr + ml_offs, mask=s_mask, other=-1.0e30)  # [BLOCK_SPLITS]
        l = tl.load(l_ptr + ml_offs, mask=s_mask, other=0.0)
        acc_ptrs = acc_ptr + seq * stride_as + head * stride_ah + offs_s[:, None] * HEAD_DIM + offs_d[None, :]
        acc = tl.load(acc_ptrs, mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_SPLITS, BLOCK_D]
        w = tl.exp2(m - tl.max(m, axis=0))  # 2^(m_i - M)
        l_sum = tl.sum(w * l, axis=0)
        l_sum = tl.where(l_sum == 0.0, 1.0, l_sum)  # an empty sequence (padding) gives zeros, not NaN
        out = tl.sum(w[:, None] * acc, axis=0) / l_sum  # [BLOCK_D]
        tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def decode_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    num_pages: int,
    block_size: int,
    tile_tokens: int,
    tuning: Tuning,
    sliding_window: int | None = None,
) -> int:
    """How many programs share one (sequence, KV head): enough for `tuning.decode_programs_per_sm` programs per
    SM, no more than the tiles the longest possible sequence has (table width `num_pages` pages, or the
    window), at most `tuning.decode_max_splits`. Static shapes only, never seq_lens: CUDA graphs replay one choice."""
    programs = max(1, num_seqs * num_kv_heads)
    want = -(-tuning.decode_programs_per_sm * (tuning.decode_sms or tuning.sms) // programs)
    tiles = -(-num_pages * block_size // tile_tokens)
    if sliding_window is not None:  # the visible keys span at most cdiv(W, tile) + 1 tiles
        tiles = min(tiles, -(-sliding_window // tile_tokens) + 1)
    return max(1, min(want, tiles, tuning.decode_max_splits))


def paged_attention_decode(
    q,
    kv_cache,
    layer,
    block_tables,
    seq_lens,
    query_start_loc,
    sm_scale,
    sliding_window=None,
    *,
    num_splits: int | None = None,
    softcap: float | None = None,
    tuning: Tuning | None = None,
):
    """Triton decode: one query token per sequence (`query_start_loc` is then arange(S + 1)).

    num_splits: programs per (sequence, KV head) over the context (flash-decoding, module comment
    above the kernel); None = `decode_num_splits` for these shapes and this GPU. `tuning`: default
    `Tuning.for_device` (benchmarks pass other tiles and warps)."""
    if triton is None:
        raise RuntimeError("paged_attention_decode needs Triton")
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_pages = block_tables.shape
    if num_tokens != num_seqs:
        raise ValueError(f"decode kernel takes one query per sequence: {num_tokens} queries, {num_seqs} sequences")
    if num_heads % kv_cache.num_kv_heads or head_dim != kv_cache.head_dim:
        raise ValueError(f"q heads {num_heads} / head_dim {head_dim} do not fit the cache {kv_cache}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    k, v = kv_cache.k[layer], kv_cache.v[layer]  # [NB + 1, BS, Hkv, D_stored]
    if kv_cache.quantized:
        k_scale, v_scale = kv_cache.k_scale[layer], kv_cache.v_scale[layer]  # [NB + 1, BS, Hkv, D / G]
        scale_strides = k_scale.stride()[:3]
    else:
        k_scale = v_scale = k  # unused
        scale_strides = (0, 0, 0)
    k_zero, v_zero = (k_scale, v_scale) if kv_cache.k_zero is None else (kv_cache.k_zero[layer], kv_cache.v_zero[layer])
    sink = k if kv_cache.sink_key is None else kv_cache.sink_key[layer]  # [Hkv, D] float32
    assert k.stride(-1) == 1 and q.stride(-1) == 1 and block_tables.stride(-1) == 1
    assert k_zero.stride() == k_scale.stride() and sink.is_contiguous()
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out

    queries_per_kv = num_heads // kv_cache.num_kv_heads
    block_q = 1 if queries_per_kv == 1 else max(16, triton.next_power_of_2(queries_per_kv))  # tl.dot: >= 16 rows
    block_d = triton.next_power_of_2(head_dim)
    tuning = tuning or Tuning.for_device(q.device)
    tile_tokens, num_warps = tuning.decode_launch_shape(block_d)
    if block_q > 1 and (tile_tokens < 16 or block_d < 16):
        raise ValueError(
            f"GQA decode uses tl.dot: needs TILE_TOKENS >= 16 and head_dim >= 16, got {tile_tokens}, {head_dim}"
        )
    group = kv_cache.group_size
    groups = block_d // group if kv_cache.quantized and group & (group - 1) == 0 and group <= block_d else 0
    if kv_cache.fmt == "int4" and block_d < 32:
        # Triton 3.6 on the H100 miscompiled the nibble join for heads of 16 (8 bytes per row) feeding the
        # GQA tl.dot (errors ~3 against the reference); heads of 64+ are fine
        groups = 0
    if num_splits is None:
        num_splits = decode_num_splits(
            num_seqs, kv_cache.num_kv_heads, num_pages, kv_cache.block_size, tile_tokens, tuning, sliding_window
        )
    if num_splits > 1:  # every split writes its slot, padding rows and empty splits included
        m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        m = l = acc = out  # unused
    _paged_decode_kernel[(num_seqs, kv_cache.num_kv_heads, num_splits)](
        q,
        out,
        m,
        l,
        acc,
        k,
        v,
        k_scale,
        v_scale,
        k_zero,
        v_zero,
        sink,
        block_tables,
        seq_lens,
        sm_scale * (1.0 if softcap else 1.4426950408889634),
        float(softcap or 0.0),
        0 if sliding_window is None else sliding_window,
        num_pages,
        num_splits,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        m.stride(0),
        m.stride(1),
        acc.stride(0),
        acc.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        *scale_strides,
        block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
        BLOCK_SIZE=kv_cache.block_size,
        TILE_TOKENS=tile_tokens,
        GROUP_SIZE=group,
        GROUPS=groups,
        KV_FORMAT=_FORMAT_CODES[kv_cache.fmt],
        USE_WINDOW=sliding_window is not None,
        HAS_SINK=kv_cache.sink_key is not None,
        SPLIT=num_splits > 1,
        SOFTCAP=bool(softcap),
        num_warps=num_warps,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_seqs, num_heads)](
            m,
            l,
            acc,
            out,
            num_splits,
            m.stride(0),
            m.stride(1),
            acc.stride(0),
            acc.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
        )
    return out
