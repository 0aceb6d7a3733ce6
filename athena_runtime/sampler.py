"""Batched per-request sampling: penalties, temperature, top-k / top-p / min-p, seeds, logprobs.

Order per row (one row = one request):
1. logprobs are taken from the raw model logits (log-softmax before any penalty or temperature,
   as vLLM does by default): they describe the model, not the sampling settings;
2. repetition_penalty (Hugging Face semantics) over prompt + generated tokens: a seen token's
   logit l becomes l / p if l > 0, else l * p;
3. presence / frequency penalties (OpenAI semantics) over generated tokens only:
   l -= frequency_penalty * count + presence_penalty * (count > 0);
3b. logit_bias (OpenAI): l[token] += bias;
3c. token constraint (grammar): disallowed tokens -> -inf (token_masks.py). The host fills the
   bitmask rows of the constrained rows first thing, before any device sync, so on a GPU the
   grammar work overlaps the forward pass; `prepare()` can start it on a worker thread before the
   forward pass instead (the engine does);
4. temperature 0: argmax. Otherwise l / T, then top-k, top-p (smallest set whose probability
   reaches top_p), min-p (drop p < min_p * max p), renormalize, and draw by inverse CDF over the
   probabilities sorted descending with ONE uniform number from the request's own generator.
   The draw is computed among the row's 256 most likely tokens wherever that gives the full sort's
   token (`_draw_among_candidates`; sorting a 49k vocabulary costs ~5.5 ms a row on a CPU core); the
   other rows are sorted whole. Every row is computed by row-wise ops only, so a seeded request draws
   the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import logging
import weakref
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from athena_runtime.sampling_params import SamplingParams
from athena_runtime.token_masks import (
    BitmaskBuffer,
    MaskPrefetch,
    TokenConstraint,
    apply_logit_bias,
    apply_token_bitmask,
    bitmask_words,
    fill_bitmasks,
)

log = logging.getLogger(__name__)

_UNIFORM_BLOCK = 64  # uniform numbers drawn at once from a request's generator
_CANDIDATES = 256  # most likely tokens a draw is tried among before sorting the whole vocabulary


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs of one request (the engine's `Sequence` has these five fields too and
    is passed as it is)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # CPU generator; None draws from torch's default RNG
    constraint: TokenConstraint | None = None  # grammar state: allowed next tokens


@dataclass(frozen=True)
class Sample:
    token_id: int
    logprob: float | None = None  # raw-model logprob of token_id (if asked)
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first


def _to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`, copied without waiting for the device (no sync)."""
    return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)


def _token_matrix(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Pad token lists into [B, L] with the out-of-vocab index `vocab`."""
    width = max(1, max(len(r) for r in rows))
    return _to_device([r + [vocab] * (width - len(r)) for r in rows], torch.long, device)


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Repetition, presence and frequency penalties on logits [B, V] (never modified in place)."""
    B, V = logits.shape
    dev = logits.device
    if any(r.params.repetition_penalty != 1.0 for r in rows):  # decided on the host: no device sync
        rep = _to_device([r.params.repetition_penalty for r in rows], logits.dtype, dev)
        ids = _token_matrix([r.prompt_token_ids + r.output_token_ids for r in rows], V, dev)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=dev).scatter_(1, ids, True)[:, :V]
        p = rep[:, None].expand(B, V)
        penalized = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(seen, penalized, logits)
    if any(r.params.frequency_penalty or r.params.presence_penalty for r in rows):
        freq = _to_device([r.params.frequency_penalty for r in rows], logits.dtype, dev)
        pres = _to_device([r.params.presence_penalty for r in rows], logits.dtype, dev)
        ids = _token_matrix([r.output_token_ids for r in rows], V, dev)
        counts = torch.zeros(B, V + 1, dtype=logits.dtype, device=dev)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
        counts = counts[:, :V]
        logits = logits - (freq[:, None] * counts + pres[:, None] * (counts > 0).to(logits.dtype))
    return logits


@dataclass(frozen=True)
class _Filters:
    """The per-row filters the batch uses, decided on the host: a tensor [B] only for a filter some row asks for
    (top_k: V where a row does not filter; top_p: 1; min_p: 0), so a batch without one runs none of its ops."""

    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    rows: list[bool]  # which rows filter at all

    @staticmethod
    def of(rows: list[SampleRow], vocab: int, device: torch.device) -> "_Filters":
        ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
        ps, ms = [r.params.top_p for r in rows], [r.params.min_p for r in rows]
        return _Filters(
            _to_device(ks, torch.long, device) if any(k < vocab for k in ks) else None,
            _to_device(ps, torch.float32, device) if any(p < 1.0 for p in ps) else None,
            _to_device(ms, torch.float32, device) if any(m > 0.0 for m in ms) else None,
            [k < vocab or p < 1.0 or m > 0.0 for k, p, m in zip(ks, ps, ms)],
        )

    def drop(self, probs: torch.Tensor) -> torch.Tensor | None:
        """Over probabilities sorted descending [B, W] (W <= V): the positions to drop (None: none)."""
        drop = None
        if self.top_k is not None:
            drop = torch.arange(probs.shape[-1], device=probs.device)[None, :] >= self.top_k[:, None]
        if self.top_p is not None:  # the smallest set whose probability reaches top_p (top_p 1: everything)
            cut = ((torch.cumsum(probs, dim=-1) - probs) >= self.top_p[:, None]) & (self.top_p[:, None] < 1.0)
            drop = cut if drop is None else drop | cut
        if self.min_p is not None:
            cut = probs < self.min_p[:, None] * probs[:, :1]
            drop = cut if drop is None else drop | cut
        if drop is not None:
            drop[:, 0] = False  # the most likely token always stays
        return drop


def _scaled(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """float32 logits / temperature (1 for greedy rows; no division when every row has 1)."""
    temps = [r.params.temperature or 1.0 for r in rows]
    if all(t == 1.0 for t in temps):
        return logits.float()
    return logits.float() / _to_device(temps, torch.float32, logits.device)[:, None]


def _filtered_sorted_probs(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p, min-p. Returns (probs [B, V] sorted descending, their token ids)."""
    sorted_logits, sorted_ids = torch.sort(_scaled(logits, rows), dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = _Filters.of(rows, logits.shape[1], logits.device).drop(probs)
    return (probs if drop is None else probs.masked_fill(drop, 0.0)), sorted_ids


def _any_penalty(params: list[SamplingParams]) -> bool:
    return any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params)


def _inverse_cdf(probs: torch.Tensor, sorted_ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token at the first position where the cumulative (kept) probability exceeds u x the total."""
    cdf = torch.cumsum(probs.double(), dim=-1)
    pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[-1] - 1)
    return sorted_ids.gather(1, pos).squeeze(1)


def _draw_among_candidates(
    logits: torch.Tensor, rows: list[SampleRow], u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_filtered_sorted_probs` then `_inverse_cdf`, computed over a row's `_CANDIDATES` most likely tokens
    only where that gives the same token: sorting the whole vocabulary costs ~5.5 ms a row on a CPU core
    (49,152 ids), taking the top candidates ~0.3 ms. Returns (token ids [B], covered [B] bool). A row with a
    filter is covered when every token the filter keeps is a candidate (top-k within the candidates, top-p
    reached within them, or min-p cutting above the last one); a row without one when its draw lands within
    the candidates' share of the whole probability. Rows not covered must be drawn by the full sort. Ties
    among the candidates are ordered by token id, as the stable full sort orders them; a row whose last candidate
    ties with the first token left out is not covered. Row-wise only."""
    B, V = logits.shape
    dev = logits.device
    scaled = _scaled(logits, rows)
    K = min(V, _CANDIDATES)
    values, ids = torch.topk(scaled, min(V, K + 1), dim=-1)
    # a run of equal values across the cut: topk picks its members arbitrarily, the stable sort by id
    split_tie = values[:, K - 1] == values[:, K] if V > K else None
    values, ids = values[:, :K], ids[:, :K]
    ids, by_id = ids.sort(dim=-1)
    ids = ids.gather(1, values.gather(1, by_id).sort(dim=-1, descending=True, stable=True).indices)
    whole_probs = torch.softmax(scaled, dim=-1)  # (torch's CPU logsumexp is ~40x slower than softmax)
    probs = whole_probs.gather(1, ids)  # each candidate's probability in the whole distribution
    filters = _Filters.of(rows, V, dev)
    drop = filters.drop(probs)
    cdf = torch.cumsum((probs if drop is None else probs.masked_fill(drop, 0.0)).double(), dim=-1)
    if not all(filters.rows):  # rows without a filter draw from the whole distribution
        unfiltered_total = whole_probs.sum(dim=-1, dtype=torch.float64)
    if any(filters.rows):
        kept_within = drop[:, -1].clone()  # the last candidate dropped: so is every later token
        if filters.top_k is not None:
            kept_within |= filters.top_k <= K
        if filters.top_p is not None:
            kept_within |= (filters.top_p < 1.0) & (torch.cumsum(probs.double(), dim=-1)[:, -1] >= filters.top_p)
        if filters.min_p is not None:
            kept_within |= probs[:, -1] < filters.min_p * probs[:, 0]
    if all(filters.rows):
        target = u * cdf[:, -1]
        covered = kept_within
    elif not any(filters.rows):
        target = u * unfiltered_total
        covered = target < cdf[:, -1]
    else:
        filtered = _to_device(filters.rows, torch.bool, dev)
        target = u * torch.where(filtered, cdf[:, -1], unfiltered_total)
        covered = torch.where(filtered, kept_within, target < cdf[:, -1])
    if split_tie is not None:
        covered &= ~split_tie | (probs[:, -1] == 0.0)  # a tied token of probability 0 is never drawn
    pos = torch.searchsorted(cdf, target[:, None], right=True).clamp_(max=K - 1)
    return ids.gather(1, pos).squeeze(1), covered


class RequestGenerator(torch.Generator):
    """A request's CPU generator. A Python subclass, so the sampler can key its pre-drawn numbers by
    a weak reference to it (a plain torch.Generator takes none in some torch versions)."""


class Sampler:
    """Samples one token per row. Draws from a row's generator are taken `_UNIFORM_BLOCK` at a time
    and handed out one per sampled token: the same numbers, in the same order, as one
    `torch.rand((), generator=g, dtype=torch.float64)` call per token (tested), without a torch call
    per row and step. So a generator given to the sampler must not be drawn from elsewhere. (A
    generator that takes no weak reference is drawn from once per token, as before.)"""

    def __init__(self) -> None:
        self._uniforms: weakref.WeakKeyDictionary[torch.Generator, list[float]] = weakref.WeakKeyDictionary()
        self._buffer = BitmaskBuffer()
        self._prefetch = MaskPrefetch()
        self._pending: tuple[list[TokenConstraint], torch.Tensor, Future] | None = None

    def prepare(self, rows: list[SampleRow]) -> None:
        """Start filling the masks of `rows`' constraints on a worker thread; the next call with the
        same constraints uses them. Call it before the forward pass that produces those rows' logits."""
        self._wait_pending()
        constraints = [r.constraint for r in rows if r.constraint is not None]
        if constraints:
            bitmask = self._buffer.rows(
                len(constraints), bitmask_words(constraints[0].vocab_size), torch.cuda.is_available()
            )
            self._pending = (constraints, bitmask, self._prefetch.start(constraints, bitmask))

    def _wait_pending(self) -> tuple[list[TokenConstraint], torch.Tensor] | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        constraints, bitmask, future = pending
        future.result()
        return constraints, bitmask

    def _bitmask(self, constraints: list[TokenConstraint], device: torch.device) -> torch.Tensor:
        """The constraints' bitmask rows [C, W] on the host, pinned for a CUDA `device` (prefetched if
        `prepare` saw the same ones); apply_token_bitmask copies them over without a sync."""
        prepared = self._wait_pending()
        if (
            prepared is not None
            and len(prepared[0]) == len(constraints)
            and all(a is b for a, b in zip(prepared[0], constraints))
        ):
            bitmask = prepared[1]
        else:
            if prepared is not None:
                log.warning("prefetched masks were for other sequences: filling them again")
            words = bitmask_words(constraints[0].vocab_size)
            if any(bitmask_words(c.vocab_size) != words for c in constraints):
                raise ValueError("token constraints of one batch cover different vocabularies")
            bitmask = self._buffer.rows(len(constraints), words, device.type == "cuda")
            fill_bitmasks(constraints, bitmask)
        return bitmask

    def _uniform(self, generator: torch.Generator | None) -> float:
        try:
            pending = self._uniforms.get(generator)
        except TypeError:  # None, or a torch.Generator this torch cannot weakly reference: no buffer
            return torch.rand((), generator=generator, dtype=torch.float64).item()
        if not pending:
            pending = torch.rand(_UNIFORM_BLOCK, generator=generator, dtype=torch.float64).tolist()[::-1]
            self._uniforms[generator] = pending
        return pending.pop()

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[Sample]:
        """logits: float [B, V], one row per entry of `rows`; returns one Sample per row.

        A row is anything with SampleRow's five fields (the engine passes its Sequences). Host work
        is done before the first device sync, and the common cases skip what they do not need: all
        rows greedy -> one argmax; no penalties -> no penalty ops; no logit_bias / constraint -> no
        mask ops (each skip leaves the values bit-identical); the whole vocabulary is sorted only for
        the rows whose draw needs it."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(rows)} requests")
        if not rows:
            self._wait_pending()
            return []
        constrained = [i for i, r in enumerate(rows) if r.constraint is not None]
        bitmask = self._bitmask([rows[i].constraint for i in constrained], logits.device) if constrained else None
        if bitmask is None:
            self._wait_pending()
        params = [r.params for r in rows]
        greedy = [p.temperature == 0.0 for p in params]
        logits = logits.float()
        processed = apply_penalties(logits, rows) if _any_penalty(params) else logits
        if any(p.logit_bias for p in params):
            processed = apply_logit_bias(processed, [p.logit_bias for p in params])
        if bitmask is not None:
            processed = apply_token_bitmask(processed, bitmask, constrained)
        if all(greedy):
            token_ids = processed.argmax(dim=-1)
        else:
            # one uniform per sampled row, from that request's generator (greedy rows draw nothing)
            uniform = self._uniform
            u = torch.tensor([0.0 if g else uniform(r.generator) for g, r in zip(greedy, rows)], dtype=torch.float64)
            u = u.to(logits.device, non_blocking=True)
            token_ids, covered = _draw_among_candidates(processed, rows, u)
            if any(greedy):
                is_greedy = _to_device(greedy, torch.bool, logits.device)
                token_ids = torch.where(is_greedy, processed.argmax(dim=-1), token_ids)
                covered = covered | is_greedy
            chosen, covered_rows = torch.stack((token_ids, covered.long())).tolist()  # the one device sync
            rest = [i for i, c in enumerate(covered_rows) if not c]
            if rest:  # rows whose draw needs the whole sorted vocabulary
                probs, sorted_ids = _filtered_sorted_probs(processed[rest], [rows[i] for i in rest])
                index = torch.tensor(rest, device=logits.device)
                for i, t in zip(rest, _inverse_cdf(probs, sorted_ids, u[index]).tolist()):
                    chosen[i] = t
            return self._with_logprobs(logits, chosen, rows)
        return self._with_logprobs(logits, token_ids.tolist(), rows)

    @staticmethod
    def _with_logprobs(raw_logits: torch.Tensor, token_ids: list[int], rows: list[SampleRow]) -> list[Sample]:
        """Raw-model logprobs of the chosen tokens (+ top alternatives) for the rows that ask."""
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        samples = [Sample(t) for t in token_ids]
        if not want:
            return samples
        logprobs = torch.log_softmax(raw_logits[want], dim=-1)  # [W, V]
        chosen = logprobs.gather(1, torch.tensor([[token_ids[i]] for i in want], device=logprobs.device))
        num_top = max(rows[i].params.logprobs for i in want)
        top_values, top_ids = torch.topk(logprobs, num_top, dim=-1) if num_top else (logprobs[:, :0], logprobs[:, :0])
        chosen, top_values, top_ids = chosen[:, 0].tolist(), top_values.tolist(), top_ids.long().tolist()
        for j, i in enumerate(want):
            n = rows[i].params.logprobs
            samples[i] = Sample(token_ids[i], chosen[j], tuple(zip(top_ids[j][:n], top_values[j][:n])))
        return samples
