"""Clients that leave: the engine request is cancelled and its KV blocks freed; shutdown drains."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from fake_engine import FakeEngine
from server_fixtures import engine_idle, metrics, serve_engine, wait_until

MODEL = "fake-model"
LONG_CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 400,
    "stream": True,
}


@pytest.fixture(scope="module")
def server():
    s = serve_engine(
        FakeEngine(model_name=MODEL, max_model_len=512, max_num_seqs=16, max_queue=256, step_delay_s=0.002)
    )
    yield s
    s.stop()


async def open_read_close(http: httpx.AsyncClient, path: str, body: dict, lines: int = 3) -> int:
    """Opens a stream, reads `lines` events, then drops the connection; returns how many it read."""
    read = 0
    async with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]", "the stream ended before the client left"
                read += 1
                if read == lines:
                    break
    return read


def test_100_stream_disconnects_free_everything(server):
    engine = server.app.state.engine
    before_cancelled, before_tokens = len(engine.cancelled), engine.generation_tokens_total
    before_ok = metrics(server.url).get('athena_http_requests_total{endpoint="/v1/chat/completions",status="200"}', 0)

    async def run() -> None:
        limit = asyncio.Semaphore(10)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:

            async def one(i: int) -> int:
                async with limit:
                    if i % 2:
                        return await open_read_close(http, "/v1/chat/completions", {**LONG_CHAT, "seed": i})
                    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
                    return await open_read_close(http, "/v1/completions", body)

            assert await asyncio.gather(*(one(i) for i in range(100))) == [3] * 100

    start = time.monotonic()
    asyncio.run(run())
    wait_until(lambda: engine_idle(server), 5.0, "the engine to go idle")
    elapsed = time.monotonic() - start
    assert len(engine.cancelled) - before_cancelled == 100
    # cancelled early: far fewer tokens than 100 full generations of 400
    assert engine.generation_tokens_total - before_tokens < 100 * 400 / 4
    assert elapsed < 30
    m = metrics(server.url)
    assert m['athena_http_requests_total{endpoint="/v1/chat/completions",status="200"}'] - before_ok == 50
    assert m["athena_requests_running"] == 0 and m["athena_kv_cache_blocks_used"] == 0


def test_stream_with_n_choices_cancels_all_of_them(server):
    engine = server.app.state.engine
    before = len(engine.cancelled)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await open_read_close(http, "/v1/chat/completions", {**LONG_CHAT, "n": 4}, lines=6)

    asyncio.run(run())
    wait_until(lambda: engine_idle(server), 5.0, "the engine to go idle")
    assert len(engine.cancelled) - before == 4


def test_non_streaming_disconnect_cancels(server):
    engine = server.app.state.engine
    before_cancelled, before_tokens = len(engine.cancelled), engine.generation_tokens_total
    body = {**LONG_CHAT, "stream": False, "n": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.1))
    wait_until(lambda: engine_idle(server), 5.0, "the engine to go idle")
    assert len(engine.cancelled) - before_cancelled == 2
    assert engine.generation_tokens_total - before_tokens < 2 * 400
    assert metrics(server.url).get('athena_http_requests_total{endpoint="/v1/chat/completions",status="499"}', 0) >= 1


def test_disconnect_while_waiting_for_a_slot():
    engine = FakeEngine(model_name=MODEL, max_model_len=512, max_num_seqs=1, step_delay_s=0.01)  # holds ~4 s
    s = serve_engine(engine)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as http:
            async with http.stream("POST", "/v1/chat/completions", json=LONG_CHAT) as running:
                assert running.status_code == 200
                for path, body in (
                    ("/v1/chat/completions", LONG_CHAT),
                    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5}),
                ):
                    waiting = asyncio.create_task(http.post(path, json=body))
                    await asyncio.to_thread(wait_until, lambda: s.call(engine.stats).waiting == 1, 5.0, "waiting")
                    waiting.cancel()  # the client gives up before its request was admitted
                    await asyncio.to_thread(wait_until, lambda: s.call(engine.stats).waiting == 0, 5.0, "withdrawn")
                assert s.call(engine.stats).running == 1, "the running request ended too soon for this test"

    try:
        asyncio.run(run())
        wait_until(lambda: engine_idle(s), 5.0, "the engine to go idle")
        assert len(engine.cancelled) == 3 and not engine.finished
    finally:
        s.stop()


def read_events(r: httpx.Response) -> list[str]:
    return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_shutdown_drains_running_streams():
    engine = FakeEngine(model_name=MODEL, max_model_len=512, step_delay_s=0.004)
    s = serve_engine(engine, drain_timeout_s=5.0)
    body = {**LONG_CHAT, "max_tokens": 60, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        stopper = threading.Thread(target=s.stop)
        stopper.start()  # shutdown begins while the stream runs
        wait_until(lambda: s.app.state.draining, 5.0, "shutdown to begin")
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    stopper.join(20)
    assert not stopper.is_alive()
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["usage"]["completion_tokens"] == 60  # it ran to the end
    assert engine.shutdown_calls == [5.0] and len(engine.finished) == 1 and not engine.cancelled
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health", timeout=2)


def test_shutdown_drain_is_bounded():
    engine = FakeEngine(model_name=MODEL, max_model_len=4096, step_delay_s=0.004)
    s = serve_engine(engine, drain_timeout_s=0.3)
    body = {**LONG_CHAT, "max_tokens": 3000}  # ~12 s if it were allowed to finish
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        start = time.monotonic()
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        events = [line[6:] for line in lines if line.startswith("data: ")]  # ends cleanly, never cut
    stopper.join(20)
    assert not stopper.is_alive() and time.monotonic() - start < 5
    assert len(events) < 3000 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "service_unavailable"
    assert not engine.active and engine.shutdown_calls == [0.3]
    assert len(engine.cancelled) == 1
