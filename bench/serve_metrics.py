"""Serving-benchmark metrics: pure functions from per-request records to one level's summary.

Definitions (per successful request; times are seconds on one monotonic clock):

- TTFT  time to first token = first content chunk arrival - send time.
- E2E   end-to-end latency  = end of stream (`[DONE]` or close) - send time.
- TPOT  time per output token after the first = (E2E - TTFT) / (output tokens - 1); only requests
        with at least 2 output tokens have one.
- ITL   inter-token latency = every gap between consecutive content chunks (one value per gap, all
        requests pooled; a chunk that carries several tokens is still one gap).

Output tokens are the server's `usage.completion_tokens` when the stream carried usage, else the
number of content chunks. Throughputs divide totals of successful requests by the level's wall time.
Failed requests count only in `errors` (by kind) and in `failed`.
Percentiles use linear interpolation between closest ranks (numpy's default method).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import pairwise


@dataclass(frozen=True)
class RequestRecord:
    """What one request produced. `error` is None on success, else a kind such as `http_429`,
    `timeout`, `connection`, `bad_stream`, `stream_error`; `error_detail` is a short message."""

    send_s: float
    end_s: float
    chunk_times: tuple[float, ...] = ()
    prompt_tokens: int | None = None  # from the server's usage, when sent
    completion_tokens: int | None = None  # from the server's usage, when sent
    prompt_tokens_estimate: int = 0  # what the client aimed for (words of a random prompt)
    error: str | None = None
    error_detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)

    @property
    def input_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.prompt_tokens_estimate

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.send_s if self.chunk_times else None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.send_s

    @property
    def tpot_s(self) -> float | None:
        ttft = self.ttft_s
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - ttft) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in pairwise(self.chunk_times)]


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles of one metric, in milliseconds (None when there were no values)."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


@dataclass(frozen=True)
class LevelSummary:
    concurrency: int | None  # the level's concurrency cap (None in request-rate mode)
    request_rate: float | None  # the level's mean arrival rate in req/s (None in concurrency mode; inf allowed)
    requests: int  # requests that finished (completed + failed)
    completed: int
    failed: int
    unfinished: int  # requests not sent or cut off by the overall deadline (neither completed nor failed)
    errors: dict[str, int]
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    input_tokens_per_s: float
    total_input_tokens: int
    total_output_tokens: int
    token_counts_from: str  # "usage", "chunks", "mixed" or "none"
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    error_examples: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.request_rate is not None and math.isinf(self.request_rate):
            d["request_rate"] = "inf"  # JSON has no infinity
        return d


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of a non-empty list, interpolating linearly between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats_ms(values_s: list[float]) -> Stats:
    """Stats of durations given in seconds, reported in milliseconds."""
    if not values_s:
        return Stats(0, None, None, None, None)
    ms = [v * 1000.0 for v in values_s]
    return Stats(len(ms), sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99))


def count_errors(records: list[RequestRecord]) -> dict[str, int]:
    return dict(sorted(Counter(r.error for r in records if r.error is not None).items()))


def _token_source(ok: list[RequestRecord]) -> str:
    if not ok:
        return "none"
    with_usage = sum(r.completion_tokens is not None for r in ok)
    return "usage" if with_usage == len(ok) else "chunks" if with_usage == 0 else "mixed"


def summarize(
    records: list[RequestRecord],
    duration_s: float | None = None,
    *,
    concurrency: int | None = None,
    request_rate: float | None = None,
    unfinished: int = 0,
) -> LevelSummary:
    """One level's summary. `duration_s` is the level's wall time; by default the span from the
    first send to the last end among the records."""
    if duration_s is None:
        duration_s = (max(r.end_s for r in records) - min(r.send_s for r in records)) if records else 0.0
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    examples: dict[str, str] = {}
    for r in records:
        if r.error is not None and r.error not in examples:
            examples[r.error] = r.error_detail[:200]
    return LevelSummary(
        concurrency=concurrency,
        request_rate=request_rate,
        requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        unfinished=unfinished,
        errors=count_errors(records),
        duration_s=duration_s,
        requests_per_s=per_s(len(ok)),
        output_tokens_per_s=per_s(out_tokens),
        input_tokens_per_s=per_s(in_tokens),
        total_input_tokens=in_tokens,
        total_output_tokens=out_tokens,
        token_counts_from=_token_source(ok),
        ttft_ms=stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl_ms=stats_ms([g for r in ok for g in r.itl_s]),
        e2e_ms=stats_ms([r.e2e_s for r in ok]),
        error_examples=examples,
    )
