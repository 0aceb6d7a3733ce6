"""Batched per-request sampling: penalties, temperature, top-k / top-p / min-p, seeds, logprobs.

Order per row (one row = one request):
1. logprobs are taken from the raw model logits (log-softmax before any penalty or temperature,
   as vLLM does by default): they describe the model, not the sampling settings;
2. repetition_penalty (Hugging Face semantics) over prompt + generated tokens: a seen token's
   logit l becomes l / p if l > 0, else l * p;
3. presence / frequency penalties (OpenAI semantics) over generated tokens only:
   l -= frequency_penalty * count + presence_penalty * (count > 0);
4. temperature 0: argmax. Otherwise l / T, then top-k, top-p (smallest set whose probability
   reaches top_p), min-p (drop p < min_p * max p), renormalize, and draw by inverse CDF over the
   probabilities sorted descending with ONE uniform number from the request's own generator.
   Every row is computed by row-wise ops only, so a seeded request draws the same tokens whatever
   else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from athena_runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs of one request."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None   # CPU generator; None draws from torch's default RNG


@dataclass(frozen=True)
class Sample:
    token_id: int
    logprob: float | None = None                       # raw-model logprob of token_id (if asked)
    top: tuple[tuple[int, float], ...] = ()            # (token_id, logprob), most likely first


def _token_matrix(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Pad token lists into [B, L] with the out-of-vocab index `vocab`."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), vocab, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device)


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Repetition, presence and frequency penalties on logits [B, V] (never modified in place)."""
    B, V = logits.shape
    dev = logits.device
    if any(r.params.repetition_penalty != 1.0 for r in rows):   # decided on the host: no device sync
        rep = torch.tensor([r.params.repetition_penalty for r in rows], dtype=logits.dtype, device=dev)
        ids = _token_matrix([r.prompt_token_ids + r.output_token_ids for r in rows], V, dev)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=dev).scatter_(1, ids, True)[:, :V]
        p = rep[:, None].expand(B, V)
        penalized = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(seen, penalized, logits)
    if any(r.params.frequency_penalty or r.params.presence_penalty for r in rows):
        freq = torch.tensor([r.params.frequency_penalty for r in rows], dtype=logits.dtype, device=dev)
        pres = torch.tensor([r.params.presence_penalty for r in rows], dtype=logits.dtype, device=dev)
        ids = _token_matrix([r.output_token_ids for r in rows], V, dev)
        counts = torch.zeros(B, V + 1, dtype=logits.dtype, device=dev)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
        counts = counts[:, :V]
        logits = logits - (freq[:, None] * counts + pres[:, None] * (counts > 0).to(logits.dtype))
    return logits


def _filtered_sorted_probs(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p, min-p. Returns (probs [B, V] sorted descending, their token ids)."""
    B, V = logits.shape
    dev = logits.device
    temp = torch.tensor([r.params.temperature or 1.0 for r in rows], dtype=torch.float32, device=dev)
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else V for r in rows], device=dev)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float32, device=dev)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=torch.float32, device=dev)
    sorted_logits, sorted_ids = torch.sort(logits.float() / temp[:, None], dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    rank = torch.arange(V, device=dev)[None, :]
    drop = rank >= top_k[:, None]                                       # top-k
    drop |= ((torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)  # top-p
    drop |= probs < min_p[:, None] * probs[:, :1]                       # min-p
    drop[:, 0] = False                                                  # the most likely token always stays
    return probs.masked_fill(drop, 0.0), sorted_ids


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[Sample]:
        """logits: float [B, V], one row per entry of `rows`; returns one Sample per row."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(rows)} requests")
        if not rows:
            return []
        logits = logits.float()
        processed = apply_penalties(logits, rows)
        token_ids = processed.argmax(dim=-1)
        if not all(r.params.greedy for r in rows):
            greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
            probs, sorted_ids = _filtered_sorted_probs(processed, rows)
            # one uniform per sampled row, from that request's generator (greedy rows draw nothing)
            u = torch.tensor([0.0 if r.params.greedy else torch.rand((), generator=r.generator, dtype=torch.float64).item()
                              for r in rows], dtype=torch.float64, device=logits.device)
            cdf = torch.cumsum(probs.double(), dim=-1)
            pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[-1] - 1)
            token_ids = torch.where(greedy, token_ids, sorted_ids.gather(1, pos).squeeze(1))
        return self._with_logprobs(logits, token_ids.tolist(), rows)

    @staticmethod
    def _with_logprobs(raw_logits: torch.Tensor, token_ids: list[int], rows: list[SampleRow]) -> list[Sample]:
        """Raw-model logprobs of the chosen tokens (+ top alternatives) for the rows that ask."""
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        samples = [Sample(t) for t in token_ids]
        if not want:
            return samples
        logprobs = torch.log_softmax(raw_logits[want], dim=-1)                          # [W, V]
        chosen = logprobs.gather(1, torch.tensor([[token_ids[i]] for i in want], device=logprobs.device))
        num_top = max(rows[i].params.logprobs for i in want)
        top_values, top_ids = torch.topk(logprobs, num_top, dim=-1) if num_top else (logprobs[:, :0], logprobs[:, :0])
        chosen, top_values, top_ids = chosen[:, 0].tolist(), top_values.tolist(), top_ids.long().tolist()
        for j, i in enumerate(want):
            n = rows[i].params.logprobs
            samples[i] = Sample(token_ids[i], chosen[j], tuple(zip(top_ids[j][:n], top_values[j][:n])))
        return samples
