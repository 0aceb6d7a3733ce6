"""Per-request generation settings, shared by the engine and the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from athena_runtime.token_masks import ConstraintFactory

MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler. Defaults follow the OpenAI API.

    temperature == 0 means greedy. top_k <= 0 disables top-k; min_p == 0 disables min-p.
    logprobs: None = off, otherwise the number of top alternatives (0..20) returned per token.
    logit_bias: (token id, bias in [-100, 100]) pairs added to the logits before sampling (OpenAI).
    constraint: a grammar (e.g. `athena_runtime.grammar.Grammar`) that gives each sequence of the
    request its own token constraint; the sequence ends when the grammar is complete.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    constraint: "ConstraintFactory | None" = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")
        if any(not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS or token_id < 0 for token_id, bias in self.logit_bias):
            raise ValueError(
                f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] for token ids >= 0"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
