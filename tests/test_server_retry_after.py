"""Retry-After with a 429 follows the queue: the waiting requests over the rate
requests have lately been finishing, bounded by --retry-after-s and --retry-after-max-s."""

from __future__ import annotations

import asyncio

import httpx
from fake_engine import FakeEngine
from server_fixtures import engine_idle, serve_engine, wait_until

from server.retry_after import WINDOW_S, RetryAfterEstimator

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_estimate_is_the_queue_over_the_recent_rate_within_bounds():
    clock = Clock()
    est = RetryAfterEstimator(floor_s=2, ceiling_s=60, clock=clock)
    assert est.seconds(waiting=5) == 60  # nothing finished yet: the rate is unknown
    for _ in range(10):  # one request a second for 10 s
        clock.now += 1.0
        est.finished()
    assert est.seconds(waiting=5) == 5
    assert est.seconds(waiting=7) == 7
    assert est.seconds(waiting=1) == 2  # the floor
    assert est.seconds(waiting=60) == 60 and est.seconds(waiting=61) == 60  # the ceiling
    clock.now += 50.0  # still in the window: 10 in 60 s
    assert est.seconds(waiting=6) == 36
    assert est.seconds(waiting=12) == 60  # 72, over the ceiling
    clock.now += WINDOW_S  # all of them forgotten
    assert est.seconds(waiting=1) == 60


def test_429_retry_after_estimates_the_wait():
    # one slot, two waiting places; a request takes ~0.6 s (30 tokens x 20 ms)
    engine = FakeEngine(model_name=MODEL, max_num_seqs=1, max_queue=2, step_delay_s=0.02, max_model_len=512)
    s = serve_engine(engine, retry_after_s=1, retry_after_max_s=30)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
            for _ in range(3):  # finished requests: the recent rate
                assert (await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 30})).status_code == 200
            long = {**CHAT, "max_tokens": 400, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=long) as running:
                assert running.status_code == 200
                waiting = [
                    asyncio.create_task(http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 30}))
                    for _ in range(2)
                ]
                await asyncio.to_thread(wait_until, lambda: s.call(engine.stats).waiting == 2, 5.0, "a full queue")
                refused = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 30})
            for task in waiting:
                assert (await task).status_code == 200
            return refused

    try:
        refused = asyncio.run(scenario())
        assert refused.status_code == 429
        seconds = int(refused.headers["retry-after"])
        # 2 waiting at ~3 finished in the ~2-3 s since start: about 2 s (1 s was the old constant)
        assert 2 <= seconds <= 10, seconds
        assert f"Retry after {seconds} s" in refused.json()["error"]["message"]
        wait_until(lambda: engine_idle(s), what="engine idle")
    finally:
        s.stop()
