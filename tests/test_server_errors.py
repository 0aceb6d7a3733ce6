"""Every error the server sends, in OpenAI's shape and with OpenAI's status codes (raw httpx)."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from fake_engine import FakeEngine
from server_fixtures import LiveServer, engine_idle, make_settings, serve_engine, wait_until

import server.app as app_module
from server.app import create_app

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def server():
    s = serve_engine(FakeEngine(model_name=MODEL, max_model_len=64), max_body_bytes=BODY_LIMIT)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict:
    """The error object of an OpenAI-shaped error response with this status."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    for leak in ("Traceback", 'File "', ".py", "/work", "site-packages", "Exception(", "Error("):
        assert leak not in r.text, r.text
    return body["error"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    "raw", [b"{bad json", b"", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"model": "fake-model", "messages": [}']
)
def test_malformed_body_is_400(http, path, raw):
    err = error_of(http.post(path, content=raw, headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "change, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"seed": 2**70}, "seed"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stream": "yes please"}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages.[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.[0]"),
        ({"messages": [{"content": "x"}]}, "messages.[0].role"),
        ({"messages": [{"role": "user"}]}, "messages.[0]"),
        ({"model": None}, "model"),
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_invalid_chat_fields_are_400_naming_the_param(http, change, param):
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, **change}), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_missing_model_is_400(http):
    body = dict(CHAT)
    del body["model"]
    assert error_of(http.post("/v1/chat/completions", json=body), 400)["param"] == "model"


@pytest.mark.parametrize(
    "change, param",
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"top_logprobs": 2}, "top_logprobs"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
                ]
            },
            "messages.[0].content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
                ]
            },
            "messages.[0].content",
        ),
    ],
)
def test_unsupported_chat_params_are_400_naming_them(http, change, param):
    err = error_of(http.post("/v1/chat/completions", json={**CHAT, **change}), 400)
    assert err["param"] == param, err
    assert "support" in err["message"] or "needs" in err["message"]


@pytest.mark.parametrize(
    "change, param",
    [
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logit_bias": {"99999": -100}}, "logit_bias"),
        ({"logit_bias": {"one": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [True, False]}, "prompt"),
        ({"prompt": [0, 10**6]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"logprobs": 50}, "logprobs"),
    ],
)
def test_bad_completion_params_are_400(http, change, param):
    err = error_of(http.post("/v1/completions", json={**COMPLETION, **change}), 400)
    assert err["param"] == param, err


def test_accepted_no_op_fields_and_unknown_fields(http):
    ok = {
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "none",
        "logit_bias": {},
        "response_format": {"type": "text"},
        "user": "u",
        "parallel_tool_calls": False,
        "metadata": {"a": "b"},
        "store": False,
        "service_tier": "auto",
        "brand_new_field": [1, 2, 3],
    }
    assert http.post("/v1/chat/completions", json={**CHAT, **ok}).status_code == 200
    assert (
        http.post("/v1/completions", json={**COMPLETION, "best_of": 1, "suffix": "", "whatever": None}).status_code
        == 200
    )


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_unknown_model_is_404(http, path, body):
    err = error_of(http.post(path, json={**body, "model": "gpt-17"}), 404)
    assert err == {
        "message": "The model `gpt-17` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hello world " * 40}]}),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 60}),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**6, "stream": True}),
        ("/v1/completions", {**COMPLETION, "prompt": list(range(70))}),
        ("/v1/completions", {**COMPLETION, "prompt": ["hi", "hello world " * 40]}),
        ("/v1/completions", {**COMPLETION, "max_tokens": 64, "stream": True}),
    ],
)
def test_context_length_exceeded(http, path, body):
    err = error_of(http.post(path, json=body), 400)
    assert err["code"] == "context_length_exceeded" and "maximum context length is 64 tokens" in err["message"]


def test_body_too_large_by_content_length_and_by_stream(http):
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * (2 * BODY_LIMIT)}]}).encode()
    err = error_of(http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large"

    def chunks():  # no Content-Length: sent chunked, counted as it arrives
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    error_of(r, 413)
    # just under the limit is fine
    small = json.dumps({**CHAT, "user": "x" * (BODY_LIMIT - 200)}).encode()
    assert BODY_LIMIT - 100 < len(small) <= BODY_LIMIT
    json_type = {"content-type": "application/json"}
    assert http.post("/v1/chat/completions", content=small, headers=json_type).status_code == 200


def test_body_must_be_json(http):
    err = error_of(
        http.post("/v1/completions", content=json.dumps(COMPLETION).encode(), headers={"content-type": "text/plain"}),
        400,
    )
    assert "Content-Type: application/json" in err["message"]
    error_of(http.post("/v1/completions"), 400)


def test_unknown_route_and_method(http):
    err = error_of(http.post("/v1/embeddings", json={}), 404)
    assert err["type"] == "invalid_request_error" and "/v1/embeddings" in err["message"]
    error_of(http.get("/v2/chat/completions"), 404)
    error_of(http.get("/v1/chat/completions"), 405)
    error_of(http.delete("/v1/models"), 405)


def test_unexpected_engine_failure_is_a_generic_500(server, http):
    engine = server.app.state.engine
    engine.fail_next = RuntimeError("boom at /secret/weights.bin (see Traceback)")
    err = error_of(http.post("/v1/chat/completions", json=CHAT), 500)
    assert err["type"] == "server_error" and "secret" not in err["message"]
    engine.fail_next = KeyError("/secret")
    error_of(http.post("/v1/completions", json={**COMPLETION, "stream": True}), 500)
    assert http.get("/health").status_code == 200


def test_engine_error_finish_mid_request(server, http):
    engine = server.app.state.engine
    engine.error_after_tokens = 2
    try:
        error_of(http.post("/v1/completions", json={**COMPLETION, "max_tokens": 10}), 500)
        with http.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 10, "stream": True}) as r:
            assert r.status_code == 200  # the first token came before the failure
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        engine.error_after_tokens = None
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and "injected" not in err["message"]
    wait_until(lambda: engine_idle(server), what="engine idle")


def test_api_key():
    s = LiveServer(create_app(make_settings(api_key="s3cret-key"), engine=FakeEngine(model_name=MODEL))).start()
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            err = error_of(http.post("/v1/chat/completions", json=CHAT), 401)
            assert err["type"] == "invalid_request_error"
            assert r_headers(http.get("/v1/models"))["www-authenticate"] == "Bearer"
            for header in ("Bearer wrong", "Basic s3cret-key", "Bearer", "s3cret-key", "Bearer s3cret-key-and-more"):
                err = error_of(http.get("/v1/models", headers={"Authorization": header}), 401)
                assert err["code"] == "invalid_api_key" and "s3cret" not in json.dumps(err)
            # auth is checked before the body is even parsed
            error_of(http.post("/v1/completions", content=b"{nope"), 401)
            good = {"Authorization": "Bearer s3cret-key"}
            assert http.post("/v1/chat/completions", json=CHAT, headers=good).status_code == 200
            assert http.get("/v1/models", headers=good).status_code == 200
            # health and metrics stay open (probes, scrapers)
            assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
    finally:
        s.stop()


def r_headers(r: httpx.Response) -> httpx.Headers:
    assert r.status_code == 401
    return r.headers


def test_queue_full_is_429_with_retry_after():
    engine = FakeEngine(model_name=MODEL, max_num_seqs=1, max_queue=1, step_delay_s=0.02)
    s = serve_engine(engine, retry_after_s=3, retry_after_max_s=7)

    async def scenario():
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as http:
            long = {**CHAT, "max_tokens": 60, "stream": True}  # 60 steps of 20 ms: outlasts the checks below
            async with http.stream("POST", "/v1/chat/completions", json=long) as running:
                assert running.status_code == 200  # holds the only slot
                waiting = asyncio.create_task(http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}))
                await asyncio.to_thread(wait_until, lambda: s.call(engine.stats).waiting == 1, 5.0, "a waiting request")
                refused = await http.post("/v1/chat/completions", json=CHAT)
                refused_completion = await http.post("/v1/completions", json={**COMPLETION, "stream": True})
                assert s.call(engine.stats).running == 1, "the running request ended too soon for this test"
            # the client left the running stream: the waiting request gets the slot
            assert (await waiting).status_code == 200
            return refused, refused_completion

    try:
        for r in asyncio.run(scenario()):
            err = error_of(r, 429)
            # nothing has finished yet, so the wait is unknown: the ceiling (test_server_retry_after.py: the estimate)
            assert r.headers["retry-after"] == "7" and err["code"] == "rate_limit_exceeded"
        wait_until(lambda: engine_idle(s), what="engine idle")
    finally:
        s.stop()


def test_503_while_loading_then_ready(monkeypatch):
    release = threading.Event()

    def slow_build(settings):
        assert release.wait(20)
        return FakeEngine(model_name="loaded-model")

    monkeypatch.setattr(app_module, "_build_engine", slow_build)
    s = LiveServer(create_app(make_settings(retry_after_s=2))).start()
    try:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            r = http.get("/health")
            err = error_of(r, 503)
            assert r.headers["retry-after"] == "2" and "loading" in err["message"]
            error_of(http.post("/v1/chat/completions", json={**CHAT, "model": "loaded-model"}), 503)
            error_of(http.get("/v1/models"), 503)
            assert http.get("/metrics").status_code == 200
            release.set()
            wait_until(lambda: http.get("/health").status_code == 200, 10, "the engine to load")
            assert http.post("/v1/chat/completions", json={**CHAT, "model": "loaded-model"}).status_code == 200
    finally:
        release.set()
        s.stop()
    assert s.app.state.engine.shutdown_calls == [5.0]
