"""One request's state inside the engine: its tokens, its KV blocks, how far the cache has got."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

from athena_runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from athena_runtime.stop_strings import TextStream
    from athena_runtime.token_masks import TokenConstraint


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to recompute)
    RUNNING = "running"  # admitted: holds KV blocks for all its tokens
    FINISHED = "finished"


class Sequence:
    """A request's tokens and cache state.

    Invariant: the KV cache holds the first `num_computed` of `token_ids`. A step feeds
    `token_ids[num_computed:num_computed + n]`; when that reaches the last token, the logits
    give the next token. So a decode is a 1-token chunk, and a preempted sequence (cache
    dropped, `num_computed = 0`) recomputes prompt + generated tokens the same way a prompt
    is prefilled.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.arrival = arrival  # FCFS order
        self.generator = generator  # per-request RNG (seeded sampling)
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # prefix-cache keys of its full blocks, computed as needed
        self.num_computed = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stream: TextStream | None = None  # detokenizer + stop strings, set by the engine
        # the grammar state of a constrained request (params.constraint.new()), set by the engine
        self.constraint: TokenConstraint | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def next_chunk(self, n: int) -> list[int]:
        start = self.num_computed
        if start < len(self.prompt_token_ids):
            return self.token_ids[start : start + n]
        out_start = start - len(self.prompt_token_ids)
        return self.output_token_ids[out_start : out_start + n]

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed}, blocks={len(self.block_table)})"
        )
