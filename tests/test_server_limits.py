"""Small requests that ask for a lot of work: refused before the work when they can never succeed
(too many choices, a prompt longer than the context can hold), and otherwise prepared off the event
loop, so /health and other clients' streams keep going while they are processed."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fake_engine import FakeEngine
from server_fixtures import HealthProbe, engine_idle, serve_engine, wait_until

MODEL = "fake-model"
HEALTH_BOUND_S = 0.5  # the longest /health may take while a hostile request is processed


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.fixture(scope="module")
def server():
    s = serve_engine(FakeEngine(model_name=MODEL, max_model_len=256, max_queue=64), max_body_bytes=8 << 20)
    yield s
    s.stop()


def test_hostile_choice_count_is_refused_at_once_and_health_stays_up(server):
    body = {"model": MODEL, "prompt": ["a"] * 2048, "n": 128, "max_tokens": 1}  # 262,144 choices, 10 KB
    with HealthProbe(server.url) as probe:
        time.sleep(0.1)
        start = time.monotonic()
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        took = time.monotonic() - start
        time.sleep(0.1)
    err = error_of(r, 400)
    assert err["param"] == "n" and "262144 choices" in err["message"] and "at most 64" in err["message"], err
    assert took < 2.0, f"refusing took {took:.1f} s"
    assert probe.worst < HEALTH_BOUND_S and set(probe.statuses) == {200}, probe.worst
    wait_until(lambda: engine_idle(server), what="engine idle")


@pytest.mark.parametrize(
    "path, base",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ],
)
def test_choice_cap_defaults_to_the_queue_size(path, base):
    s = serve_engine(FakeEngine(model_name=MODEL, max_queue=5))
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            assert len(http.post(path, json={**base, "n": 5}).json()["choices"]) == 5
            err = error_of(http.post(path, json={**base, "n": 6}), 400)
            assert err["param"] == "n" and "at most 5" in err["message"], err
        wait_until(lambda: engine_idle(s), what="engine idle")
    finally:
        s.stop()


def test_choice_cap_setting_counts_prompts_times_n():
    s = serve_engine(FakeEngine(model_name=MODEL, max_queue=64), max_choices=6)
    body = {"model": MODEL, "max_tokens": 2}
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            for prompts, n in ((["a", "b"], 3), (["a", "b", "c", "d", "e", "f"], 1), ([[5, 6]], 6)):
                r = http.post("/v1/completions", json={**body, "prompt": prompts, "n": n})
                assert r.status_code == 200 and len(r.json()["choices"]) == 6, r.text
            for prompts, n in ((["a", "b"], 4), (["a"] * 7, 1), ([[5], [6], [7]], 3)):
                err = error_of(http.post("/v1/completions", json={**body, "prompt": prompts, "n": n}), 400)
                assert err["param"] == "n" and "at most 6" in err["message"], err
            chat = {**body, "messages": [{"role": "user", "content": "hi"}]}
            assert http.post("/v1/chat/completions", json={**chat, "n": 6}).status_code == 200
            error_of(http.post("/v1/chat/completions", json={**chat, "n": 7}), 400)
        wait_until(lambda: engine_idle(s), what="engine idle")
    finally:
        s.stop()


@pytest.mark.parametrize(
    "path, make",
    [
        ("/v1/completions", lambda text: {"prompt": text}),
        ("/v1/completions", lambda text: {"prompt": ["hi", text]}),
        ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}]}),
        (
            "/v1/chat/completions",
            lambda text: {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]},
        ),
    ],
)
def test_megabyte_prompt_is_refused_without_tokenizing(server, path, make):
    text = "hello " * 1_250_000  # 7.5 MB: the tiny tokenizer would take minutes over it
    body = json.dumps({"model": MODEL, "max_tokens": 1, **make(text)}).encode()
    with HealthProbe(server.url) as probe:
        start = time.monotonic()
        r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=120)
        took = time.monotonic() - start
    err = error_of(r, 400)
    assert err["code"] == "context_length_exceeded" and "256 tokens" in err["message"], err
    assert took < 3.0, f"refusing took {took:.1f} s"
    assert probe.worst < HEALTH_BOUND_S, probe.worst


@pytest.mark.parametrize(
    "path, make",
    [
        ("/v1/completions", lambda text: {"prompt": text}),
        ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}] * 2}),
    ],
)
def test_long_prompt_is_tokenized_off_the_event_loop(path, make):
    """A prompt that fits but takes seconds to tokenize: /health answers all the while."""
    engine = FakeEngine(model_name=MODEL, max_model_len=4_000_000)
    s = serve_engine(engine, max_body_bytes=8 << 20)
    text = "hello world " * 150_000  # 1.8M characters, 750,000 tokens: seconds for the tiny tokenizer
    try:
        with HealthProbe(s.url) as probe:
            time.sleep(0.1)
            start = time.monotonic()
            r = httpx.post(f"{s.url}{path}", json={"model": MODEL, "max_tokens": 1, **make(text)}, timeout=120)
            took = time.monotonic() - start
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] >= 250_000
        assert took > 1.0, f"the prompt took only {took:.2f} s: too quick to show anything"
        # on the event loop, /health would wait for the whole tokenization (bounds relative to it: a loaded
        # machine slows both)
        assert probe.worst < min(HEALTH_BOUND_S, took / 4), f"/health took {probe.worst:.2f} s, the prompt {took:.2f} s"
    finally:
        s.stop()


def test_character_bound_boundary_and_a_prompt_of_the_longest_tokens_still_fits():
    engine = FakeEngine(model_name=MODEL, max_model_len=64)
    s = serve_engine(engine)
    tok = engine.tokenizer
    pieces = [tok.decode([i]) for i in range(len(tok))]
    longest = max((p for p in pieces if "<|" not in p), key=len)
    bound = 64 * max(len(p) for p in tok.convert_ids_to_tokens(list(range(len(tok)))))  # no normalizer: x 1
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:

            def post(prompt: str) -> httpx.Response:
                return http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})

            fits = longest * (60 // len(tok.encode(longest)))
            assert len(tok.encode(fits)) <= 62
            assert post(fits).status_code == 200  # the longest tokens, as many as fit: served
            at = error_of(post("x" * bound), 400)  # at the bound: tokenized, then too long
            assert "you requested" in at["message"] and at["code"] == "context_length_exceeded", at
            over = error_of(post("x" * (bound + 1)), 400)  # over it: refused without tokenizing
            assert f"is {bound + 1} characters long" in over["message"] and over["code"] == "context_length_exceeded"
    finally:
        s.stop()
