"""Engine settings: one frozen dataclass, mapped 1:1 to `athena serve` / `athena chat` flags."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KVFormat = Literal["fp16", "int8", "int4"]
KV_FORMATS: tuple[str, ...] = ("fp16", "int8", "int4")
# prompt tokens per step while other requests decode, when not set. CPU: on the embedded model's fp16 reference
# (2 cores) a 128-token chunk cost about three decode steps, no more than a 64-token one (both overhead-bound);
# 256 cost 5.5. CUDA: 512, vLLM's first chunked-prefill default (its best ITL/TTFT balance on an A100); not
# measured here.
PREFILL_CHUNK_DEFAULTS: dict[str, int] = {"cpu": 128, "cuda": 512}


@dataclass(frozen=True)
class EngineSettings:
    """How the engine batches, caches and runs.

    The KV cache holds `num_blocks` blocks of `block_size` tokens each. Give `num_blocks`, or
    `kv_budget_bytes` (the runner sizes the cache to it), or neither (the runner picks from the
    free device memory). `max_model_len=None` takes the model's own context length.

    A step feeds at most `max_num_batched_tokens` tokens: one per decoding request, then prompt
    chunks. While any request decodes, the prompt tokens of a step are capped at
    `prefill_chunk_tokens`, so a long prompt delays the others' next token by one such chunk.
    """

    kv_cache: KVFormat = "fp16"           # KV cache storage format
    kv_hadamard: bool = False             # rotate K and V by a Hadamard matrix before quantizing (int4 always does)
    block_size: int = 16                  # tokens per KV block
    max_num_seqs: int = 64                # sequences in one batch (running at once)
    max_model_len: int | None = None      # prompt + completion limit per request (None: the model's)
    max_num_batched_tokens: int = 2048    # tokens fed per step (decodes + prefill chunks)
    prefill_chunk_tokens: int | None = None  # prompt tokens per step while requests decode (None: by device)
    kv_budget_bytes: int | None = None    # bytes for the KV cache (alternative to num_blocks)
    num_blocks: int | None = None         # KV blocks (overrides kv_budget_bytes)
    max_queue: int = 256                  # waiting requests before new ones are refused (overload)
    device: str | None = None             # torch device (None: cuda if available, else cpu)
    use_cuda_graphs: bool = True          # replay decode steps as CUDA graphs (GPU only)
    prefix_cache: bool = True             # reuse the KV blocks of prompt prefixes computed before

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_FORMATS:
            raise ValueError(f"kv_cache must be one of {KV_FORMATS}, got {self.kv_cache!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every running sequence decodes each step)")
        if self.prefill_chunk_tokens is not None and not 1 <= self.prefill_chunk_tokens <= self.max_num_batched_tokens:
            raise ValueError(f"prefill_chunk_tokens must be in [1, max_num_batched_tokens={self.max_num_batched_tokens}]")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes < 1:
            raise ValueError("kv_budget_bytes must be >= 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")

    def prefill_chunk(self, device_type: str) -> int:
        """Prompt tokens a step feeds while other requests decode: the setting, else the device's default."""
        if self.prefill_chunk_tokens is not None:
            return self.prefill_chunk_tokens
        return min(PREFILL_CHUNK_DEFAULTS.get(device_type, PREFILL_CHUNK_DEFAULTS["cpu"]), self.max_num_batched_tokens)
