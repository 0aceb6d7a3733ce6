"""A request's choices are queued all together or not at all, on the real
AsyncEngine (FakeRunner): a refused request leaves nothing queued, `n` above --max-queue is a 400
(it could never be admitted), and a client resending such requests costs a normal client nothing."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fake_engine import tiny_chat_tokenizer
from fake_runner import FakeRunner
from server_fixtures import LiveServer, engine_idle, serve_engine, wait_until

from athena_runtime.engine import AsyncEngine
from athena_runtime.engine_settings import EngineSettings

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2}


def real_engine(max_num_seqs: int, max_queue: int, step_s: float) -> AsyncEngine:
    tok = tiny_chat_tokenizer()
    runner = FakeRunner(
        vocab_size=len(tok), num_blocks=512, block_size=4, max_model_len=256, banned=(tok.eos_token_id,), delay_s=step_s
    )
    settings = EngineSettings(block_size=4, max_num_seqs=max_num_seqs, max_queue=max_queue, max_num_batched_tokens=256)
    return AsyncEngine(runner, tok, settings, MODEL, eos_token_ids=(tok.eos_token_id,))


@pytest.fixture
def serve():
    servers: list[LiveServer] = []

    def start(engine: AsyncEngine, **settings) -> LiveServer:
        servers.append(serve_engine(engine, **settings))
        return servers[-1]

    yield start
    for s in servers:
        wait_until(lambda s=s: engine_idle(s), 10.0, "the engine to go idle")
        s.stop()


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2}),
    ],
)
def test_n_up_to_the_queue_size_runs_and_above_it_is_400(serve, path, body):
    s = serve(real_engine(max_num_seqs=2, max_queue=4, step_s=0.001))
    with httpx.Client(base_url=s.url, timeout=30) as http:
        r = http.post(path, json={**body, "n": 4})
        assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text
        r = http.post(path, json={**body, "n": 5})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "n" and "retry-after" not in r.headers
    if path == "/v1/completions":  # two prompts x n=2 fills the queue; x n=3 is over it
        with httpx.Client(base_url=s.url, timeout=30) as http:
            assert http.post(path, json={**body, "prompt": ["a", "b"], "n": 2}).status_code == 200
            assert http.post(path, json={**body, "prompt": ["a", "b"], "n": 3}).status_code == 400


def test_a_refused_request_leaves_nothing_queued(serve):
    # slow steps (0.3 s): a request's jobs queued one by one would stay queued until the next step
    engine = real_engine(max_num_seqs=1, max_queue=3, step_s=0.3)
    s = serve(engine)

    def waiting() -> int:
        return s.call(engine.stats).waiting

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
            long = {**CHAT, "max_tokens": 200, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=long) as running:
                assert running.status_code == 200  # holds the only slot
                queued = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))
                await asyncio.to_thread(wait_until, lambda: waiting() == 1, 5.0, "one waiting request")
                refused = await http.post("/v1/chat/completions", json={**CHAT, "n": 3})  # 1 + 3 > 3
                assert refused.status_code == 429, refused.text
                assert waiting() == 1, "the refused request left choices queued"
                filling = asyncio.create_task(http.post("/v1/chat/completions", json={**CHAT, "n": 2}))  # 1 + 2 == 3
                await asyncio.to_thread(wait_until, lambda: waiting() == 3 or filling.done(), 5.0, "the queue full")
                assert not filling.done(), filling.result().text
                assert (await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})).status_code == 429
            # the running client left: the queued requests run
            assert (await queued).status_code == 200
            assert len((await filling).json()["choices"]) == 2

    asyncio.run(scenario())


def test_a_client_resending_too_many_choices_costs_a_normal_client_nothing(serve):
    engine = real_engine(max_num_seqs=2, max_queue=4, step_s=0.01)
    s = serve(engine)
    hostile = {**CHAT, "n": 5, "max_tokens": 50}  # more choices than the queue holds (the issue: n=20, queue 16)

    async def normal_client(http: httpx.AsyncClient) -> tuple[list[int], float]:
        start, statuses = time.monotonic(), []
        for _ in range(8):
            statuses.append((await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8})).status_code)
        return statuses, time.monotonic() - start

    async def hostile_client(http: httpx.AsyncClient, stop: asyncio.Event) -> list[int]:
        statuses = []
        while not stop.is_set():
            statuses.append((await http.post("/v1/chat/completions", json=hostile)).status_code)
            await asyncio.sleep(0.02)
        return statuses

    async def scenario() -> tuple[float, list[int], float, list[int]]:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
            alone_statuses, alone = await normal_client(http)
            stop = asyncio.Event()
            attack = asyncio.create_task(hostile_client(http, stop))
            statuses, loaded = await normal_client(http)
            stop.set()
            return alone, alone_statuses + statuses, loaded, await attack

    alone, statuses, loaded, hostile_statuses = asyncio.run(scenario())
    assert set(statuses) == {200}, statuses
    assert hostile_statuses and set(hostile_statuses) == {400}, hostile_statuses
    assert loaded < 3 * alone + 1.0, (alone, loaded)
