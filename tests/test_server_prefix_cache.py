"""The prefix cache through the server: the hit counters on /metrics, the same answers with
--no-prefix-cache (the real AsyncEngine on the fake runner, a real uvicorn)."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import tiny_chat_tokenizer
from fake_runner import FakeRunner
from server_fixtures import engine_idle, metrics, serve_engine, wait_until

from athena_runtime.engine import AsyncEngine
from athena_runtime.engine_settings import EngineSettings

MODEL = "tiny"
SYSTEM = {"role": "system", "content": "Paged attention keeps the KV cache in blocks of sixteen tokens. " * 3}


def chat(url: str, question: str) -> tuple[str, int]:
    body = {
        "model": MODEL,
        "messages": [SYSTEM, {"role": "user", "content": question}],
        "max_tokens": 6,
        "temperature": 0,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("on", [True, False])
def test_prefix_cache_counters_on_metrics(on):
    tok = tiny_chat_tokenizer()
    runner = FakeRunner(
        vocab_size=len(tok), num_blocks=128, block_size=4, max_model_len=256, banned=(tok.eos_token_id,)
    )
    engine = AsyncEngine(
        runner,
        tok,
        EngineSettings(block_size=4, max_num_seqs=4, prefix_cache=on),
        MODEL,
        eos_token_ids=(tok.eos_token_id,),
    )
    server = serve_engine(engine)
    try:
        first, n1 = chat(server.url, "Hello there, how are you today?")
        m = metrics(server.url)
        assert (m["athena_prefix_cache_queries_total"], m["athena_prefix_cache_hits_total"]) == (n1 if on else 0, 0)
        second, n2 = chat(server.url, "Stop here.")
        m = metrics(server.url)
        hits = m["athena_prefix_cache_hits_total"]
        if on:  # the second request starts on the system prompt's blocks
            assert m["athena_prefix_cache_queries_total"] == n1 + n2 and 40 <= hits < n2 and hits % 4 == 0
        else:
            assert m["athena_prefix_cache_queries_total"] == hits == 0
        assert chat(server.url, "Hello there, how are you today?")[0] == first  # the same answer again
        wait_until(lambda: engine_idle(server), 5.0, "the engine to go idle")
    finally:
        server.stop()
