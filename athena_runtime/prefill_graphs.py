"""CUDA graphs for the prefill of a lone prompt (time to first token).

A prefill step launches ~50 kernels per layer (a 7B prompt of 170 tokens: 1,525 launches); issued from Python
they take 60-100 ms of host time for ~22 ms of GPU work on an H100 (BENCHMARKS.md §7). A step that feeds ONE
sequence replays a graph captured for its token-count bucket instead: the n tokens are padded to the bucket
b >= n with token 0, the padding written to the cache's null block; the logits are those of row n - 1.

- From position 0 (a whole prompt, or the first chunk of a long one), buckets FRESH_BUCKETS: attention is causal
  over the prompt's own keys (the SDPA path of `paged_attention_mixed`), so real rows never see the padding.
- After position s > 0 (a cached prefix: the next turn of a chat; a later chunk), buckets CHUNK_BUCKETS x
  CONTEXT_BUCKETS (keys s + n <= the context bucket): `paged_attention.one_sequence_attention` reads the keys of
  every position of the context bucket back from the cache, those at or past s + n zeroed and masked.

Not served here (the eager path, logged once by the runner): several sequences, one token (the decode graphs),
chunks or contexts past the largest bucket, whole prompts longer than a sliding window (a masked path that
builds its mask on the host) and models with attention soft-capping (no SDPA path).
"""

from __future__ import annotations

import array
import logging

import torch

from athena_runtime.batch import AttentionMetadata, SequenceChunk
from athena_runtime.format.config import ModelConfig
from athena_runtime.graph_capture import CapturedGraph, capture_graph
from athena_runtime.kv_cache import KVCache

log = logging.getLogger(__name__)

FRESH_BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512)
CHUNK_BUCKETS = (32, 64, 128, 256, 512)
CONTEXT_BUCKETS = (512, 1024, 2048, 4096)


def usable_buckets(config: ModelConfig, max_model_len: int) -> tuple[list[tuple[int, int]], str]:
    """The (tokens, context) buckets a model can replay (context 0: a whole prompt), and why others cannot."""
    if config.attn_softcap is not None:
        return [], "attention soft-capping has no SDPA path"
    windows = [w for w in (config.window(i) for i in range(config.num_layers)) if w is not None]
    limit = min([max_model_len] + windows)
    keys = [(b, 0) for b in FRESH_BUCKETS if b <= limit]
    why = "" if len(keys) == len(FRESH_BUCKETS) else f"whole prompts above {limit} tokens (max_model_len / window)"
    contexts = [c for c in CONTEXT_BUCKETS if c < max_model_len]
    contexts += [c for c in CONTEXT_BUCKETS if c >= max_model_len][:1]  # the one that covers max_model_len
    keys += [(b, c) for c in contexts for b in CHUNK_BUCKETS if b < c]
    return keys, why


class PrefillGraphs:
    """Static buffers, bucket choice, capture and replay of the one-sequence prefill graphs."""

    def __init__(self, model, config: ModelConfig, kv_cache: KVCache, device, max_model_len: int, pool):
        self.model, self.kv_cache, self.device = model, kv_cache, torch.device(device)
        self.keys, self.why_not_all = usable_buckets(config, max_model_len)
        self.fresh = sorted(b for b, c in self.keys if c == 0)
        self.chunks = sorted({b for b, c in self.keys if c})
        self.contexts = sorted({c for _, c in self.keys if c})
        self._pool = pool  # () -> the memory pool shared with the decode graphs
        self.graphs: dict[tuple[int, int], CapturedGraph] = {}
        top = max([b for b, _ in self.keys], default=1)
        bs = kv_cache.block_size
        width = max([-(-top // bs)] + [-(-c // bs) for c in self.contexts])
        kw = dict(device=self.device)
        self._ids = torch.zeros(top, dtype=torch.int64, **kw)
        self._positions = torch.zeros(top, dtype=torch.int64, **kw)
        self._slots = torch.zeros(top, dtype=torch.int64, **kw)
        self._tables = torch.full((1, width), kv_cache.null_block, dtype=torch.int32, **kw)
        self._kv_len = torch.zeros(1, dtype=torch.int32, **kw)  # s + n: the real keys of a continued chunk
        self._last = torch.zeros(1, dtype=torch.int64, **kw)  # row n - 1
        self._lens = {b: torch.tensor([b], dtype=torch.int32, **kw) for b in self.fresh}
        self._starts = {(b, c): torch.tensor([0, b], dtype=torch.int32, **kw) for b, c in self.keys}

    def bucket_for(self, chunks: list[SequenceChunk]) -> tuple[int, int] | None:
        """The (tokens, context) bucket that serves this step, or None (the eager path)."""
        if len(chunks) != 1 or len(chunks[0].token_ids) < 2:
            return None
        n, s = len(chunks[0].token_ids), chunks[0].start_pos
        if s == 0:
            return next(((b, 0) for b in self.fresh if b >= n), None)
        b = next((b for b in self.chunks if b >= n), None)
        return next(((b, c) for c in self.contexts if c >= s + n and (b, c) in self._starts), None)

    def fill(self, chunk: SequenceChunk | None, key: tuple[int, int]) -> None:
        """Copy one chunk into the static buffers (None: every row padding, for warm-up and capture)."""
        bs, null = self.kv_cache.block_size, self.kv_cache.null_block
        b, c = key
        tokens, s = ([], 0) if chunk is None else (chunk.token_ids, chunk.start_pos)
        n, width = len(tokens), -(-(c or b) // bs)
        table = [] if chunk is None else chunk.block_table[: -(-(s + n) // bs)]
        flat = list(tokens) + [0] * (b - n)  # ids
        flat += range(s, s + b)  # positions
        flat += [table[p // bs] * bs + p % bs for p in range(s, s + n)] + [null * bs] * (b - n)  # slots
        flat += table + [null] * (width - len(table))  # block table
        flat += [s + n, max(n - 1, 0)]  # keys, last row
        host = torch.frombuffer(array.array("q", flat), dtype=torch.int64)
        self._ids[:b].copy_(host[:b], non_blocking=True)
        self._positions[:b].copy_(host[b : 2 * b], non_blocking=True)
        self._slots[:b].copy_(host[2 * b : 3 * b], non_blocking=True)
        self._tables[0, :width].copy_(host[3 * b : 3 * b + width].to(torch.int32), non_blocking=True)
        self._kv_len.copy_(host[-2:-1].to(torch.int32), non_blocking=True)
        self._last.copy_(host[-1:], non_blocking=True)

    def forward(self, key: tuple[int, int]) -> torch.Tensor:
        """The padded chunk's forward over the static buffers -> float32 logits [1, vocab] of row n - 1."""
        b, c = key
        bs = self.kv_cache.block_size
        common = dict(kv_cache=self.kv_cache, slot_mapping=self._slots[:b], positions=self._positions[:b])
        if c:  # after a cached prefix: keys read back from the cache, graph-safe
            attn = AttentionMetadata(
                **common,
                block_tables=self._tables[:, : -(-c // bs)],
                seq_lens=self._kv_len,
                query_start_loc=self._starts[key],
                is_decode=False,
                one_sequence=True,
            )
        else:  # a whole prompt: SDPA over its own keys; the host lists are the bucket's
            attn = AttentionMetadata(
                **common,
                block_tables=self._tables[:, : -(-b // bs)],
                seq_lens=self._lens[b],
                query_start_loc=self._starts[key],
                is_decode=False,
                seq_lens_list=[b],
                query_start_list=[0, b],
            )
        hidden = self.model(self._ids[:b], self._positions[:b], attn)
        return self.model.compute_logits(hidden.index_select(0, self._last)).float()

    def capture(self, key: tuple[int, int]) -> None:
        self.fill(None, key)  # warm-up and capture write only to the null block
        self.graphs[key] = capture_graph(lambda: self.forward(key), self.device, self._pool())

    def replay(self, chunk: SequenceChunk, key: tuple[int, int]) -> torch.Tensor:
        if key not in self.graphs:
            self.capture(key)
        self.fill(chunk, key)
        entry = self.graphs[key]
        entry.graph.replay()
        return entry.logits.clone()
