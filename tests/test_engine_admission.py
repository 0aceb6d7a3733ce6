"""AsyncEngine.submit: the requests of one group (an API request's choices) are admitted all
together or not at all, and a stream closed before it is read withdraws its request."""

from __future__ import annotations

import asyncio

import pytest
from fake_runner import FakeRunner, tiny_tokenizer

from athena_runtime.engine import AsyncEngine, EngineOverloaded, GroupTooLarge
from athena_runtime.engine_settings import EngineSettings
from athena_runtime.sampling_params import SamplingParams


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_for(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def make_engine(delay_s: float, **settings) -> AsyncEngine:
    tok = tiny_tokenizer()
    runner = FakeRunner(vocab_size=len(tok), num_blocks=256, block_size=4, delay_s=delay_s, banned=(tok.eos_token_id,))
    return AsyncEngine(runner, tok, EngineSettings(block_size=4, **settings), "fake", eos_token_ids=(tok.eos_token_id,))


def group(name: str, k: int, max_tokens: int = 2) -> list[tuple[str, list[int], SamplingParams]]:
    return [(f"{name}-{i}", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=max_tokens)) for i in range(k)]


async def read_all(stream) -> list:
    return [out async for out in stream]


def test_a_group_is_admitted_all_together_or_not_at_all():
    async def main():
        # slow steps: a command waits up to a step before the step thread takes it in
        engine = make_engine(delay_s=0.2, max_num_seqs=1, max_queue=4)
        await engine.start()
        (running,) = engine.submit(group("a", 1, max_tokens=200))
        await running.__anext__()  # running, holds the only slot
        waiting = engine.submit(group("b", 2))
        await wait_for(lambda: engine.stats().waiting == 2)
        for k in (3, 4):  # 2 + k > 4: refused, nothing queued
            with pytest.raises(EngineOverloaded):
                engine.submit(group(f"refused{k}", k))
        filling = engine.submit(group("c", 2))  # 2 + 2 == 4: exactly fills the queue
        with pytest.raises(EngineOverloaded):
            engine.submit(group("d", 1))
        await wait_for(lambda: engine.stats().waiting == 4)
        running.close()  # the slot frees: b and c run in turn
        outs = await asyncio.gather(*(read_all(s) for s in waiting + filling))
        assert [o[-1].finish_reason for o in outs] == ["length"] * 4
        await wait_for(lambda: engine.stats().kv_blocks_used == 0)
        assert engine.stats().waiting == engine.stats().running == 0
        await engine.shutdown()

    run(main())


def test_a_group_larger_than_the_queue_can_never_be_admitted():
    async def main():
        engine = make_engine(delay_s=0.0, max_num_seqs=2, max_queue=3)
        await engine.start()
        with pytest.raises(GroupTooLarge, match="the queue holds 3"):
            engine.submit(group("big", 4))
        outs = await asyncio.gather(*(read_all(s) for s in engine.submit(group("fits", 3))))
        assert [o[-1].finish_reason for o in outs] == ["length"] * 3
        await engine.shutdown()

    run(main())


def test_streams_closed_before_they_are_read_withdraw_their_requests():
    async def main():
        engine = make_engine(delay_s=0.01, max_num_seqs=1, max_queue=4)
        await engine.start()
        streams = engine.submit(group("x", 3, max_tokens=200))
        for s in streams:
            s.close()
        await wait_for(lambda: engine.stats().running == engine.stats().waiting == 0)
        await wait_for(lambda: engine.stats().kv_blocks_used == 0)
        outs = await asyncio.gather(*(read_all(s) for s in engine.submit(group("y", 4))))  # the queue is free
        assert len(outs) == 4
        await engine.shutdown()

    run(main())
