"""Chunked prefill: a prompt longer than one step's token budget, alone or among running decodes,
gives what an unchunked run gives (fake runner, then the real tiny model on CPU)."""

from __future__ import annotations

import random

import pytest
from fake_runner import FakeRunner, drain, joined, tiny_tokenizer

from athena_runtime.engine import EngineCore
from athena_runtime.engine_settings import EngineSettings
from athena_runtime.sampling_params import SamplingParams

VOCAB = 300
EOS = 0


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def fake_core(tok, max_model_len=256, **settings) -> EngineCore:
    runner = FakeRunner(
        vocab_size=VOCAB, num_blocks=max_model_len // 4 + 100, block_size=4, max_model_len=max_model_len, banned=(EOS,)
    )
    return EngineCore(runner, tok, EngineSettings(block_size=4, **settings), eos_token_ids=(EOS,))


def prompt(n: int, salt: int = 0) -> list[int]:
    return [1 + (5 * i + 11 * salt) % (VOCAB - 1) for i in range(n)]


def greedy(n: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, logprobs=logprobs)


def run(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple]:
    for rid, (p, params) in requests.items():
        core.add_request(rid, p, params)
    outs = drain(core)
    assert core.block_manager.num_used == 0
    return {rid: joined(outs[rid]) for rid in requests}


@pytest.mark.parametrize("n", [9, 16, 17, 100, 252])
def test_a_lone_prompt_longer_than_the_step_budget(tok, n):
    """Issue 17 (Found 1): with nobody else decoding, a chunk that does not reach the prompt's end
    left no row to sample, and the step failed the request instead of sampling nothing."""
    want = run(fake_core(tok), {"a": (prompt(n), greedy(4))})
    core = fake_core(tok, max_num_seqs=4, max_num_batched_tokens=8)
    got = run(core, {"a": (prompt(n), greedy(4))})
    assert got == want and want["a"][2] == "length"
    assert max(sum(len(c.token_ids) for c in step) for step in core.runner.calls) == 8


def test_a_lone_prompt_up_to_max_model_len(tok):
    want = run(fake_core(tok), {"a": (prompt(255), greedy(1))})
    got = run(fake_core(tok, max_num_seqs=4, max_num_batched_tokens=16), {"a": (prompt(255), greedy(1))})
    assert got == want and len(got["a"][0]) == 1


def test_long_prompts_chunked_among_running_decodes(tok):
    requests = {
        "short": (prompt(3, 1), greedy(60)),
        "long": (prompt(130, 2), greedy(5)),
        "long2": (prompt(61, 3), greedy(7)),
    }
    want = {rid: run(fake_core(tok), {rid: r})[rid] for rid, r in requests.items()}
    core = fake_core(tok, max_num_seqs=4, max_num_batched_tokens=12)
    core.add_request("short", *requests["short"])
    first = core.step()  # short is decoding before the long ones arrive
    for rid in ("long", "long2"):
        core.add_request(rid, *requests[rid])
    outs = drain(core)
    outs["short"] = first + outs["short"]
    assert {rid: joined(o) for rid, o in outs.items()} == want
    assert core.block_manager.num_used == 0
    mixed = [step for step in core.runner.calls if len(step) > 1 and max(len(c.token_ids) for c in step) > 1]
    assert len(mixed) >= 10  # prompt chunks rode along with decodes


def test_a_step_with_nothing_due_samples_nothing(tok):
    core = fake_core(tok, max_num_seqs=4, max_num_batched_tokens=8)
    core.add_request("a", prompt(20), greedy(2))
    assert core.step() == [] and core.step() == []  # 8 + 8 of 20 tokens: nothing to sample yet
    (out,) = core.step()
    assert out.request_id == "a" and len(out.token_ids) == 1 and not out.finished


def step_tokens(calls) -> list[list[tuple[int, int]]]:
    """Per runner call: (start position, tokens fed) of each chunk."""
    return [[(c.start_pos, len(c.token_ids)) for c in step] for step in calls]


def test_a_long_prompt_does_not_stall_running_decodes(tok):
    """Issue 17 (Found 7): a 2000-token prompt took a whole 2048-token step while another request
    was decoding, pausing its stream for the whole prefill. Now each step carries the decode and
    at most `prefill_chunk_tokens` prompt tokens."""
    want = {
        rid: run(fake_core(tok, max_model_len=2100), {rid: r})[rid]
        for rid, r in {"short": (prompt(3), greedy(150)), "long": (prompt(2000, 1), greedy(2))}.items()
    }
    core = fake_core(tok, max_model_len=2100, max_num_batched_tokens=2048, prefill_chunk_tokens=16)
    core.add_request("short", prompt(3), greedy(150))
    outs = [core.step()]
    core.add_request("long", prompt(2000, 1), greedy(2))
    while core.has_work():
        outs.append(core.step())
    short_steps = [i for i, step in enumerate(outs) if any(o.request_id == "short" for o in step)]
    assert short_steps == list(range(150))  # a token for short in every step
    calls = step_tokens(core.runner.calls)
    assert max(sum(n for _, n in step) for step in calls) == 1 + 16
    assert [step[1:] for step in calls[1:126]] == [[(16 * i, 16)] for i in range(125)]  # the prompt, 16 a step
    got = {rid: joined([o for step in outs for o in step if o.request_id == rid]) for rid in want}
    assert got == want


@pytest.mark.parametrize("extra", [0, 1])
def test_prefill_chunk_boundary_while_a_request_decodes(tok, extra):
    core = fake_core(tok, max_num_batched_tokens=64, prefill_chunk_tokens=10)
    core.add_request("short", prompt(3), greedy(20))
    core.step()
    core.add_request("p", prompt(10 + extra, 1), greedy(1))
    first = core.step()
    assert step_tokens(core.runner.calls)[-1] == [(3, 1), (0, 10)]
    assert [o.request_id for o in first] == (["short", "p"] if extra == 0 else ["short"])
    if extra:
        assert [o.request_id for o in core.step()] == ["short", "p"]
        assert step_tokens(core.runner.calls)[-1] == [(4, 1), (10, 1)]


def test_a_burst_of_long_prompts_never_takes_a_stream_s_token_or_the_step_budget(tok):
    """However many prompts wait, the running stream gets its token every step and a step stays within
    max_num_batched_tokens; outputs are those of each request alone."""
    requests = {"short": (prompt(3), greedy(40))} | {f"long{i}": (prompt(90, i + 1), greedy(3)) for i in range(6)}
    want = {rid: run(fake_core(tok), {rid: r})[rid] for rid, r in requests.items()}
    core = fake_core(tok, max_num_batched_tokens=64, prefill_chunk_tokens=10)
    core.add_request("short", *requests["short"])
    outs = [core.step()]
    for rid, r in requests.items():
        if rid != "short":
            core.add_request(rid, *r)
    while core.has_work():
        outs.append(core.step())
    assert [i for i, step in enumerate(outs) if any(o.request_id == "short" for o in step)] == list(range(40))
    assert max(sum(n for _, n in step) for step in step_tokens(core.runner.calls)) <= 64
    got = {rid: joined([o for step in outs for o in step if o.request_id == rid]) for rid in want}
    assert got == want


@pytest.mark.parametrize("extra", [0, 1])
def test_a_lone_prompt_takes_the_whole_step_budget(tok, extra):
    core = fake_core(tok, max_num_batched_tokens=64, prefill_chunk_tokens=10)
    core.add_request("p", prompt(64 + extra), greedy(1))
    core.step()
    assert step_tokens(core.runner.calls) == [[(0, 64)]]
    if extra:
        core.step()
        assert step_tokens(core.runner.calls)[-1] == [(64, 1)]
    assert not core.has_work()


def test_prefill_chunk_setting_and_device_defaults():
    assert EngineSettings().prefill_chunk("cpu") == 128 and EngineSettings().prefill_chunk("cuda") == 2048
    assert EngineSettings(max_num_batched_tokens=100).prefill_chunk("cuda") == 100
    assert EngineSettings(prefill_chunk_tokens=7).prefill_chunk("cuda") == 7
    assert EngineSettings(max_num_batched_tokens=100, prefill_chunk_tokens=100).prefill_chunk("cpu") == 100
    for bad in (0, 101):
        with pytest.raises(ValueError, match="prefill_chunk_tokens"):
            EngineSettings(max_num_batched_tokens=100, prefill_chunk_tokens=bad)


# -- the real tiny model on CPU -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("chunked") / "llama", "llama", tie_word_embeddings=True)
    from transformers import AutoTokenizer

    return folder, AutoTokenizer.from_pretrained(folder)


def tiny_core(tiny, **settings) -> EngineCore:
    from athena_runtime.model_runner import ModelRunner

    folder, tokenizer = tiny
    runner = ModelRunner.from_path(folder, kv_format="fp32", block_size=4, num_blocks=80, device="cpu")
    return EngineCore(runner, tokenizer, EngineSettings(block_size=4, **settings), eos_token_ids=())


def boundary_lengths(chunk: int, block: int, top: int) -> list[int]:
    """Prompt lengths at every chunk boundary (±1) and multiple, and at block boundaries (±1)."""
    near = {k * chunk + d for k in range(1, top // chunk + 1) for d in (-1, 0, 1)}
    near |= {k * block + d for k in range(1, top // block + 1, 3) for d in (-1, 0, 1)}
    return sorted(n for n in near | {1, 2, top} if 1 <= n <= top)


@pytest.mark.parametrize("seed", [0, 1])
def test_chunk_boundaries_give_the_unchunked_greedy_outputs(tiny, seed):
    """Prompts around every chunk and block boundary, fed in chunks of a random size (alone and
    among running decodes) vs in one step: the same greedy tokens and logprobs."""
    rng = random.Random(seed)
    chunk = rng.choice([5, 6, 7, 9, 10, 11])
    lengths = boundary_lengths(chunk, 4, top=3 * chunk + 2)
    prompts = {f"p{n}": [rng.randrange(3, 384) for _ in range(n)] for n in lengths}
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2)
    # the prefix cache off: the second pass over the prompts recomputes them, chunked as the first
    whole = tiny_core(tiny, prefix_cache=False)
    chunked = tiny_core(tiny, max_num_seqs=4, max_num_batched_tokens=chunk, prefix_cache=False)
    want, got = {}, {}
    for rid, p in prompts.items():  # one at a time: lone prompts
        whole.add_request(rid, p, params)
        chunked.add_request(rid, p, params)
        want[rid] = drain(whole)[rid]
        got[rid] = drain(chunked)[rid]
    background = [rng.randrange(3, 384) for _ in range(3)]
    chunked.add_request("bg", background, SamplingParams(temperature=0.0, max_tokens=40))
    chunked.step()
    for rid, p in prompts.items():  # all at once, next to a running decode
        chunked.add_request(rid + "-mixed", p, params)
    mixed = drain(chunked)
    assert chunked.block_manager.num_used == 0
    for rid in prompts:
        w = want[rid]
        for outs in (got[rid], mixed[rid + "-mixed"]):
            assert joined(outs) == joined(w), rid
            for a, b in zip(outs, w):
                for x, y in zip(a.logprobs, b.logprobs):
                    assert x.token_id == y.token_id
                    assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
                    assert [t.logprob for t in x.top] == pytest.approx([t.logprob for t in y.top], abs=1e-4)
