"""The server against the official `openai` client, over a real uvicorn on 127.0.0.1 (FakeEngine)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from server_fixtures import serve_engine

MODEL = "fake-model"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server():
    s = serve_engine(FakeEngine(model_name=MODEL, max_model_len=256, step_delay_s=0.0005))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def chat_text(client, **kw) -> str:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, **kw)
    return r.choices[0].message.content


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


def test_chat_completion_usage_and_length(client, server):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    tok = server.app.state.engine.tokenizer
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    # greedy is deterministic; max_completion_tokens wins over max_tokens
    assert chat_text(client, max_tokens=7, temperature=0) == choice.message.content
    r2 = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=50, max_completion_tokens=3, temperature=0
    )
    assert r2.usage.completion_tokens == 3


def test_chat_without_max_tokens_fills_the_context(client, server):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=1)
    assert r.usage.total_tokens == server.app.state.engine.max_model_len
    assert r.choices[0].finish_reason == "length"


def test_content_parts_equal_string_content(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}]}]
    a = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=5, seed=3)
    b = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=5, seed=3
    )
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


def test_seed_reproducibility_and_n(client):
    one = chat_text(client, max_tokens=12, seed=42, temperature=0.8)
    assert chat_text(client, max_tokens=12, seed=42, temperature=0.8) == one
    assert chat_text(client, max_tokens=12, seed=43, temperature=0.8) != one
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, seed=42, temperature=0.8, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    # with a seed, choice i uses seed + i
    assert [c.message.content for c in r.choices] == [
        chat_text(client, max_tokens=12, seed=42 + i, temperature=0.8) for i in range(3)
    ]
    assert r.usage.completion_tokens == 36


def test_chat_stream(client, server):
    full = chat_text(client, max_tokens=20, seed=7)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, seed=7, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert all(c.usage is None for c in chunks)


def test_chat_stream_include_usage_and_done(server):
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 5,
        "stream": True,
        "n": 2,
        "seed": 1,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 10
    for i in range(2):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"] == {}


def test_stop_strings(client):
    full = chat_text(client, max_tokens=40, seed=11)
    stop = full[10:13]
    expected = full[: full.find(stop)]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=11, stop=[stop, "\x00"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    streamed = list(
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=11, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, seed=5, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, seed=5)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content


def test_extras_and_accepted_fields(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0.5,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        user="someone",
        tool_choice="none",
        response_format={"type": "text"},
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "some_future_field": {"x": 1}},
    )
    assert r.usage.completion_tokens == 4


def test_completion(client, server):
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, seed=2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    tok = server.app.state.engine.tokenizer
    ids = tok.encode("Hello world")
    assert r.usage.prompt_tokens == len(ids)
    # token ids give the same prompt, hence the same completion
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, seed=2)
    assert by_ids.choices[0].text == r.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, seed=2, echo=True)
    assert echoed.choices[0].text == "Hello world" + r.choices[0].text


def test_completion_default_max_tokens_is_16(client):
    assert client.completions.create(model=MODEL, prompt="Hi", seed=1).usage.completion_tokens == 16


def test_completion_batch_and_n(client):
    prompts = ["Hello world", "The quick brown fox"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, n=2, seed=9)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    single = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, n=2, seed=9).choices for p in prompts]
    assert [c.text for c in r.choices] == [c.text for cs in single for c in cs]
    assert r.usage.prompt_tokens == sum(
        client.completions.create(model=MODEL, prompt=p, max_tokens=1).usage.prompt_tokens for p in prompts
    )
    lists = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3)
    assert len(lists.choices) == 2 and lists.usage.prompt_tokens == 5


def test_completion_stream(client):
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=10, seed=4).choices[0].text
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=10, seed=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    echoed = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=10, seed=4, stream=True, echo=True))
    assert "".join(c.choices[0].text for c in echoed) == "Hello" + full


def test_completion_legacy_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, seed=8, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and all(b > a for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    stop = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, seed=8, logprobs=2, stream=True))
    offsets = [o for c in stop for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset
