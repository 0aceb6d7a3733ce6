"""Token masks and logit biases in the batched sampler: bit layout, mixed batches, bias semantics."""

from __future__ import annotations

import pytest
import torch

from athena_runtime.sampler import Sampler, SampleRow
from athena_runtime.sampling_params import SamplingParams
from athena_runtime.token_masks import (
    apply_logit_bias,
    apply_token_bitmask,
    bitmask_words,
    fill_bitmasks,
    pack_bitmask,
    unpack_bitmask,
)


def _reference_unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    out = torch.zeros(bitmask.shape[0], vocab, dtype=torch.bool)
    for r in range(bitmask.shape[0]):
        for t in range(min(vocab, 32 * bitmask.shape[1])):
            out[r, t] = bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1)
    return out


@pytest.mark.parametrize("vocab,words", [(1, 1), (31, 1), (32, 1), (33, 2), (100, 4), (100, 3), (70, 3)])
def test_unpack_matches_the_bit_layout_and_pack_inverts_it(vocab, words):
    g = torch.Generator().manual_seed(vocab * 7 + words)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=g)
    got = unpack_bitmask(bitmask, vocab)
    assert got.dtype == torch.bool and got.shape == (3, vocab)
    assert torch.equal(got, _reference_unpack(bitmask, vocab))  # past 32 * words: disallowed
    allowed = torch.rand(3, vocab, generator=g) < 0.5
    assert torch.equal(unpack_bitmask(pack_bitmask(allowed), vocab), allowed)
    assert pack_bitmask(allowed).shape == (3, bitmask_words(vocab))


def test_mask_touches_only_the_constrained_rows():
    logits = torch.randn(4, 40)
    allowed = torch.zeros(2, 40, dtype=torch.bool)
    allowed[0, [3, 7]] = True
    allowed[1, 39] = True
    out = apply_token_bitmask(logits, pack_bitmask(allowed), [1, 3])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.equal(torch.isfinite(out[1]), allowed[0]) and torch.equal(torch.isfinite(out[3]), allowed[1])
    assert torch.equal(out[1][allowed[0]], logits[1][allowed[0]])
    assert torch.isfinite(logits).all()  # the input is not modified


def test_logit_bias_adds_per_row():
    logits = torch.zeros(3, 10)
    out = apply_logit_bias(logits, [((2, 5.0), (9, -100.0)), (), ((0, 1.5),)])
    expected = torch.zeros(3, 10)
    expected[0, 2], expected[0, 9], expected[2, 0] = 5.0, -100.0, 1.5
    assert torch.equal(out, expected) and torch.equal(logits, torch.zeros(3, 10))


class AllowSet:
    """A TokenConstraint allowing a fixed set of tokens (a test double for the protocol)."""

    def __init__(self, allowed: set[int], vocab_size: int) -> None:
        self.allowed, self.vocab_size, self.accepted = allowed, vocab_size, []

    def accept(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        return token_id in self.allowed

    def is_finished(self) -> bool:
        return False

    @classmethod
    def fill_bitmasks(cls, constraints, bitmask):
        for i, c in enumerate(constraints):
            row = torch.zeros(c.vocab_size, dtype=torch.bool)
            row[list(c.allowed)] = True
            bitmask[i] = pack_bitmask(row)


class AllowFirst(AllowSet):
    """Another constraint class: allows only the smallest token of its set."""

    @classmethod
    def fill_bitmasks(cls, constraints, bitmask):
        for i, c in enumerate(constraints):
            row = torch.zeros(c.vocab_size, dtype=torch.bool)
            row[min(c.allowed)] = True
            bitmask[i] = pack_bitmask(row)


def test_fill_groups_rows_by_constraint_class():
    cs = [AllowSet({1, 2}, 40), AllowFirst({5, 6}, 40), AllowSet({33}, 40)]
    bitmask = torch.zeros(3, bitmask_words(40), dtype=torch.int32)
    fill_bitmasks(cs, bitmask)
    assert [set(r.nonzero().flatten().tolist()) for r in unpack_bitmask(bitmask, 40)] == [{1, 2}, {5}, {33}]


V = 64


def _rows(n_rows, constraints, seed=0, **params):
    return [
        SampleRow(SamplingParams(**params), [1], [], torch.Generator().manual_seed(seed + i), constraints[i])
        for i in range(n_rows)
    ]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("prefetch", [False, True])
def test_mixed_batch_constrained_rows_stay_in_their_set_and_free_rows_are_unchanged(temperature, prefetch):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)) * 3
    sets = [None, {5, 9, 60}, None, {63}]
    for step in range(30):
        constraints = [AllowSet(s, V) if s else None for s in sets]
        sampler = Sampler()
        rows = _rows(4, constraints, seed=step, temperature=temperature, top_p=0.9)
        if prefetch:
            sampler.prepare(rows)
        got = [s.token_id for s in sampler(logits, rows)]
        alone = [s.token_id for s in Sampler()(logits[[0, 2]], [rows[0], rows[2]])] if temperature == 0 else None
        free = _rows(4, [None] * 4, seed=step, temperature=temperature, top_p=0.9)
        unconstrained = [s.token_id for s in Sampler()(logits, free)]
        assert got[1] in sets[1] and got[3] == 63
        assert [got[0], got[2]] == [unconstrained[0], unconstrained[2]]  # seeded rows: same draws
        if alone is not None:
            assert [got[0], got[2]] == alone
    if temperature == 0:
        best = max(sets[1], key=lambda t: logits[1, t].item())
        assert got[1] == best  # greedy: argmax inside the set


def test_prefetched_masks_for_other_rows_are_refilled():
    logits = torch.randn(2, V)
    sampler = Sampler()
    sampler.prepare(_rows(1, [AllowSet({1}, V)]))
    rows = _rows(2, [AllowSet({7}, V), AllowSet({8}, V)], temperature=0.0)
    assert [s.token_id for s in sampler(logits, rows)] == [7, 8]


def test_logit_bias_bans_and_forces_tokens():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    top = logits.argmax(-1).tolist()
    rows = [
        SampleRow(SamplingParams(temperature=0.0, logit_bias=((top[0], -100.0),)), [1], []),
        SampleRow(SamplingParams(temperature=1.0, logit_bias=((11, 100.0),)), [1], [], torch.Generator()),
        SampleRow(SamplingParams(temperature=0.0), [1], []),
    ]
    for _ in range(20):
        got = [s.token_id for s in Sampler()(logits, rows)]
        assert got[0] != top[0] and got[1] == 11 and got[2] == top[2]


def test_logprobs_stay_the_models_own_under_a_mask():
    logits = torch.randn(1, V)
    rows = [SampleRow(SamplingParams(temperature=0.0, logprobs=1), [1], [], None, AllowSet({4}, V))]
    sample = Sampler()(logits, rows)[0]
    assert sample.token_id == 4
    assert sample.logprob == pytest.approx(torch.log_softmax(logits[0], -1)[4].item(), abs=1e-5)


def test_sampling_params_check_logit_bias_range():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 100.5),))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((-1, 1.0),))
    SamplingParams(logit_bias=((1, -100.0), (2, 100.0)))
