"""The engine end to end on the fake runner: batching invariance, finish reasons, errors, async API."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fake_runner import FakeRunner, drain, joined, tiny_tokenizer

from athena_runtime.engine import AsyncEngine, ContextLengthExceeded, EngineClosed, EngineCore, EngineOverloaded
from athena_runtime.engine_settings import EngineSettings
from athena_runtime.sampling_params import SamplingParams

VOCAB = 300
EOS = 0
POISON = 299  # a prompt containing it makes the fake model step fail


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_runner(**kw) -> FakeRunner:
    kw.setdefault("banned", (EOS, POISON))  # sampled output never hits the failure trigger by chance
    return FakeRunner(
        vocab_size=VOCAB,
        num_blocks=kw.pop("num_blocks", 64),
        block_size=4,
        fail_when=lambda chunks: any(POISON in c.token_ids for c in chunks),
        **kw,
    )


def make_core(tok, eos=(EOS,), runner=None, **settings) -> EngineCore:
    return EngineCore(runner or make_runner(), tok, EngineSettings(block_size=4, **settings), eos_token_ids=eos)


def prompt(n: int, salt: int = 0) -> list[int]:
    return [1 + (7 * i + 13 * salt) % (VOCAB - 2) for i in range(n)]


def run_alone(tok, rid: str, p: list[int], params: SamplingParams, eos=(EOS,)):
    core = make_core(tok, eos=eos)
    core.add_request(rid, p, params)
    return joined(drain(core)[rid])


MIXED = [
    (prompt(n, i), SamplingParams(temperature=t, seed=s, max_tokens=m, top_k=k))
    for i, (n, t, s, m, k) in enumerate(
        [
            (1, 0.0, None, 9, 0),
            (23, 0.0, None, 17, 0),
            (6, 1.0, 11, 12, 0),
            (41, 0.0, None, 5, 0),
            (12, 0.8, 5, 20, 20),
            (3, 1.3, 7, 14, 0),
        ]
    )
]


def test_mixed_batch_produces_what_each_request_produces_alone(tok):
    alone = [run_alone(tok, f"r{i}", p, sp) for i, (p, sp) in enumerate(MIXED)]
    core = make_core(tok, max_num_seqs=4, max_num_batched_tokens=10)  # chunked prefill + queueing
    for i, (p, sp) in enumerate(MIXED):
        core.add_request(f"r{i}", p, sp)
    outs = drain(core)
    assert [joined(outs[f"r{i}"]) for i in range(len(MIXED))] == alone
    assert max(len(chunks) for chunks in core.runner.calls) == 4
    assert all(sum(len(c.token_ids) for c in chunks) <= 10 for chunks in core.runner.calls)
    assert [len(joined(outs[f"r{i}"])[0]) for i in range(len(MIXED))] == [sp.max_tokens for _, sp in MIXED]


def test_outputs_carry_deltas_counts_and_length_finish(tok):
    core = make_core(tok)
    core.add_request("a", prompt(5), SamplingParams(temperature=0.0, max_tokens=6))
    outs = drain(core)["a"]
    assert len(outs) == 6 and all(len(o.token_ids) == 1 for o in outs)
    assert [o.completion_tokens for o in outs] == [1, 2, 3, 4, 5, 6]
    assert all(o.prompt_tokens == 5 for o in outs)
    assert [o.finished for o in outs] == [False] * 5 + [True] and outs[-1].finish_reason == "length"


def test_eos_and_stop_token_ids_finish_with_stop(tok):
    p = prompt(4)
    tokens, _, _ = run_alone(tok, "a", p, SamplingParams(temperature=0.0, max_tokens=6))
    eos_first = run_alone(tok, "a", p, SamplingParams(temperature=0.0, max_tokens=6), eos=(tokens[0],))
    assert eos_first == ([tokens[0]], "", "stop")
    ignored = run_alone(tok, "a", p, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), eos=(tokens[0],))
    assert ignored[0] == tokens and ignored[2] == "length"
    stopped = run_alone(tok, "a", p, SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=(tokens[2],)))
    assert stopped[0] == tokens[:3] and stopped[2] == "stop"
    assert stopped[1] == run_alone(tok, "a", p, SamplingParams(temperature=0.0, max_tokens=2))[1]


def test_stop_string_cuts_the_text_at_its_first_occurrence(tok):
    p, params = prompt(7, 3), SamplingParams(temperature=0.0, max_tokens=40)
    _, full, _ = run_alone(tok, "a", p, params)
    start = next(i for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stop = full[start : start + 2]
    tokens, text, reason = run_alone(tok, "a", p, SamplingParams(temperature=0.0, max_tokens=40, stop=(stop,)))
    assert reason == "stop" and text == full[: full.find(stop)] and len(tokens) < 40


def test_logprobs_in_outputs(tok):
    core = make_core(tok)
    core.add_request("a", prompt(3), SamplingParams(temperature=0.0, max_tokens=3, logprobs=2))
    for out in drain(core)["a"]:
        (lp,) = out.logprobs
        assert lp.token_id == out.token_ids[0] and len(lp.top) == 2
        assert lp.top[0].token_id == lp.token_id and lp.top[0].logprob == pytest.approx(lp.logprob)
        assert lp.logprob <= 0 and isinstance(lp.token, str)


def test_a_failing_model_step_fails_its_requests_and_the_engine_keeps_serving(tok):
    core = make_core(tok)
    core.add_request("ok-before", prompt(3), SamplingParams(temperature=0.0, max_tokens=20))
    core.step()
    core.add_request("bad", [5, POISON, 6], SamplingParams(temperature=0.0, max_tokens=5))
    outs = drain(core)
    assert outs["bad"][-1].finish_reason == "error" and "injected" in outs["bad"][-1].error
    assert outs["ok-before"][-1].finish_reason == "error"  # was in the same batch
    assert core.block_manager.num_used == 0
    core.add_request("ok-after", prompt(3), SamplingParams(temperature=0.0, max_tokens=4))
    assert joined(drain(core)["ok-after"])[2] == "length"


# -- AsyncEngine ---------------------------------------------------------------------------------


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(engine: AsyncEngine, rid: str, p: list[int], params: SamplingParams):
    return [out async for out in engine.generate(rid, p, params)]


async def wait_for(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def make_engine(tok, delay_s: float = 0.0, **settings) -> AsyncEngine:
    return AsyncEngine(
        make_runner(delay_s=delay_s), tok, EngineSettings(block_size=4, **settings), "fake", eos_token_ids=(EOS,)
    )


def test_async_generate_matches_the_core(tok):
    expected = [run_alone(tok, f"r{i}", p, sp) for i, (p, sp) in enumerate(MIXED)]

    async def main():
        engine = make_engine(tok, max_num_seqs=3, max_num_batched_tokens=8)
        await engine.start()
        assert engine.ready and engine.max_model_len == 256
        results = await asyncio.gather(*(collect(engine, f"r{i}", p, sp) for i, (p, sp) in enumerate(MIXED)))
        stats = engine.stats()
        await engine.shutdown()
        return results, stats

    results, stats = run(main())
    assert [joined(outs) for outs in results] == expected
    assert stats.running == stats.waiting == stats.kv_blocks_used == 0
    assert stats.generation_tokens_total == sum(sp.max_tokens for _, sp in MIXED)


def test_closing_the_stream_aborts_and_frees_blocks_within_a_step(tok):
    async def main():
        engine = make_engine(tok, delay_s=0.005)
        await engine.start()
        stream = engine.generate("a", prompt(10), SamplingParams(temperature=0.0, max_tokens=200))
        first = await stream.__anext__()
        assert not first.finished and engine.stats().kv_blocks_used > 0
        calls = len(engine.core.runner.calls)
        await stream.aclose()
        await wait_for(lambda: engine.stats().kv_blocks_used == 0)
        assert len(engine.core.runner.calls) - calls <= 1
        # a consumer task cancelled mid-stream (a client disconnect) aborts too
        task = asyncio.create_task(collect(engine, "b", prompt(4), SamplingParams(max_tokens=200)))
        await wait_for(lambda: engine.stats().running == 1)
        task.cancel()
        await wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().running == 0)
        await engine.abort("unknown")  # harmless
        await engine.shutdown()

    run(main())


def test_explicit_abort_ends_the_stream_cancelled(tok):
    async def main():
        engine = make_engine(tok, delay_s=0.002)
        await engine.start()
        task = asyncio.create_task(collect(engine, "a", prompt(4), SamplingParams(max_tokens=200)))
        await wait_for(lambda: engine.stats().generation_tokens_total > 2)
        await engine.abort("a")
        outs = await task
        await engine.shutdown()
        return outs

    outs = run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "cancelled" and len(outs) < 200


def test_request_errors_raise_from_generate(tok):
    async def main():
        engine = make_engine(tok, delay_s=0.02, max_num_seqs=1, max_queue=1, max_model_len=64)
        with pytest.raises(EngineClosed):
            await collect(engine, "x", prompt(3), SamplingParams())  # not started
        await engine.start()
        with pytest.raises(ContextLengthExceeded, match="maximum context length is 64"):
            await collect(engine, "x", prompt(60), SamplingParams(max_tokens=5))
        running = asyncio.create_task(collect(engine, "a", prompt(3), SamplingParams(max_tokens=55)))
        await wait_for(lambda: engine.stats().running == 1)
        queued = asyncio.create_task(collect(engine, "b", prompt(3), SamplingParams(max_tokens=2)))
        await wait_for(lambda: engine.stats().waiting == 1)
        with pytest.raises(EngineOverloaded):
            await collect(engine, "c", prompt(3), SamplingParams())
        await engine.abort("a")
        a, b = await asyncio.gather(running, queued)
        assert (a[-1].finish_reason, b[-1].finish_reason) == ("cancelled", "length")
        await engine.shutdown()
        with pytest.raises(EngineClosed):
            await collect(engine, "d", prompt(3), SamplingParams())
        assert not engine.ready

    run(main())


def test_shutdown_drains_running_requests(tok):
    async def main():
        engine = make_engine(tok, delay_s=0.001)
        await engine.start()
        tasks = [
            asyncio.create_task(collect(engine, f"r{i}", prompt(5, i), SamplingParams(max_tokens=30))) for i in range(3)
        ]
        await wait_for(lambda: engine.stats().running + engine.stats().waiting == 3)  # all three admitted
        await engine.shutdown(drain_timeout_s=10.0)
        return [await t for t in tasks]

    results = run(main())
    assert [outs[-1].finish_reason for outs in results] == ["length"] * 3
    assert all(len(joined(outs)[0]) == 30 for outs in results)


def test_shutdown_cancels_what_is_left_after_the_timeout(tok):
    async def main():
        engine = make_engine(tok, delay_s=0.005)
        await engine.start()
        task = asyncio.create_task(collect(engine, "a", prompt(5), SamplingParams(max_tokens=250)))
        await wait_for(lambda: engine.stats().running == 1)
        await engine.shutdown(drain_timeout_s=0.05)
        stats = engine.stats()
        return await task, stats

    outs, stats = run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "cancelled"
    assert stats.kv_blocks_used == 0 and stats.running == 0


def test_async_model_error_is_reported_and_serving_continues(tok):
    async def main():
        engine = make_engine(tok)
        await engine.start()
        bad = await collect(engine, "bad", [3, POISON], SamplingParams(max_tokens=3))
        good = await collect(engine, "good", prompt(3), SamplingParams(max_tokens=3))
        await engine.shutdown()
        return bad, good

    bad, good = run(main())
    assert bad[-1].finish_reason == "error" and bad[-1].error
    assert good[-1].finish_reason == "length"


def test_step_trace_logs_each_step_shape_only_when_enabled(tok, caplog):
    """athena_runtime.engine.steps at DEBUG: one line per step with its one-token rows, prompt tokens and chunks,
    and how many requests waited before it (bench.serve_gap --step-trace); nothing at the default level."""
    core = make_core(tok, max_num_seqs=4, max_num_batched_tokens=16, prefill_chunk_tokens=8)
    for i in range(3):
        core.add_request(f"r{i}", prompt(10 + i, salt=i), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    with caplog.at_level(logging.DEBUG, logger="athena_runtime.engine.steps"):
        core.step()
        core.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "athena_runtime.engine.steps"]
    assert len(lines) == 2
    assert lines[0].endswith("0 one-token rows, 16 prompt tokens in 2 chunks; 3 waiting before")
    assert "3 waiting" not in lines[1] and "prompt tokens in" in lines[1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="athena_runtime.engine.steps"):
        core.step()
    assert not [r for r in caplog.records if r.name == "athena_runtime.engine.steps"]


@pytest.mark.parametrize("streams,held", [(12, True), (8, False)])
def test_many_outputs_are_handed_over_once_the_next_step_is_launched(tok, streams, held):
    """With more than `hold_outputs_above` (8) outputs a step, they reach the event loop after the next step's model
    call (its GPU work queued), so the loop's per-output work overlaps that step; with 8 or fewer, at once. Either
    way every stream gets all its tokens, in order, and the last outputs are not held when nothing follows."""
    events: list[str] = []
    engine = make_engine(tok, max_num_seqs=16, max_num_batched_tokens=64)
    execute, deliver = engine.core.runner.execute, engine._deliver_threadsafe

    def traced_execute(chunks):
        events.append("launch")
        return execute(chunks)

    def traced_deliver(outputs):
        events.extend(["deliver"] if outputs else [])
        deliver(outputs)

    engine.core.runner.execute, engine._deliver_threadsafe = traced_execute, traced_deliver
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    requests = [(f"r{i}", prompt(3, salt=i), params) for i in range(streams)]
    expected = [run_alone(tok, rid, p, sp) for rid, p, sp in requests]

    async def main():
        await engine.start()
        streams_ = engine.submit(requests)  # one group: every request in the first step, then in lockstep

        async def drain_stream(stream):
            return [out async for out in stream]

        got = await asyncio.gather(*(drain_stream(st) for st in streams_))
        await engine.shutdown()
        return got

    assert [joined(outs) for outs in run(main())] == expected
    assert events.count("launch") == 5 and events.count("deliver") == 5  # one step and one hand-over per token
    # held: step k's outputs go after step k + 1's launch (launch, launch, deliver, launch, deliver, ..., deliver)
    want = ["launch", "launch"] + ["deliver", "launch"] * 3 + ["deliver", "deliver"]
    assert events == (want if held else ["launch", "deliver"] * 5)
