"""The model runner: what the engine calls once per step.

`execute(chunks)` flattens the chunks into one token batch, runs the decoder over the paged KV cache
and returns float32 logits of each chunk's last token. On CUDA, decode-only batches (one token per
chunk) replay a CUDA graph captured for the batch-size bucket (1, 2, 4, ... padded up); padded rows
feed token 0 at position 0, write to the cache's null block and attend to nothing. A step that feeds
one sequence (a whole prompt up to 512 tokens, or a chunk after a cached prefix) replays a graph of its
token-count (and context) bucket (`prefill_graphs.py`). Everything else (mixed batches, CPU) runs eagerly.
"""

from __future__ import annotations

import array
import logging
import time

import torch

from athena_runtime.batch import AttentionMetadata, SequenceChunk, check_chunks, prepare_batch
from athena_runtime.device_defaults import device_defaults
from athena_runtime.format.config import ModelConfig
from athena_runtime.graph_capture import CapturedGraph, capture_graph
from athena_runtime.kernels import paged_attention
from athena_runtime.kv_cache import KVCache, blocks_for_budget
from athena_runtime.kv_calibration import calibrate_key_basis, calibration_windows
from athena_runtime.loader import load_model
from athena_runtime.model import CausalLM
from athena_runtime.prefill_graphs import PrefillGraphs

log = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        config: ModelConfig,
        kv_cache: KVCache,
        device,
        use_cuda_graphs: bool = True,
        max_model_len: int | None = None,
        max_graph_batch: int = 128,
    ):
        self.model, self.config, self.kv_cache = model, config, kv_cache
        self.device = torch.device(device)
        self.block_size, self.num_blocks = kv_cache.block_size, kv_cache.num_blocks
        self.max_model_len = min(max_model_len or config.max_position_embeddings, self.num_blocks * self.block_size)
        self._logged: set[str] = set()
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        if self.use_cuda_graphs and paged_attention.triton is None:
            log.warning("CUDA graphs disabled: Triton is missing, decode runs the eager SDPA path")
            self.use_cuda_graphs = False
        self.graph_buckets = tuple(b for b in GRAPH_BUCKETS if b <= max_graph_batch)
        self._graphs: dict[int, CapturedGraph] = {}
        self.prefill_graphs: PrefillGraphs | None = None
        if self.use_cuda_graphs:
            self._init_graph_buffers()
            self.prefill_graphs = PrefillGraphs(
                model, config, kv_cache, self.device, self.max_model_len, self._graph_pool
            )
        log.info(
            "model runner: %s, %s, max_model_len %d, CUDA graphs %s",
            self.device,
            kv_cache,
            self.max_model_len,
            self._graphs_summary(),
        )

    def _graphs_summary(self) -> str:
        if not self.use_cuda_graphs:
            return "off"
        pg = self.prefill_graphs
        prefill = "; ".join(
            ([f"whole prompts up to {pg.fresh[-1]} tokens"] if pg.fresh else [])
            + (
                [f"chunks up to {pg.chunks[-1]} tokens after a prefix, up to {pg.contexts[-1]} in all"]
                if pg.chunks
                else []
            )
        )
        return f"on (decode; {prefill or 'no prefill'}{'; not ' + pg.why_not_all if pg.why_not_all else ''})"

    @classmethod
    def from_path(
        cls,
        path,
        kv_format: str = "fp16",
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_budget_bytes: int | None = None,
        device=None,
        max_model_len: int | None = None,
        *,
        kv_hadamard: bool = False,
        kv_group_size: int | None = None,
        dtype: torch.dtype | None = None,
        use_cuda_graphs: bool = True,
        cpu_path=None,
    ) -> "ModelRunner":
        """Load a model folder and size its KV cache: `num_blocks`, else `kv_budget_bytes`, else (CUDA)
        the free memory after loading less a reserve, or (CPU) 1 GiB. dtype: fp16 on CUDA, fp32 on CPU.
        A format that needs a key basis (int4) is calibrated here, on the folder's tokenizer
        (kv_calibration.py). On the CPU, `cpu_path` (a `cpu_path.CPUPathSettings`, default: from the
        ATHENA_CPU_* environment) picks the reference or the fast path and the thread count (logged)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        model, config = load_model(path, device, dtype, max_len=max_model_len)
        if device.type == "cpu":
            from athena_runtime.cpu import path as cpu

            cpu.apply(model, cpu_path or cpu.CPUPathSettings.from_env())
        if num_blocks is None:
            if kv_budget_bytes is None:
                defaults = device_defaults(device.type)
                kv_budget_bytes = defaults.kv_budget_bytes
                if kv_budget_bytes is None:
                    free, _ = torch.cuda.mem_get_info(device)
                    kv_budget_bytes = max(0, int(0.9 * free) - defaults.kv_reserve_bytes)
                log.info("KV cache budget %.2f GiB (%s default)", kv_budget_bytes / 2**30, device.type)
            num_blocks = blocks_for_budget(
                kv_budget_bytes,
                kv_format,
                config.num_layers,
                block_size,
                config.num_kv_heads,
                config.head_dim,
                kv_group_size,
            )
            if num_blocks < 1:
                raise ValueError(f"KV cache budget of {kv_budget_bytes} bytes holds no block of {block_size} tokens")
        kv_cache = KVCache.create(
            kv_format,
            config.num_layers,
            num_blocks,
            block_size,
            config.num_kv_heads,
            config.head_dim,
            device,
            hadamard=kv_hadamard,
            group_size=kv_group_size,
        )
        if kv_cache.needs_key_basis:
            from athena_runtime.format.source import load_tokenizer

            windows = calibration_windows(load_tokenizer(path), max_model_len or config.max_position_embeddings)
            kv_cache.set_key_basis(calibrate_key_basis(model, config, windows, device, dtype))
        return cls(model, config, kv_cache, device, use_cuda_graphs=use_cuda_graphs, max_model_len=max_model_len)

    def _log_once(self, key: str, msg: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.info(msg, *args)

    @torch.inference_mode()
    def execute(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """float32 logits [len(chunks), vocab] of each chunk's last token."""
        check_chunks(chunks, self.block_size, self.num_blocks)
        if self.use_cuda_graphs and all(len(c.token_ids) == 1 for c in chunks):
            if len(chunks) <= self.graph_buckets[-1] and all(c.start_pos < self.max_model_len for c in chunks):
                self._log_once("graph", "decode batches: CUDA graph replay")
                return self._replay(chunks)
            self._log_once("graph-miss", "decode batch too large or too long for the CUDA graphs: eager")
        elif self.prefill_graphs is not None and (key := self.prefill_graphs.bucket_for(chunks)) is not None:
            self._log_once(
                "prefill-graph" + str(bool(key[1])),
                "one-sequence prefill: CUDA graph replay (%s)",
                "after a cached prefix" if key[1] else "a whole prompt",
            )
            return self.prefill_graphs.replay(chunks[0], key)
        self._log_once(
            "eager",
            "eager forward on %s (%s)",
            self.device,
            "prefill and mixed batches" if self.use_cuda_graphs else "CUDA graphs off",
        )
        batch = prepare_batch(chunks, self.kv_cache, self.device)
        hidden = self.model(batch.input_ids, batch.positions, batch.attn)  # [T, hidden]
        return self.model.compute_logits(hidden[batch.logits_indices]).float()

    # --- CUDA graphs ----------------------------------------------------------------------------
    def _init_graph_buffers(self) -> None:
        max_batch = self.graph_buckets[-1]
        width = -(-self.max_model_len // self.block_size)
        kw = dict(device=self.device)
        self._ids = torch.zeros(max_batch, dtype=torch.int64, **kw)
        self._positions = torch.zeros(max_batch, dtype=torch.int64, **kw)
        self._slots = torch.zeros(max_batch, dtype=torch.int64, **kw)
        self._tables = torch.full((max_batch, width), self.kv_cache.null_block, dtype=torch.int32, **kw)
        self._seq_lens = torch.zeros(max_batch, dtype=torch.int32, **kw)
        self._query_start = torch.arange(max_batch + 1, dtype=torch.int32, **kw)
        self._pool = None  # one memory pool shared by all captured graphs (decode and prefill)

    def _graph_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _bucket(self, n: int) -> int:
        return next(b for b in self.graph_buckets if b >= n)

    def _graph_forward(self, bucket: int) -> torch.Tensor:
        attn = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=self._slots[:bucket],
            positions=self._positions[:bucket],
            block_tables=self._tables[:bucket],
            seq_lens=self._seq_lens[:bucket],
            query_start_loc=self._query_start[: bucket + 1],
            is_decode=True,
        )
        hidden = self.model(self._ids[:bucket], self._positions[:bucket], attn)
        return self.model.compute_logits(hidden).float()

    def _capture(self, bucket: int) -> CapturedGraph:
        self._fill([], bucket)  # all rows padding: warm-up and capture write only to the null block
        entry = capture_graph(lambda: self._graph_forward(bucket), self.device, self._graph_pool())
        log.info("captured the decode CUDA graph for batch size %d", bucket)
        return entry

    def _fill(self, chunks: list[SequenceChunk], bucket: int) -> None:
        """Copy the batch into the static buffers; rows past len(chunks) become padding.

        Only the first `width` block-table columns are refreshed: the kernel never reads a column at
        or past cdiv(seq_len, block_size), so older entries further right are harmless. Everything
        goes through one host tensor, built from one list (through `array`: torch.tensor(list) costs
        ~100 ns an element), and copies that do not wait for the GPU."""
        n, bs, null = len(chunks), self.block_size, self.kv_cache.null_block
        pad = bucket - n
        pos = [c.start_pos for c in chunks]
        width = max(pos) // bs + 1 if chunks else 1
        flat = [c.token_ids[0] for c in chunks] + [0] * pad  # ids
        flat += pos + [0] * pad  # positions
        flat += [c.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, pos)] + [null * bs] * pad  # slots
        flat += [p + 1 for p in pos] + [0] * pad  # seq_lens
        for c, p in zip(chunks, pos):  # tables
            flat += c.block_table[: p // bs + 1]
            flat += [null] * (width - p // bs - 1)
        flat += [null] * (width * pad)
        host = torch.frombuffer(array.array("q", flat), dtype=torch.int64)  # [4 * bucket + bucket * width]
        b = bucket
        self._ids[:b].copy_(host[:b], non_blocking=True)
        self._positions[:b].copy_(host[b : 2 * b], non_blocking=True)
        self._slots[:b].copy_(host[2 * b : 3 * b], non_blocking=True)
        self._seq_lens[:b].copy_(host[3 * b : 4 * b].to(torch.int32), non_blocking=True)
        self._tables[:b, :width].copy_(host[4 * b :].view(b, width).to(torch.int32), non_blocking=True)

    @torch.inference_mode()
    def capture_graphs(self, max_batch: int | None = None, prefill: bool = True) -> int:
        """Capture the decode graphs of every bucket up to `max_batch` now (a server's start-up), so no
        request pays a capture (~0.5-5 s per bucket on a 7B model) in the middle of its stream, and with
        `prefill` the lone-prompt prefill graphs of every token bucket.
        Returns how many were captured; a no-op without CUDA graphs."""
        if not self.use_cuda_graphs:
            return 0
        top = self.graph_buckets[-1] if max_batch is None else self._bucket(min(max_batch, self.graph_buckets[-1]))
        todo = [b for b in self.graph_buckets if b <= top and b not in self._graphs]
        t0 = time.perf_counter()
        for bucket in todo:
            self._graphs[bucket] = self._capture(bucket)
        pg = self.prefill_graphs
        todo_prefill = [k for k in pg.keys if k not in pg.graphs] if prefill else []
        for key in todo_prefill:
            pg.capture(key)
        if todo or todo_prefill:
            log.info(
                "captured %d decode CUDA graphs (batch sizes %s) and %d prefill graphs (tokens[/context] %s) in %.1f s",
                len(todo),
                ",".join(map(str, todo)) or "-",
                len(todo_prefill),
                ",".join(f"{b}/{c}" if c else str(b) for b, c in todo_prefill) or "-",
                time.perf_counter() - t0,
            )
        return len(todo) + len(todo_prefill)

    def _replay(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        bucket = self._bucket(len(chunks))
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        self._fill(chunks, bucket)
        entry = self._graphs[bucket]
        entry.graph.replay()
        return entry.logits[: len(chunks)].clone()
