"""Engine settings: one frozen dataclass, mapped 1:1 to `athena serve` / `athena chat` flags.

Each field is declared here once, with its help text and lower bound (`setting`); the server's settings
(server/settings.py) are built from these fields, so a new engine setting is a flag and an ATHENA_* variable at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from athena_runtime.device_defaults import device_defaults

KVFormat = Literal["fp16", "int8", "int4"]
KV_FORMATS: tuple[str, ...] = ("fp16", "int8", "int4")


def setting(default: Any, help: str, ge: int | None = None) -> Any:
    """A field with its help text (the `athena serve` flag's and the ATHENA_* variable's) and lower bound."""
    return field(default=default, metadata={"help": help, "ge": ge})


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

    kv_cache: KVFormat = setting("fp16", "KV cache format")
    kv_hadamard: bool = setting(False, "Hadamard-rotate K and V before quantizing (int4 always does)")
    block_size: int = setting(16, "tokens per KV block", ge=1)
    max_num_seqs: int = setting(64, "requests decoded together in one batch", ge=1)
    max_model_len: int | None = setting(None, "prompt + completion token limit (default: the model's)", ge=1)
    max_num_batched_tokens: int = setting(2048, "tokens fed to the model per step (decodes + prompt chunks)", ge=1)
    prefill_chunk_tokens: int | None = setting(
        None,
        "prompt tokens per step while requests decode: a long prompt delays their streams by one such chunk a "
        "step (default: 128 on CPU, 2048 on CUDA: device_defaults.py)",
        ge=1,
    )
    kv_budget_bytes: int | None = setting(None, "bytes for the KV cache (alternative to --num-blocks)", ge=1)
    num_blocks: int | None = setting(None, "KV blocks (overrides --kv-budget-bytes)", ge=1)
    max_queue: int = setting(256, "waiting requests before new ones are refused (429)", ge=0)
    device: str | None = setting(None, "torch device (default: cuda if available, else cpu)")
    use_cuda_graphs: bool = setting(True, "replay decode steps and one-sequence prefills as CUDA graphs (GPU only)")
    prefix_cache: bool = setting(
        True,
        "reuse the KV cache blocks of prompt prefixes computed before (shared system prompts, earlier turns of "
        "a chat); --no-prefix-cache turns it off",
    )

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_FORMATS:
            raise ValueError(f"kv_cache must be one of {KV_FORMATS}, got {self.kv_cache!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                "max_num_batched_tokens must be >= max_num_seqs (every running sequence decodes each step)"
            )
        if self.prefill_chunk_tokens is not None and not 1 <= self.prefill_chunk_tokens <= self.max_num_batched_tokens:
            raise ValueError(
                f"prefill_chunk_tokens must be in [1, max_num_batched_tokens={self.max_num_batched_tokens}]"
            )
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
        return min(device_defaults(device_type).prefill_chunk_tokens, self.max_num_batched_tokens)
