"""CUDA graphs for the prefill of a lone prompt (time to first token).

A prefill step launches ~50 kernels per layer (a 7B prompt of 170 tokens: 1,525 launches); issued from Python
they take 60-100 ms of host time for ~22 ms of GPU work on an H100 (BENCHMARKS.md §7). A step that feeds ONE
sequence from position 0 (a whole prompt, or the first chunk of a long one) replays a graph captured for its
token-count bucket instead: the n tokens are padded to the bucket b >= n with token 0 at positions n .. b-1,
written to the cache's null block. Attention over a whole prompt is causal over its own keys (the SDPA path of
`paged_attention_mixed`), so the real rows never see the padding; the logits are those of row n - 1.

Not served here (the eager path, logged once by the runner): several sequences, continued chunks (a cached
prefix or a later chunk: their keys come from the cache), prompts longer than the largest bucket, buckets
longer than a sliding window (those prompts take a masked path that builds its mask on the host) and models
with attention soft-capping (no SDPA path).
"""

from __future__ import annotations

import array
import logging
from dataclasses import dataclass

import torch

from athena_runtime.batch import AttentionMetadata, SequenceChunk
from athena_runtime.format.config import ModelConfig
from athena_runtime.kv_cache import KVCache

log = logging.getLogger(__name__)

PREFILL_BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    logits: torch.Tensor  # [1, vocab] float32, written by each replay


def usable_buckets(config: ModelConfig, max_model_len: int, buckets=PREFILL_BUCKETS) -> tuple[tuple[int, ...], str]:
    """The buckets a model can replay, and why the others cannot ("" when all can)."""
    if config.attn_softcap is not None:
        return (), "attention soft-capping has no SDPA path"
    windows = [w for w in (config.window(i) for i in range(config.num_layers)) if w is not None]
    limit = min([max_model_len] + windows)
    kept = tuple(b for b in buckets if b <= limit)
    why = "" if len(kept) == len(buckets) else f"buckets above {limit} tokens (max_model_len / sliding window)"
    return kept, why


class PrefillGraphs:
    """Static buffers, bucket choice, capture and replay of the lone-prompt prefill graphs."""

    def __init__(self, model, config: ModelConfig, kv_cache: KVCache, device, max_model_len: int, pool):
        self.model, self.kv_cache, self.device = model, kv_cache, torch.device(device)
        self.buckets, self.why_not_all = usable_buckets(config, max_model_len)
        self._pool = pool  # () -> the memory pool shared with the decode graphs
        self.graphs: dict[int, _Graph] = {}
        top = self.buckets[-1] if self.buckets else 1
        bs = kv_cache.block_size
        kw = dict(device=self.device)
        self._ids = torch.zeros(top, dtype=torch.int64, **kw)
        self._positions = torch.arange(top, dtype=torch.int64, **kw)  # a whole prompt: always 0 .. b - 1
        self._slots = torch.zeros(top, dtype=torch.int64, **kw)
        self._tables = torch.full((1, -(-top // bs)), kv_cache.null_block, dtype=torch.int32, **kw)
        self._last = torch.zeros(1, dtype=torch.int64, **kw)  # row n - 1
        self._lens = {b: torch.tensor([b], dtype=torch.int32, **kw) for b in self.buckets}
        self._starts = {b: torch.tensor([0, b], dtype=torch.int32, **kw) for b in self.buckets}

    def bucket_for(self, chunks: list[SequenceChunk]) -> int | None:
        """The bucket that serves this step, or None (the eager path)."""
        if len(chunks) != 1 or chunks[0].start_pos != 0 or not self.buckets:
            return None
        n = len(chunks[0].token_ids)
        if n < 2 or n > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= n)

    def fill(self, chunk: SequenceChunk | None, bucket: int) -> None:
        """Copy one prompt into the static buffers (None: every row padding, for warm-up and capture)."""
        bs, null = self.kv_cache.block_size, self.kv_cache.null_block
        tokens = [] if chunk is None else chunk.token_ids
        n, width = len(tokens), -(-bucket // bs)
        table = [] if chunk is None else chunk.block_table[: -(-n // bs)]
        flat = list(tokens) + [0] * (bucket - n)  # ids
        flat += [table[p // bs] * bs + p % bs for p in range(n)] + [null * bs] * (bucket - n)  # slots
        flat += table + [null] * (width - len(table))  # the block table (read only by the CPU reference path)
        flat.append(max(n - 1, 0))
        host = torch.frombuffer(array.array("q", flat), dtype=torch.int64)
        b = bucket
        self._ids[:b].copy_(host[:b], non_blocking=True)
        self._slots[:b].copy_(host[b : 2 * b], non_blocking=True)
        self._tables[0, :width].copy_(host[2 * b : 2 * b + width].to(torch.int32), non_blocking=True)
        self._last.copy_(host[-1:], non_blocking=True)

    def forward(self, bucket: int) -> torch.Tensor:
        """The padded prompt's forward over the static buffers -> float32 logits [1, vocab] of row n - 1."""
        b = bucket
        attn = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=self._slots[:b],
            positions=self._positions[:b],
            block_tables=self._tables[:, : -(-b // self.kv_cache.block_size)],
            seq_lens=self._lens[b],
            query_start_loc=self._starts[b],
            is_decode=False,
            seq_lens_list=[b],
            query_start_list=[0, b],
        )
        hidden = self.model(self._ids[:b], self._positions[:b], attn)
        return self.model.compute_logits(hidden.index_select(0, self._last)).float()

    def capture(self, bucket: int) -> None:
        self.fill(None, bucket)  # warm-up and capture write only to the null block
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up (Triton compilation, cuBLAS handles) off the capture
            for _ in range(2):
                self.forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool()):
            logits = self.forward(bucket)
        self.graphs[bucket] = _Graph(graph, logits)

    def replay(self, chunk: SequenceChunk, bucket: int) -> torch.Tensor:
        if bucket not in self.graphs:
            self.capture(bucket)
        self.fill(chunk, bucket)
        entry = self.graphs[bucket]
        entry.graph.replay()
        return entry.logits.clone()
