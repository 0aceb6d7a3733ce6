"""Scheduler and block manager: admission, chunked prefill, preemption, cancellation, fairness."""

from __future__ import annotations

import random

import pytest
from fake_runner import FakeRunner, drain, joined, tiny_tokenizer

from athena_runtime.block_manager import BlockManager
from athena_runtime.engine import ContextLengthExceeded, EngineCore
from athena_runtime.engine_settings import EngineSettings
from athena_runtime.sampling_params import SamplingParams
from athena_runtime.scheduler import Scheduler
from athena_runtime.sequence import Sequence, SequenceStatus

VOCAB = 300
EOS = 0
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_core(tok, num_blocks=64, block_size=4, **settings) -> EngineCore:
    runner = FakeRunner(vocab_size=VOCAB, num_blocks=num_blocks, block_size=block_size, banned=(EOS,))
    return EngineCore(runner, tok, EngineSettings(block_size=block_size, **settings), eos_token_ids=(EOS,))


def prompt(n: int, salt: int = 0) -> list[int]:
    return [1 + (7 * i + 13 * salt) % (VOCAB - 1) for i in range(n)]


def test_block_manager_counts_and_refuses_misuse():
    bm = BlockManager(num_blocks=5, block_size=4)
    table: list[int] = []
    bm.grow(table, 9)  # 9 tokens -> 3 blocks
    assert len(table) == 3 and bm.num_used == 3 and bm.num_free == 2
    bm.grow(table, 12)  # still 3 blocks
    assert len(table) == 3
    assert bm.can_grow(table, 20) and not bm.can_grow(table, 21)
    with pytest.raises(RuntimeError):
        bm.grow(table, 21)
    other: list[int] = []
    bm.grow(other, 1)
    assert not set(other) & set(table)
    stale = list(table)
    bm.free(table)
    assert table == [] and bm.num_used == 1 and bm.num_free == 4
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(stale)


def test_admission_needs_blocks_for_all_tokens_and_a_free_slot():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [Sequence(f"r{i}", prompt(12, i), GREEDY, arrival=i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [c.seq.request_id for c in batch] == ["r0", "r1"]  # max_num_seqs
    assert [c.num_tokens for c in batch] == [12, 12]
    assert bm.num_used == 6 and seqs[2].status is SequenceStatus.WAITING
    sched.finish(seqs[0], "stop")
    assert bm.num_used == 3
    sched.advance(batch[1:])
    seqs[1].output_token_ids.append(5)  # r1 decodes, r2 admitted
    batch = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in batch] == [("r1", 1), ("r2", 12)]


def test_chunked_prefill_interleaves_with_running_decodes(tok):
    core = make_core(tok, max_num_seqs=4, max_num_batched_tokens=8)
    core.add_request("short", prompt(3), SamplingParams(temperature=0.0, max_tokens=20))
    core.step()  # short is now decoding
    core.add_request("long", prompt(40, 1), SamplingParams(temperature=0.0, max_tokens=2))
    runner = core.runner
    first_long_call = len(runner.calls)
    drain(core)
    prefill_calls = runner.calls[first_long_call : first_long_call + 5]  # 40 tokens at <= 7 per step
    for chunks in prefill_calls:
        assert sum(len(c.token_ids) for c in chunks) <= 8
        assert len(chunks[0].token_ids) == 1  # the decode of "short" goes first
        assert len(chunks) == 2 and 1 < len(chunks[1].token_ids) <= 7
    assert (
        sum(
            len(chunks[1].token_ids)
            for chunks in runner.calls[first_long_call : first_long_call + 6]
            if len(chunks) == 2
        )
        >= 40
    )


def test_preempted_request_recomputes_to_the_same_greedy_output(tok):
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (30, 25, 20)]
    prompts = [prompt(10, 0), prompt(7, 1), prompt(13, 2)]
    solo = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        core = make_core(tok)
        core.add_request(f"r{i}", p, sp)
        solo.append(joined(drain(core)[f"r{i}"]))
    core = make_core(tok, num_blocks=16, max_num_seqs=3)  # 64 token slots for ~105 tokens
    for i, (p, sp) in enumerate(zip(prompts, params)):
        core.add_request(f"r{i}", p, sp)
    outs = drain(core)
    assert core.stats().preemptions_total > 0
    assert [joined(outs[f"r{i}"]) for i in range(3)] == solo
    assert core.block_manager.num_used == 0


def test_preemption_takes_the_most_recently_admitted():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    a, b = Sequence("a", [1, 2, 3], GREEDY, 0), Sequence("b", [4, 5, 6, 7], GREEDY, 1)
    sched.add(a)
    sched.add(b)
    sched.advance(sched.schedule())  # a: 2 blocks, b: 2 blocks
    a.output_token_ids.append(9)
    b.output_token_ids.append(9)  # a fits its slot; b needs a 3rd block
    batch = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in batch] == [("a", 1)]
    assert b.status is SequenceStatus.WAITING and b.num_computed == 0 and b.block_table == []
    assert list(sched.waiting) == [b] and sched.num_preemptions == 1


def test_cancellation_frees_blocks_at_once(tok):
    core = make_core(tok)
    core.add_request("a", prompt(9), SamplingParams(temperature=0.0, max_tokens=50))
    core.add_request("b", prompt(5, 3), SamplingParams(temperature=0.0, max_tokens=50))
    for _ in range(3):
        core.step()
    used_before = core.block_manager.num_used
    out = core.abort("a")
    assert out.finished and out.finish_reason == "cancelled"
    assert core.block_manager.num_used == used_before - 3  # a held ceil(12 / 4) blocks
    assert core.abort("a") is None
    core.abort("b")
    assert core.block_manager.num_used == 0 and not core.has_work()


def test_fcfs_a_big_request_is_not_overtaken_by_later_small_ones(tok):
    core = make_core(tok, num_blocks=12, max_num_seqs=8)  # 48 slots
    core.add_request("first", prompt(20), SamplingParams(temperature=0.0, max_tokens=8))
    core.step()
    core.add_request("big", prompt(30, 1), SamplingParams(temperature=0.0, max_tokens=4))  # does not fit yet
    for i in range(5):
        core.add_request(f"small{i}", prompt(3, i + 2), SamplingParams(temperature=0.0, max_tokens=3))
    admitted: list[str] = []
    while core.has_work():
        core.step()
        admitted += [s.request_id for s in core.scheduler.running if s.request_id not in admitted]
    assert admitted == ["first", "big"] + [f"small{i}" for i in range(5)]


def test_requests_that_can_never_fit_are_rejected_up_front(tok):
    core = make_core(tok, num_blocks=8, max_model_len=40)  # cache: 32 tokens
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 40"):
        core.add_request("a", prompt(30), SamplingParams(max_tokens=11))
    with pytest.raises(ContextLengthExceeded, match="KV cache holds 32 tokens"):
        core.add_request("b", prompt(30), SamplingParams(max_tokens=5))
    with pytest.raises(ValueError):
        core.add_request("c", [], SamplingParams())
    core.add_request("d", prompt(28), SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="duplicate"):
        core.add_request("d", prompt(2), SamplingParams(max_tokens=4))
    assert joined(drain(core)["d"])[2] == "length"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_stress_with_aborts_ends_with_every_block_free(tok, seed):
    rng = random.Random(seed)
    core = make_core(tok, num_blocks=20, block_size=4, max_num_seqs=5, max_num_batched_tokens=12)
    finished: dict[str, str] = {}
    live: list[str] = []
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            rid = f"r{step}"
            params = SamplingParams(
                temperature=rng.choice([0.0, 0.9]),
                top_p=rng.choice([1.0, 0.8]),
                seed=rng.choice([None, step]),
                max_tokens=rng.randint(1, 30),
                stop=rng.choice([(), ("a",), ("th", "e")]),
            )
            core.add_request(rid, prompt(rng.randint(1, 40), step), params)
            live.append(rid)
        if live and rng.random() < 0.05:
            out = core.abort(live.pop(rng.randrange(len(live))))
            if out is not None:
                finished[out.request_id] = out.finish_reason
        for out in core.step():
            assert out.request_id not in finished
            if out.finished:
                finished[out.request_id] = out.finish_reason
        used = {b for s in core.scheduler.running for b in s.block_table}
        assert core.block_manager.num_used == len(used)  # only running sequences hold blocks
    drain(core)
    assert core.block_manager.num_used == 0 and core.block_manager.num_free == 20
    assert not core.scheduler.requests
    assert core.stats().preemptions_total > 0
