"""Sampler: greedy, filters, seeds independent of the batch, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from athena_runtime.sampler import RequestGenerator, Sampler, SampleRow, apply_penalties
from athena_runtime.sampling_params import SamplingParams

V = 50


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 2


def row(params: SamplingParams, prompt=(1, 2), output=(), seed: int | None = None) -> SampleRow:
    gen = torch.Generator().manual_seed(seed if seed is not None else params.seed or 0)
    return SampleRow(params, list(prompt), list(output), gen)


def draw(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n draws for one request (one generator), as n sampler calls would make them."""
    sampler, r = Sampler(), row(params, seed=seed)
    return torch.tensor([sampler(logits_row[None], [r])[0].token_id for _ in range(n)])


def test_greedy_is_argmax_of_each_row():
    logits = logits_rows(4)
    samples = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(4)])
    assert [s.token_id for s in samples] == logits.argmax(-1).tolist()


def test_unfiltered_draws_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5] + [-30.0] * (V - 5)])
    tokens = draw(logits[0], SamplingParams(temperature=0.7), 4000)
    expected = torch.softmax(logits[0] / 0.7, -1)[:5]
    freq = torch.bincount(tokens, minlength=V)[:5].float() / 4000
    assert torch.allclose(freq, expected, atol=0.03)


def test_top_k_top_p_min_p_restrict_the_support():
    logits = logits_rows(1, seed=3)[0]
    order = logits.argsort(descending=True)
    probs = torch.softmax(logits, -1)
    top3 = set(draw(logits, SamplingParams(top_k=3), 300).tolist())
    assert top3 <= set(order[:3].tolist()) and len(top3) == 3
    p_sorted = probs[order]
    k = int((torch.cumsum(p_sorted, 0) < 0.6).sum()) + 1  # smallest set reaching 0.6
    nucleus = set(draw(logits, SamplingParams(top_p=0.6), 300).tolist())
    assert nucleus <= set(order[:k].tolist()) and len(nucleus) > 1
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    minp = set(draw(logits, SamplingParams(min_p=0.2), 300).tolist())
    assert minp <= allowed and len(minp) > 1
    assert set(draw(logits, SamplingParams(top_p=1e-6), 20).tolist()) == {int(order[0])}


def test_seeded_draws_reproduce_regardless_of_batch_composition():
    target = logits_rows(1, seed=7)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = draw(target, params, 30, seed=1234).tolist()
    sampler = Sampler()
    gen = torch.Generator().manual_seed(1234)
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=5, seed=9), SamplingParams(temperature=2.0)]
    mixed = []
    for step in range(30):  # batch size and position change every step
        n_others = step % 4
        rows = [row(others[i % 3], seed=step + i) for i in range(n_others)]
        pos = step % (n_others + 1)
        rows.insert(pos, SampleRow(params, [1, 2], [], gen))
        batch = logits_rows(n_others + 1, seed=100 + step)
        batch[pos] = target
        mixed.append(sampler(batch, rows)[pos].token_id)
    assert mixed == alone
    assert draw(target, params, 30, seed=99).tolist() != alone


def test_repetition_penalty_follows_hf_over_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    out = apply_penalties(logits, [SampleRow(SamplingParams(repetition_penalty=2.0), [0, 1], [4])])
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.5]]


def test_presence_and_frequency_penalties_follow_openai_over_output_only():
    logits = torch.zeros(1, 5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [SampleRow(params, [0, 0, 0], [1, 1, 1, 2])])
    assert torch.allclose(out, torch.tensor([[0.0, -(0.5 + 0.75), -(0.5 + 0.25), 0.0, 0.0]]))
    # a strong presence penalty moves greedy away from a token it already produced
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    plain = Sampler()(logits, [SampleRow(SamplingParams(temperature=0.0), [5], [0])])[0].token_id
    penalized = Sampler()(logits, [SampleRow(SamplingParams(temperature=0.0, presence_penalty=1.0), [5], [0])])[0]
    assert (plain, penalized.token_id) == (0, 1)


def test_penalties_apply_per_row():
    logits = torch.ones(2, 4)
    rows = [SampleRow(SamplingParams(frequency_penalty=1.0), [], [2, 2]), SampleRow(SamplingParams(), [], [2, 2])]
    out = apply_penalties(logits, rows)
    assert out[0].tolist() == [1.0, 1.0, -1.0, 1.0] and out[1].tolist() == [1.0] * 4


def test_logprobs_are_raw_model_logprobs_with_sorted_alternatives():
    logits = logits_rows(2, seed=5)
    rows = [
        row(SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=3), prompt=[0, 1]),
        row(SamplingParams(temperature=0.0)),
    ]
    samples = Sampler()(logits, rows)
    raw = torch.log_softmax(logits[0], -1)
    s = samples[0]
    assert math.isclose(s.logprob, float(raw[s.token_id]), rel_tol=1e-5)
    assert [t for t, _ in s.top] == raw.topk(3).indices.tolist()
    assert [lp for _, lp in s.top] == pytest.approx(raw.topk(3).values.tolist(), rel=1e-5)
    assert samples[1].logprob is None and samples[1].top == ()
    zero = Sampler()(logits[:1], [row(SamplingParams(temperature=0.0, logprobs=0))])[0]
    assert zero.top == () and math.isclose(zero.logprob, float(raw.max()), rel_tol=1e-5)


def test_plain_temperature_path_draws_what_the_filtered_path_draws():
    """top_k=V filters nothing but sends the batch through the top-k / top-p / min-p path."""
    logits = logits_rows(6, seed=11)
    for temps in ([1.0] * 6, [0.7, 1.0, 1.3, 0.7, 0.0, 1.0], [0.5] * 6):
        plain = [row(SamplingParams(temperature=t), seed=i) for i, t in enumerate(temps)]
        filtered = [row(SamplingParams(temperature=t, top_k=V), seed=i) for i, t in enumerate(temps)]
        a, b = Sampler(), Sampler()
        for _ in range(100):  # crosses the sampler's block of pre-drawn uniforms
            assert [s.token_id for s in a(logits, plain)] == [s.token_id for s in b(logits, filtered)]


def test_uniforms_are_the_generators_scalar_draws_in_order():
    for g in (RequestGenerator(), torch.Generator()):  # buffered; buffered or not, by torch version
        sampler = Sampler()
        g.manual_seed(3)
        got = [sampler._uniform(g) for _ in range(150)]
        g.manual_seed(3)
        assert got == [torch.rand((), generator=g, dtype=torch.float64).item() for _ in range(150)]
    sampler, g = Sampler(), RequestGenerator().manual_seed(1)
    sampler._uniform(g)
    assert isinstance(g, RequestGenerator) and len(sampler._uniforms[g]) == 63  # 64 drawn, one handed out


def test_draws_among_the_top_candidates_equal_the_full_sort():
    """The sampler draws among its top `_CANDIDATES` tokens where that gives the full sort's token; the
    full sort (`_filtered_sorted_probs` + `_inverse_cdf`) is the spec. Peaked and flat rows, every filter,
    ties (integer logits, ties across the cut), masked tokens; flat rows need the full sort."""
    from athena_runtime.sampler import _CANDIDATES, _draw_among_candidates, _filtered_sorted_probs, _inverse_cdf

    vocab, g = 1000, torch.Generator().manual_seed(5)
    settings = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.2, top_p=0.9),
        SamplingParams(temperature=0.7, top_k=40),
        SamplingParams(temperature=1.3, top_k=600),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=1.0, top_p=0.999),
        SamplingParams(temperature=0.0),
    ]
    covered_seen = set()
    for case in range(60):
        scale = (0.3, 3.0, 12.0)[case % 3]  # flat, moderate, peaked
        logits = torch.randn(len(settings), vocab, generator=g) * scale
        if case % 4 == 1:
            logits = logits.round()  # many exact ties, also across the cut
        if case % 5 == 2:
            logits[:, torch.randperm(vocab, generator=g)[: vocab - 100]] = float("-inf")  # a grammar mask
        rows = [SampleRow(p, [1], [], None) for p in settings]
        u = torch.rand(len(settings), generator=g, dtype=torch.float64)
        fast, covered = _draw_among_candidates(logits, rows, u)
        probs, ids = _filtered_sorted_probs(logits, rows)
        full = _inverse_cdf(probs, ids, u)
        assert torch.equal(fast[covered], full[covered]), case
        covered_seen.update(covered.tolist())
        gens = [RequestGenerator().manual_seed(case * 10 + i) for i in range(len(settings))]
        sampled = Sampler()(logits, [SampleRow(p, [1], [], gen) for p, gen in zip(settings, gens)])
        u_same = torch.tensor(
            [
                0.0
                if p.temperature == 0
                else torch.rand((), generator=torch.Generator().manual_seed(case * 10 + i), dtype=torch.float64).item()
                for i, p in enumerate(settings)
            ],
            dtype=torch.float64,
        )
        expect = _inverse_cdf(probs, ids, u_same)
        expect[-1] = logits[-1].argmax()
        assert [s.token_id for s in sampled] == expect.tolist(), case
    assert covered_seen == {True, False} and _CANDIDATES < vocab  # both paths ran
