"""What the engine streams back per request: one `RequestOutput` per step that produced text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one sampled token, with the `top` most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """An increment of one request's output.

    `text` is the new text since the previous output (stop-string candidates are held back until
    they can no longer match); `token_ids` are the tokens sampled since then. The last output of a
    request has `finished=True` and a `finish_reason`.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics and /health."""

    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    preemptions_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache at admission
    prefix_cache_hits_total: int = 0  # of those, tokens whose KV blocks were cached
