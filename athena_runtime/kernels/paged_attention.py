"""Paged attention over the KV cache: a Triton decode kernel and its PyTorch reference.

Both take the same arguments:
    q               [T, H, D]   queries of the flat batch (RoPE applied, in the cache's basis: `kv_cache.query`)
    kv_cache, layer             the cache (`athena_runtime.kv_cache.KVCache`) and the layer to read
    block_tables    [S, MB]     int32, physical block ids per sequence (padded with the null block)
    seq_lens        [S]         int32, KV length of each sequence (new tokens included)
    query_start_loc [S + 1]     int32, sequence s owns query rows [qsl[s], qsl[s+1])
    sm_scale                    softmax scale (1/sqrt(D))
    sliding_window              None, or W: query at position p sees keys p - W < j <= p
and return the attention output [T, H, D] in q's dtype. The new tokens must already be written.

The query rows of sequence s sit at the last positions: row qsl[s] + i has position
seq_lens[s] - n_s + i, and attends causally to cached and new keys. The Triton kernel handles decode
only (T == S, one query per sequence); the reference and the SDPA prefill path handle any chunk.
Both dequantize the cache's format (kv_cache.py) and score the key at position 0 with the cache's
`sink_key` added back: the reference through `kv_cache.read(layer, slots, positions)`, the kernel as
`q·sink_key` added to that one score.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference path is used
    triton = None

log = logging.getLogger(__name__)

_FORMAT_CODES = {"fp16": 0, "int8": 1, "int4": 2}  # the unquantized class may also hold float32


# --------------------------------------------------------------------------------------------
# PyTorch reference (any number of query tokens per sequence) and the SDPA prefill path
# --------------------------------------------------------------------------------------------

def _per_sequence(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, sm_scale, sliding_window,
                  seq_lens_list=None, query_start_list=None, use_sdpa=False):
    seq_lens_list = seq_lens.tolist() if seq_lens_list is None else seq_lens_list
    qsl = query_start_loc.tolist() if query_start_list is None else query_start_list
    group = q.shape[1] // kv_cache.num_kv_heads
    bs = kv_cache.block_size
    out = torch.empty_like(q)
    for s, kv_len in enumerate(seq_lens_list):
        q0, q1 = qsl[s], qsl[s + 1]
        pos_k = torch.arange(kv_len, device=q.device)  # [L]
        slots = block_tables[s, pos_k // bs].long() * bs + pos_k % bs
        k, v = kv_cache.read(layer, slots, pos_k)  # float32 [L, Hkv, D]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [L, H, D]
        pos_q = torch.arange(kv_len - (q1 - q0), kv_len, device=q.device)  # [n]
        visible = pos_k[None, :] <= pos_q[:, None]  # [n, L]
        if sliding_window is not None:
            visible &= pos_k[None, :] > pos_q[:, None] - sliding_window
        if use_sdpa:
            o = F.scaled_dot_product_attention(
                q[q0:q1].transpose(0, 1), k.to(q.dtype).transpose(0, 1), v.to(q.dtype).transpose(0, 1),
                attn_mask=visible, scale=sm_scale)  # [H, n, D]
            out[q0:q1] = o.transpose(0, 1)
        else:
            scores = torch.einsum("nhd,lhd->hnl", q[q0:q1].float(), k) * sm_scale  # [H, n, L]
            p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out[q0:q1] = torch.einsum("hnl,lhd->nhd", p, v).to(q.dtype)
    return out


def paged_attention_reference(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, sm_scale,
                              sliding_window=None):
    """The spec: gather each sequence's K/V through its block table, dequantize, fp32 softmax."""
    return _per_sequence(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, sm_scale, sliding_window)


def paged_attention_prefill(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, sm_scale,
                            sliding_window=None, seq_lens_list=None, query_start_list=None):
    """GPU prefill: the reference's gather, then `F.scaled_dot_product_attention` per sequence."""
    return _per_sequence(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, sm_scale, sliding_window,
                         seq_lens_list, query_start_list, use_sdpa=True)


def paged_attention_mixed(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, sm_scale,
                          sliding_window=None, seq_lens_list=None, query_start_list=None):
    """A batch of prefill chunks and decode tokens (continuous batching): the one-token sequences go
    through the decode kernel in one launch, whole prompts through one SDPA call per group of up to
    FRESH_SDPA_MAX_TOKENS tokens, and only continued chunks through the per-sequence path. (With every
    sequence in the per-sequence loop, a 64-stream step while prompts arrive cost 0.5-1.7 s on the
    H100: hundreds of small launches per layer.)"""
    seq_lens_list = seq_lens.tolist() if seq_lens_list is None else seq_lens_list
    qsl = query_start_loc.tolist() if query_start_list is None else query_start_list
    n = [qsl[s + 1] - qsl[s] for s in range(len(seq_lens_list))]
    dec = [s for s, k in enumerate(n) if k == 1]
    fresh = [s for s, k in enumerate(n) if k > 1 and k == seq_lens_list[s]]  # whole prompts: no cached keys
    rest = [s for s, k in enumerate(n) if k > 1 and k != seq_lens_list[s]]   # continued chunks
    out = torch.empty_like(q)
    if len(dec) == 1:
        rest.append(dec.pop())
    if dec:
        dec_idx = torch.tensor(dec, dtype=torch.long, device=q.device)
        rows = torch.tensor([qsl[s] for s in dec], dtype=torch.long, device=q.device)
        out[rows] = paged_attention_decode(
            q[rows], kv_cache, layer, block_tables[dec_idx], seq_lens[dec_idx],
            torch.arange(len(dec) + 1, dtype=torch.int32, device=q.device), sm_scale, sliding_window)
    for group in _token_groups(fresh, n, FRESH_SDPA_MAX_TOKENS):
        _fresh_prompts_sdpa(q, out, kv_cache, layer, block_tables, group, n, qsl, sm_scale, sliding_window)
    for s in rest:  # each chunk with its own KV length and queries
        q0, q1 = qsl[s], qsl[s + 1]
        out[q0:q1] = paged_attention_prefill(
            q[q0:q1], kv_cache, layer, block_tables[s:s + 1], seq_lens[s:s + 1], None, sm_scale, sliding_window,
            [seq_lens_list[s]], [0, q1 - q0])
    return out


FRESH_SDPA_MAX_TOKENS = 4096  # one SDPA call covers at most this many prompt tokens (its mask is T x T)


def _token_groups(seqs: list[int], n: list[int], limit: int) -> list[list[int]]:
    groups, cur, size = [], [], 0
    for s in seqs:
        if cur and size + n[s] > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += n[s]
    return groups + ([cur] if cur else [])


def _fresh_prompts_sdpa(q, out, kv_cache, layer, block_tables, seqs, n, qsl, sm_scale, sliding_window):
    """Whole prompts (their keys are exactly their own new tokens) in ONE SDPA call: the tokens of all
    `seqs` side by side, a block-diagonal causal mask keeping each prompt to itself. Costs more
    FLOPs than per-prompt calls (T² instead of Σ n²) but a fixed dozen launches per layer instead of
    a dozen per prompt, which is what a prefill step on a slow host is made of."""
    dev, bs = q.device, kv_cache.block_size
    seq_id = [i for i, s in enumerate(seqs) for _ in range(n[s])]
    pos = [p for s in seqs for p in range(n[s])]
    rows = torch.tensor([r for s in seqs for r in range(qsl[s], qsl[s + 1])], dtype=torch.long, device=dev)
    sid = torch.tensor(seq_id, dtype=torch.long, device=dev)
    pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
    tables = block_tables[torch.tensor(seqs, dtype=torch.long, device=dev)]  # [len(seqs), MB]
    slots = tables[sid, pos_t // bs].long() * bs + pos_t % bs
    k, v = kv_cache.read(layer, slots, pos_t)  # float32 [T, Hkv, D]
    group = q.shape[1] // kv_cache.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [T, H, D]
    visible = (sid[:, None] == sid[None, :]) & (pos_t[None, :] <= pos_t[:, None])  # [T, T]
    if sliding_window is not None:
        visible &= pos_t[None, :] > pos_t[:, None] - sliding_window
    o = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k.to(q.dtype).transpose(0, 1),
                                       v.to(q.dtype).transpose(0, 1), attn_mask=visible, scale=sm_scale)
    out[rows] = o.transpose(0, 1)


# --------------------------------------------------------------------------------------------
# Triton decode kernel: one program per (sequence, KV head), all its GQA query heads together
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_kv_tile(data_ptr, scale_ptr, zero_ptr, data_offs, scale_offs, mask, offs_d,
                      KV_FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr):
        """One [BLOCK_SIZE, BLOCK_D] tile of K or V, dequantized to float32 in registers (kv_cache.py):
        fp16 as stored, int8 q·s, int4 z + n·s with the nibble n of element d in byte d // 2."""
        if KV_FORMAT == 0:
            x = tl.load(data_ptr + data_offs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
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
        return x

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, out_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, k_zero_ptr, v_zero_ptr, sink_ptr,
        block_tables_ptr, seq_lens_ptr, qk_scale, window,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_kt, stride_kh,
        stride_sb, stride_st, stride_sh,
        stride_bt,
        QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, KV_FORMAT: tl.constexpr, USE_WINDOW: tl.constexpr,
        HAS_SINK: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        offs_q = tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, BLOCK_SIZE)
        q_mask = (offs_q[:, None] < QUERIES_PER_KV) & (offs_d[None, :] < HEAD_DIM)
        heads = kv_head * QUERIES_PER_KV + offs_q
        q_ptrs = q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32)  # [BLOCK_Q, BLOCK_D]
        q_sink = tl.zeros([BLOCK_Q], dtype=tl.float32)  # q·sink_key: added to the score of position 0
        if HAS_SINK:
            sink = tl.load(sink_ptr + kv_head * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
            q_sink = tl.sum(q * sink[None, :], axis=1)

        seq_len = tl.load(seq_lens_ptr + seq)
        first = seq_len * 0  # first visible key position
        if USE_WINDOW:
            first = tl.maximum(seq_len - window, 0)
        m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)  # running max (log2 units)
        l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)  # running sum of exp2
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        # A while loop, not range(): TRITON_INTERPRET (numpy >= 2.4) cannot take a loaded scalar as a
        # range bound; compiled, both lower to one loop over the sequence's logical blocks.
        blk = first // BLOCK_SIZE
        last = tl.cdiv(seq_len, BLOCK_SIZE)
        while blk < last:
            phys = tl.load(block_tables_ptr + seq * stride_bt + blk).to(tl.int64)
            offs_tok = blk * BLOCK_SIZE + offs_t
            t_mask = (offs_tok < seq_len) & (offs_tok >= first)  # [BLOCK_SIZE]
            mask = t_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
            data_offs = phys * stride_kb + offs_t[:, None] * stride_kt + kv_head * stride_kh
            scale_offs = phys * stride_sb + offs_t[:, None] * stride_st + kv_head * stride_sh
            k = _load_kv_tile(k_ptr, k_scale_ptr, k_zero_ptr, data_offs, scale_offs, mask, offs_d,
                              KV_FORMAT, GROUP_SIZE)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_Q, BLOCK_SIZE]
            if HAS_SINK:
                s = s + tl.where(offs_tok[None, :] == 0, q_sink[:, None], 0.0)
            s = s * qk_scale
            s = tl.where(t_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_kv_tile(v_ptr, v_scale_ptr, v_zero_ptr, data_offs, scale_offs, mask, offs_d,
                              KV_FORMAT, GROUP_SIZE)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
            blk += 1
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # an empty sequence (padding) gives zeros, not NaN
        out = acc / l_i[:, None]
        out_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_attention_decode(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, sm_scale,
                           sliding_window=None):
    """Triton decode: one query token per sequence (`query_start_loc` is then arange(S + 1))."""
    if triton is None:
        raise RuntimeError("paged_attention_decode needs Triton")
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    if num_tokens != num_seqs:
        raise ValueError(f"decode kernel takes one query per sequence: {num_tokens} queries, {num_seqs} sequences")
    if num_heads % kv_cache.num_kv_heads or head_dim != kv_cache.head_dim:
        raise ValueError(f"q heads {num_heads} / head_dim {head_dim} do not fit the cache {kv_cache}")
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
    queries_per_kv = num_heads // kv_cache.num_kv_heads
    _paged_decode_kernel[(num_seqs, kv_cache.num_kv_heads)](
        q, out, k, v, k_scale, v_scale, k_zero, v_zero, sink, block_tables, seq_lens,
        sm_scale * 1.4426950408889634, 0 if sliding_window is None else sliding_window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        *scale_strides,
        block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv, HEAD_DIM=head_dim, BLOCK_Q=max(triton.next_power_of_2(queries_per_kv), 1),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=kv_cache.block_size, GROUP_SIZE=kv_cache.group_size,
        KV_FORMAT=_FORMAT_CODES[kv_cache.fmt], USE_WINDOW=sliding_window is not None,
        HAS_SINK=kv_cache.sink_key is not None,
    )
    return out


# --------------------------------------------------------------------------------------------
# The one place a path is chosen
# --------------------------------------------------------------------------------------------

class PagedAttention:
    """Picks the path for a batch and logs each path the first time it runs.

    CUDA + decode + Triton -> `paged_attention_decode`; CUDA + mixed batch -> `paged_attention_mixed`
    (decode kernel for one-token sequences, SDPA per chunk); CUDA without Triton ->
    `paged_attention_prefill`; CPU -> `paged_attention_reference`.
    """

    def __init__(self):
        self._logged: set[str] = set()

    def _log(self, path: str, why: str) -> None:
        if path not in self._logged:
            self._logged.add(path)
            log.info("paged attention: %s path (%s)", path, why)

    def __call__(self, q, kv_cache, layer, attn, sm_scale, sliding_window):
        args = (q, kv_cache, layer, attn.block_tables, attn.seq_lens, attn.query_start_loc, sm_scale, sliding_window)
        if q.is_cuda and attn.is_decode and triton is not None:
            self._log("triton-decode", "CUDA decode batch")
            return paged_attention_decode(*args)
        if q.is_cuda and triton is not None:
            self._log("mixed", "CUDA batch with prefill: decode kernel for one-token sequences, SDPA for chunks")
            return paged_attention_mixed(*args, attn.seq_lens_list, attn.query_start_list)
        if q.is_cuda:
            self._log("sdpa-prefill", "CUDA batch, no Triton")
            return paged_attention_prefill(*args, attn.seq_lens_list, attn.query_start_list)
        self._log("reference", f"device {q.device.type}")
        return paged_attention_reference(*args)
