"""Paged attention for the CPU path: decode tokens of all sequences in a few batched ops per layer.

The reference (`paged_attention_reference`) loops over sequences with ~20 small ops each per layer.
Here the one-token sequences of a step are served together: their KV slots [S, L] (L the longest
context, shorter rows padded and masked) are computed once per step, on the first layer, and every
layer then gathers K/V through `kv_cache.read` (any format, sink key included), and runs one
grouped-query `scaled_dot_product_attention` over [S, Hkv, L, D]. Prompt chunks take the reference path
per sequence (a prefill step is one call per chunk, compute-bound, not op-bound).
With the compiled kernels (`ops`), a step of decode tokens only over a float32/float16 cache without a stored
basis is one call (`attn_decode` in cpu/ops.c: reads the paged cache in place, softmax in float32).
Same signature as `kernels.paged_attention.PagedAttention.__call__`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from athena_runtime.batch import AttentionMetadata
from athena_runtime.cpu.decoder import cache_fp16, plain_cache
from athena_runtime.kernels.paged_attention import paged_attention_reference

log = logging.getLogger(__name__)


class CPUPagedAttention:
    def __init__(self, ops=None):
        self._ops = ops  # the compiled kernels (attn_decode), or None: batched PyTorch ops only
        self._logged: set[str] = set()
        self._attn: AttentionMetadata | None = None  # the step whose gather plans are cached
        self._plans: dict = {}  # sliding window -> plan (layers may differ in their window)

    def _log(self, path: str, why: str) -> None:
        if path not in self._logged:
            self._logged.add(path)
            log.info("paged attention: %s path (%s)", path, why)

    def _decode_plan(self, attn: AttentionMetadata, kv_cache, rows: list[int], seqs: list[int], sliding_window):
        """(slots [S·L], positions [S·L], mask [S, 1, 1, L] or None, rows) for sequences `seqs`, once per step."""
        if self._attn is not attn:
            self._attn, self._plans = attn, {}
        if sliding_window in self._plans:
            return self._plans[sliding_window]
        lens = [attn.seq_lens_list[s] for s in seqs]
        L, bs = max(lens), kv_cache.block_size
        pos = torch.arange(L)  # [L]
        sel = torch.tensor(seqs, dtype=torch.long)
        lens_t = torch.tensor(lens, dtype=torch.long)[:, None]  # [S, 1]
        valid = pos[None, :] < lens_t  # [S, L]
        if sliding_window is not None:
            valid &= pos[None, :] > lens_t - 1 - sliding_window
        p = torch.where(valid, pos[None, :], 0)  # padded entries read position 0 of their own sequence
        tables = attn.block_tables[sel].long()  # [S, MB]
        slots = tables.gather(1, p // bs) * bs + p % bs  # [S, L]
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        plan = (slots.reshape(-1), p.reshape(-1), mask, torch.tensor(rows), len(seqs), L)
        self._plans[sliding_window] = plan
        return plan

    def __call__(
        self, q, kv_cache, layer, attn: AttentionMetadata, sm_scale, sliding_window, fresh_kv=None, softcap=None
    ):
        qsl = attn.query_start_list
        if qsl is None:
            qsl = attn.query_start_loc.tolist()
            attn.query_start_list = qsl
        if attn.seq_lens_list is None:
            attn.seq_lens_list = attn.seq_lens.tolist()
        n_seq = len(qsl) - 1
        dec = [s for s in range(n_seq) if qsl[s + 1] - qsl[s] == 1]
        if softcap:  # attention logit soft-capping: the reference does it (the batched SDPA cannot)
            self._log("reference-softcap", "CPU attention with logit soft-capping")
            return paged_attention_reference(
                q,
                kv_cache,
                layer,
                attn.block_tables,
                attn.seq_lens,
                attn.query_start_loc,
                sm_scale,
                sliding_window,
                softcap,
            )
        if (
            self._ops is not None
            and len(dec) == n_seq
            and plain_cache(kv_cache)
            and q.stride(-1) == 1
            and q.stride(1) == q.shape[2]
            and q.dtype == torch.float32
        ):
            self._log("cpu-compiled-decode", "CPU decode step over a float32/float16 cache: one compiled call")
            H, D = q.shape[1], q.shape[2]
            out = torch.empty(n_seq, H, D, dtype=torch.float32)
            tables, lens = attn.block_tables.contiguous(), attn.seq_lens.contiguous()
            if self._ops.attn_decode(
                q.data_ptr(),
                n_seq,
                q.stride(0),
                H,
                kv_cache.num_kv_heads,
                D,
                kv_cache.k[layer].data_ptr(),
                kv_cache.v[layer].data_ptr(),
                cache_fp16(kv_cache),
                tables.data_ptr(),
                tables.stride(0),
                lens.data_ptr(),
                kv_cache.block_size,
                sm_scale,
                sliding_window or 0,
                out.data_ptr(),
                torch.get_num_threads(),
            ):
                raise MemoryError("attn_decode: out of memory for its score buffer")
            return out
        if not dec:
            self._log("reference", "CPU prompt chunks")
            return paged_attention_reference(
                q, kv_cache, layer, attn.block_tables, attn.seq_lens, attn.query_start_loc, sm_scale, sliding_window
            )
        self._log("cpu-batched-decode", "CPU: one-token sequences gathered and attended together")
        out = torch.empty_like(q) if len(dec) < n_seq else None
        slots, pos, mask, rows, S, L = self._decode_plan(attn, kv_cache, [qsl[s] for s in dec], dec, sliding_window)
        k, v = kv_cache.read(layer, slots, pos)  # float32 [S·L, Hkv, D]
        Hkv, D = kv_cache.num_kv_heads, kv_cache.head_dim
        k = k.view(S, L, Hkv, D).transpose(1, 2)  # [S, Hkv, L, D]
        v = v.view(S, L, Hkv, D).transpose(1, 2)
        qd = q if out is None else q[rows]
        o = F.scaled_dot_product_attention(
            qd.float()[:, :, None, :], k, v, attn_mask=mask, scale=sm_scale, enable_gqa=True
        )  # [S, H, 1, D]
        o = o[:, :, 0, :].to(q.dtype)
        if out is None:
            return o
        out[rows] = o
        for s in range(n_seq):
            if qsl[s + 1] - qsl[s] == 1:
                continue
            q0, q1 = qsl[s], qsl[s + 1]
            out[q0:q1] = paged_attention_reference(
                q[q0:q1],
                kv_cache,
                layer,
                attn.block_tables[s : s + 1],
                attn.seq_lens[s : s + 1],
                torch.tensor([0, q1 - q0], dtype=torch.int32),
                sm_scale,
                sliding_window,
            )
        return out
