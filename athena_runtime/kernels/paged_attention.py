"""Paged attention over the KV cache: the PyTorch reference, the prefill paths and the path chooser
(the Triton decode kernel: `paged_decode.py`).

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

# the Triton decode kernel lives in paged_decode.py; re-exported here (one module for the callers)
from athena_runtime.kernels.paged_decode import decode_num_splits, paged_attention_decode, triton  # noqa: F401
from athena_runtime.kernels.tuning import Tuning

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# PyTorch reference (any number of query tokens per sequence) and the SDPA prefill path
# --------------------------------------------------------------------------------------------


def _per_sequence(
    q,
    kv_cache,
    layer,
    block_tables,
    seq_lens,
    query_start_loc,
    sm_scale,
    sliding_window,
    seq_lens_list=None,
    query_start_list=None,
    use_sdpa=False,
    softcap=None,
):
    seq_lens_list, qsl = _host_lists(seq_lens, query_start_loc, seq_lens_list, query_start_list)
    out = torch.empty_like(q)
    for s, kv_len in enumerate(seq_lens_list):
        q0, q1 = qsl[s], qsl[s + 1]
        pos_k = torch.arange(kv_len, device=q.device)  # [L]
        pos_q = torch.arange(kv_len - (q1 - q0), kv_len, device=q.device)  # [n]
        out[q0:q1] = _attend(
            q[q0:q1], kv_cache, layer, block_tables[s], pos_k, pos_q, sm_scale, sliding_window, use_sdpa, softcap
        )
    return out


def _attend(q, kv_cache, layer, table, pos_k, pos_q, sm_scale, sliding_window, use_sdpa, softcap, kv_len=None):
    """Queries q [n, H, D] at positions pos_q [n] of one sequence over its keys at positions pos_k [L], read back
    through its block table row `table`; with `kv_len` (a device scalar) keys at or past it are zeroed (padding
    of a CUDA graph: never visible to a real query, but their bytes may be anything)."""
    bs, group = kv_cache.block_size, q.shape[1] // kv_cache.num_kv_heads
    slots = table[pos_k // bs].long() * bs + pos_k % bs
    k, v = kv_cache.read(layer, slots, pos_k)  # float32 [L, Hkv, D]
    if kv_len is not None:
        valid = (pos_k < kv_len)[:, None, None]
        k, v = torch.where(valid, k, 0.0), torch.where(valid, v, 0.0)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [L, H, D]
    visible = pos_k[None, :] <= pos_q[:, None]  # [n, L]
    if sliding_window is not None:
        visible &= pos_k[None, :] > pos_q[:, None] - sliding_window
    if use_sdpa and softcap is None:
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.to(q.dtype).transpose(0, 1),
            v.to(q.dtype).transpose(0, 1),
            attn_mask=visible,
            scale=sm_scale,
        )  # [H, n, D]
        return o.transpose(0, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * sm_scale  # [H, n, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnl,lhd->nhd", p, v).to(q.dtype)


def one_sequence_attention(
    q, kv_cache, layer, block_tables, seq_lens, positions, sm_scale, sliding_window=None, use_kernel=None
):
    """One sequence's chunk (every row of q, at `positions` [T]) over keys 0 .. block_tables.shape[1]·block_size - 1
    of the cache, of which the first seq_lens[0] are real: no host data, so a CUDA graph can capture it
    (`prefill_graphs.py`, a chunk after a cached prefix). With Triton (default on CUDA: `use_kernel`) each query row
    is a "sequence" of the decode kernel over the shared block table, its keys those up to its own position: causal
    attention read straight from the (quantized) cache, no dequantized copy; else `_attend` (PyTorch, padding keys
    zeroed and masked)."""
    key_len = block_tables.shape[1] * kv_cache.block_size
    if use_kernel if use_kernel is not None else (q.is_cuda and triton is not None):
        T = q.shape[0]
        lens = torch.clamp(positions + 1, max=key_len).to(torch.int32)  # padding rows stay inside the table
        starts = torch.arange(T + 1, dtype=torch.int32, device=q.device)
        return paged_attention_decode(
            q, kv_cache, layer, block_tables.expand(T, -1), lens, starts, sm_scale, sliding_window
        )
    pos_k = torch.arange(key_len, device=q.device)
    return _attend(
        q, kv_cache, layer, block_tables[0], pos_k, positions, sm_scale, sliding_window, q.is_cuda, None, seq_lens[0]
    )


def _host_lists(seq_lens, query_start_loc, seq_lens_list, query_start_list) -> tuple[list[int], list[int]]:
    """seq_lens and query_start_loc as lists: the caller's copies where it has them (no device sync)."""
    return (
        seq_lens.tolist() if seq_lens_list is None else seq_lens_list,
        query_start_loc.tolist() if query_start_list is None else query_start_list,
    )


def paged_attention_reference(
    q, kv_cache, layer, block_tables, seq_lens, query_start_loc, sm_scale, sliding_window=None, softcap=None
):
    """The spec: gather each sequence's K/V through its block table, dequantize, fp32 softmax."""
    return _per_sequence(
        q, kv_cache, layer, block_tables, seq_lens, query_start_loc, sm_scale, sliding_window, softcap=softcap
    )


def paged_attention_prefill(
    q,
    kv_cache,
    layer,
    block_tables,
    seq_lens,
    query_start_loc,
    sm_scale,
    sliding_window=None,
    seq_lens_list=None,
    query_start_list=None,
    softcap=None,
):
    """GPU prefill: the reference's gather, then `F.scaled_dot_product_attention` per sequence (the einsum
    of the reference with `softcap`)."""
    return _per_sequence(
        q,
        kv_cache,
        layer,
        block_tables,
        seq_lens,
        query_start_loc,
        sm_scale,
        sliding_window,
        seq_lens_list,
        query_start_list,
        use_sdpa=True,
        softcap=softcap,
    )


def paged_attention_mixed(
    q,
    kv_cache,
    layer,
    block_tables,
    seq_lens,
    query_start_loc,
    sm_scale,
    sliding_window=None,
    seq_lens_list=None,
    query_start_list=None,
    fresh_kv=None,
    softcap=None,
    tuning: Tuning | None = None,
    step_cache: dict | None = None,
):
    """A batch of prefill chunks and decode tokens (continuous batching): the one-token sequences go
    through the decode kernel in one launch, whole prompts through a few SDPA calls per group of up to
    `tuning.fresh_sdpa_max_tokens` tokens (`_fresh_prompts_sdpa`), and only continued chunks through the
    per-sequence path. (With every sequence in the per-sequence loop, a 64-stream step while prompts arrive
    cost 0.5-1.7 s on the H100: hundreds of small launches per layer.)

    With `fresh_kv` (this step's k, v [T, Hkv, D], rows as q's), whole prompts attend over their own keys and values
    as computed (`KVCache.fresh_kv`: the cache's basis, no quantization) instead of reading them back: the same
    result for an fp16 cache, the unquantized one for int8/int4, and no gather or dequantize (a prompt's admission
    step is host-bound, BENCHMARKS.md §7). Decode tokens and continued chunks still read the cache.

    `step_cache` (a dict that lives for one step: `AttentionMetadata.step_cache`) keeps the index tensors built from
    the host lists, which are the same for every layer: built and copied to the device once a step, not per layer."""
    seq_lens_list, qsl = _host_lists(seq_lens, query_start_loc, seq_lens_list, query_start_list)
    n = [qsl[s + 1] - qsl[s] for s in range(len(seq_lens_list))]
    dec = [s for s, k in enumerate(n) if k == 1]
    fresh = [s for s, k in enumerate(n) if k > 1 and k == seq_lens_list[s]]  # whole prompts: no cached keys
    rest = [s for s, k in enumerate(n) if k > 1 and k != seq_lens_list[s]]  # continued chunks
    if softcap is not None:  # SDPA cannot soft-cap: whole prompts join the per-sequence path
        rest, fresh = sorted(rest + fresh), []
    tuning = tuning or Tuning.for_device(q.device)
    out = torch.empty_like(q)
    if len(dec) == 1:
        rest.append(dec.pop())
    if dec:
        dec_idx, rows, starts = _cached(
            step_cache,
            ("dec", tuple(dec)),
            lambda: (
                torch.tensor(dec, dtype=torch.long, device=q.device),
                torch.tensor([qsl[s] for s in dec], dtype=torch.long, device=q.device),
                torch.arange(len(dec) + 1, dtype=torch.int32, device=q.device),
            ),
        )
        out[rows] = paged_attention_decode(
            q[rows],
            kv_cache,
            layer,
            block_tables[dec_idx],
            seq_lens[dec_idx],
            starts,
            sm_scale,
            sliding_window,
            softcap=softcap,
            tuning=tuning,
        )
    for group in _token_groups(fresh, n, tuning.fresh_sdpa_max_tokens):
        _fresh_prompts_sdpa(
            q, out, kv_cache, layer, block_tables, group, n, qsl, sm_scale, sliding_window, fresh_kv, step_cache
        )
    for s in rest:  # each chunk with its own KV length and queries
        q0, q1 = qsl[s], qsl[s + 1]
        out[q0:q1] = paged_attention_prefill(
            q[q0:q1],
            kv_cache,
            layer,
            block_tables[s : s + 1],
            seq_lens[s : s + 1],
            None,
            sm_scale,
            sliding_window,
            [seq_lens_list[s]],
            [0, q1 - q0],
            softcap=softcap,
        )
    return out


def _token_groups(seqs: list[int], n: list[int], limit: int) -> list[list[int]]:
    groups, cur, size = [], [], 0
    for s in seqs:
        if cur and size + n[s] > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += n[s]
    return groups + ([cur] if cur else [])


def _cached(step_cache: dict | None, key, build):
    if step_cache is None:
        return build()
    if key not in step_cache:
        step_cache[key] = build()
    return step_cache[key]


FRESH_PAD_WASTE = 1.25  # prompts of unequal lengths share one SDPA call while padded rows stay <= 25% more


def _fresh_prompts_sdpa(
    q, out, kv_cache, layer, block_tables, seqs, n, qsl, sm_scale, sliding_window, fresh_kv=None, step_cache=None
):
    """Whole prompts (their keys are exactly their own new tokens), few launches per layer: prompts go through
    causal SDPA calls as a batch (no mask: the flash kernel, fp16), those of one length as they are and, with
    `fresh_kv`, prompts of unequal lengths padded at the end to the longest of their group (`_padded_prompts`);
    prompts longer than a sliding window through one call with a block-diagonal causal mask
    (more FLOPs, T² instead of Σ n², and PyTorch's slower masked kernels). With every prompt in the masked
    call, a 64-stream admission step (16 prompts of 128 tokens) spent ~90% of its 240 ms in the masked
    fp32 fallback on the H100; with one call per distinct length, 16 text prompts of 145-162 tokens took 500-970 ms
    a step there (serve-gap step trace, 7B H100)."""
    masked = [s for s in seqs if sliding_window is not None and n[s] > sliding_window]
    plain = [s for s in seqs if s not in masked]
    if fresh_kv is not None:
        groups = _padded_groups(plain, n)
    else:
        by_len: dict[int, list[int]] = {}
        for s in plain:
            by_len.setdefault(n[s], []).append(s)
        groups = list(by_len.values())
    for group in groups:
        if len({n[s] for s in group}) == 1:
            _same_length_prompts(q, out, kv_cache, layer, block_tables, group, n[group[0]], qsl, sm_scale, fresh_kv)
        else:
            _padded_prompts(q, out, kv_cache, layer, group, n, qsl, sm_scale, fresh_kv, step_cache)
    if masked:
        _masked_prompts(q, out, kv_cache, layer, block_tables, masked, n, qsl, sm_scale, sliding_window, fresh_kv)


def _padded_groups(seqs: list[int], n: list[int]) -> list[list[int]]:
    """Prompts, longest first, in groups whose padded size (members x longest) is <= FRESH_PAD_WASTE x their tokens."""
    groups: list[list[int]] = []
    for s in sorted(seqs, key=lambda s: -n[s]):
        g = groups[-1] if groups else None
        if g and (len(g) + 1) * n[g[0]] <= FRESH_PAD_WASTE * (sum(n[t] for t in g) + n[s]):
            g.append(s)
        else:
            groups.append([s])
    return groups


def _padded_prompts(q, out, kv_cache, layer, seqs, n, qsl, sm_scale, fresh_kv, step_cache=None):
    """Prompts of unequal lengths in one causal SDPA call: each padded at its end to the longest, L, by repeating
    its last row (a padded key sits after every real query of its prompt, so causal attention never sees it)."""
    B, L, H, D = len(seqs), max(n[s] for s in seqs), q.shape[1], q.shape[2]

    def build():
        dev = q.device
        idx = [qsl[s] + min(i, n[s] - 1) for s in seqs for i in range(L)]  # padded layout -> flat rows
        real = [b * L + i for b, s in enumerate(seqs) for i in range(n[s])]  # real rows in the padded layout
        rows = [qsl[s] + i for s in seqs for i in range(n[s])]
        return tuple(torch.tensor(x, dtype=torch.long, device=dev) for x in (idx, real, rows))

    idx, real, rows = _cached(step_cache, ("padded", tuple(seqs)), build)
    k, v = kv_cache.fresh_kv(layer, fresh_kv[0][idx], fresh_kv[1][idx])
    group = H // kv_cache.num_kv_heads
    as_batch = lambda t: t.to(q.dtype).reshape(B, L, H, D).transpose(1, 2)  # noqa: E731 - [B, H, L, D]
    o = F.scaled_dot_product_attention(
        as_batch(q[idx]),
        as_batch(k.repeat_interleave(group, 1)),
        as_batch(v.repeat_interleave(group, 1)),
        is_causal=True,
        scale=sm_scale,
    )
    out[rows] = o.transpose(1, 2).reshape(B * L, H, D)[real]


def _prompt_rows(seqs, qsl, dev):
    """Rows of `seqs` in the flat batch: a slice when they are contiguous (no host-to-device copy, so a CUDA
    graph can capture it), else an index tensor."""
    if all(qsl[a + 1] == qsl[b] for a, b in zip(seqs, seqs[1:])):
        return slice(qsl[seqs[0]], qsl[seqs[-1] + 1])
    return torch.tensor([r for s in seqs for r in range(qsl[s], qsl[s + 1])], dtype=torch.long, device=dev)


def _prompt_kv(q, kv_cache, layer, block_tables, seqs, n, qsl, fresh_kv=None, positions=True):
    """Rows of `seqs` in q, and their keys/values (GQA heads repeated): this step's own (`fresh_kv`, in the
    cache's basis) or read back from the cache (float32 [T, H, D]); with each token's sequence index and position
    (None, None with `positions=False` and `fresh_kv`)."""
    dev, bs = q.device, kv_cache.block_size
    rows = _prompt_rows(seqs, qsl, dev)
    sid = pos_t = None
    if positions or fresh_kv is None:
        sid = torch.tensor([i for i, s in enumerate(seqs) for _ in range(n[s])], dtype=torch.long, device=dev)
        pos_t = torch.tensor([p for s in seqs for p in range(n[s])], dtype=torch.long, device=dev)
    if fresh_kv is not None:
        k, v = kv_cache.fresh_kv(layer, fresh_kv[0][rows], fresh_kv[1][rows])
    else:
        tables = block_tables[torch.tensor(seqs, dtype=torch.long, device=dev)]  # [len(seqs), MB]
        slots = tables[sid, pos_t // bs].long() * bs + pos_t % bs
        k, v = kv_cache.read(layer, slots, pos_t)  # float32 [T, Hkv, D]
    group = q.shape[1] // kv_cache.num_kv_heads
    return rows, sid, pos_t, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)


def _same_length_prompts(q, out, kv_cache, layer, block_tables, seqs, length, qsl, sm_scale, fresh_kv=None):
    n = {s: length for s in seqs}
    rows, _, _, k, v = _prompt_kv(q, kv_cache, layer, block_tables, seqs, n, qsl, fresh_kv, positions=False)
    B, H, D = len(seqs), q.shape[1], q.shape[2]
    as_batch = lambda t: t.to(q.dtype).view(B, length, H, D).transpose(1, 2)  # noqa: E731 - [B, H, L, D]
    o = F.scaled_dot_product_attention(as_batch(q[rows]), as_batch(k), as_batch(v), is_causal=True, scale=sm_scale)
    out[rows] = o.transpose(1, 2).reshape(B * length, H, D)


def _masked_prompts(q, out, kv_cache, layer, block_tables, seqs, n, qsl, sm_scale, sliding_window, fresh_kv=None):
    rows, sid, pos_t, k, v = _prompt_kv(q, kv_cache, layer, block_tables, seqs, n, qsl, fresh_kv)
    visible = (sid[:, None] == sid[None, :]) & (pos_t[None, :] <= pos_t[:, None])  # [T, T]
    if sliding_window is not None:
        visible &= pos_t[None, :] > pos_t[:, None] - sliding_window
    o = F.scaled_dot_product_attention(
        q[rows].transpose(0, 1),
        k.to(q.dtype).transpose(0, 1),
        v.to(q.dtype).transpose(0, 1),
        attn_mask=visible,
        scale=sm_scale,
    )
    out[rows] = o.transpose(0, 1)


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

    def __call__(self, q, kv_cache, layer, attn, sm_scale, sliding_window, fresh_kv=None, softcap=None):
        """`fresh_kv`: this step's k, v [T, Hkv, D] as written to the cache (rows of q's tokens); whole prompts on the
        CUDA mixed path attend over them instead of reading them back (`paged_attention_mixed`). `softcap`: the
        model's attention-score soft-capping (module docstring)."""
        if attn.one_sequence:
            self._log("one-sequence", "a chunk after a cached prefix in a prefill CUDA graph")
            return one_sequence_attention(
                q, kv_cache, layer, attn.block_tables, attn.seq_lens, attn.positions, sm_scale, sliding_window
            )
        args = (q, kv_cache, layer, attn.block_tables, attn.seq_lens, attn.query_start_loc, sm_scale, sliding_window)
        if q.is_cuda and attn.is_decode and triton is not None:
            self._log("triton-decode", "CUDA decode batch")
            return paged_attention_decode(*args, softcap=softcap)
        if q.is_cuda and triton is not None:
            if softcap is not None:
                self._log(
                    "mixed, soft-capped",
                    "SDPA cannot soft-cap scores: prompts take the per-sequence "
                    "einsum path (slower prefill), one-token sequences the decode kernel",
                )
            else:
                self._log("mixed", "CUDA batch with prefill: decode kernel for one-token sequences, SDPA for chunks")
            return paged_attention_mixed(
                *args,
                attn.seq_lens_list,
                attn.query_start_list,
                fresh_kv=fresh_kv,
                softcap=softcap,
                step_cache=attn.step_cache,
            )
        if q.is_cuda:
            self._log("sdpa-prefill", "CUDA batch, no Triton" + (", soft-capped: einsum" if softcap else ""))
            return paged_attention_prefill(*args, attn.seq_lens_list, attn.query_start_list, softcap=softcap)
        self._log("reference", f"device {q.device.type}")
        return paged_attention_reference(*args, softcap=softcap)
