"""The server on the real AsyncEngine (scheduler, block manager, sampler, stop strings, step thread)
driven by the fake model runner: checks that the server and the engine agree on the interface."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from fake_engine import tiny_chat_tokenizer
from fake_runner import FakeRunner
from server_fixtures import engine_idle, serve_engine, wait_until

from athena_runtime.engine import AsyncEngine
from athena_runtime.engine_settings import EngineSettings

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Say hello."}]
MAX_NUM_SEQS, MAX_QUEUE = 4, 4


@pytest.fixture(scope="module")
def server():
    tok = tiny_chat_tokenizer()
    runner = FakeRunner(
        vocab_size=len(tok), num_blocks=512, block_size=4, max_model_len=256, banned=(tok.eos_token_id,), delay_s=0.004
    )
    engine = AsyncEngine(
        runner,
        tok,
        EngineSettings(block_size=4, max_num_seqs=MAX_NUM_SEQS, max_queue=MAX_QUEUE, max_num_batched_tokens=256),
        MODEL,
        eos_token_ids=(tok.eos_token_id,),
    )
    s = serve_engine(engine)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def test_chat_stream_matches_non_stream_and_seeds(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, seed=5, n=2, temperature=0.9)
    assert [c.finish_reason for c in r.choices] == ["length", "length"] and r.usage.completion_tokens == 24
    for i, choice in enumerate(r.choices):
        alone = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=12, seed=5 + i, temperature=0.9
        )
        assert alone.choices[0].message.content == choice.message.content
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=12,
            seed=5,
            temperature=0.9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12


def test_stop_and_logprobs(client):
    full = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=30, temperature=0).choices[0].text
    stop = full[8:10]
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=30, temperature=0, stop=stop)
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    lp = (
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
        )
        .choices[0]
        .logprobs.content
    )
    assert len(lp) == 5 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)


def test_stream_disconnects_free_kv_blocks(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True}

    async def one(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"content"' in line and '""' not in line:
                    break  # got one token: leave

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            for _ in range(5):
                await asyncio.gather(*(one(http) for _ in range(MAX_NUM_SEQS)))

    asyncio.run(run())
    wait_until(lambda: engine_idle(server), 5.0, "the engine to go idle")


def test_queue_full_is_429(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 220, "stream": True}  # ~1 s each

    async def hold(http: httpx.AsyncClient, release: asyncio.Event) -> int:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            await release.wait()
            return r.status_code

    async def run() -> httpx.Response:
        release = asyncio.Event()
        engine = server.app.state.engine
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            held = []
            for i in range(MAX_NUM_SEQS + MAX_QUEUE):  # one at a time: 4 running, then 4 waiting
                held.append(asyncio.create_task(hold(http, release)))
                want = (min(i + 1, MAX_NUM_SEQS), max(0, i + 1 - MAX_NUM_SEQS))
                await asyncio.to_thread(
                    wait_until,
                    lambda want=want: (lambda st: (st.running, st.waiting))(server.call(engine.stats)) == want,
                    5.0,
                    f"running, waiting == {want}",
                )
            refused = await http.post("/v1/chat/completions", json=body)
            release.set()
            for task in held[:MAX_NUM_SEQS]:
                assert await task == 200
            for task in held[MAX_NUM_SEQS:]:  # still queued: the client gives up
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            return refused

    refused = asyncio.run(run())
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    wait_until(lambda: engine_idle(server), 5.0, "the engine to go idle")


def test_context_length_from_the_engine(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * 250, max_tokens=10)
    assert e.value.code == "context_length_exceeded"
