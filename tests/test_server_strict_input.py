"""Request bodies are checked as strictly as OpenAI checks them: text that is not Unicode (a lone
surrogate escape) and values of the wrong JSON type are a 400 naming the field, never a 500 and
never quietly converted."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import FakeEngine
from server_fixtures import serve_engine

MODEL = "fake-model"
CHAT = '{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'
COMPLETION = '{"model": "fake-model", "prompt": "hi", "max_tokens": 2'


@pytest.fixture(scope="module")
def http():
    s = serve_engine(FakeEngine(model_name=MODEL))
    with httpx.Client(base_url=s.url, timeout=30) as c:
        yield c
    s.stop()


def post_raw(http: httpx.Client, path: str, body: str) -> httpx.Response:
    """`body` is sent as written (json.dumps would not keep a lone surrogate escape)."""
    return http.post(path, content=body.encode("ascii"), headers={"content-type": "application/json"})


def error_400(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/v1/chat/completions",
            '{"model": "fake-model", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "messages.[0].content",
        ),
        (
            "/v1/chat/completions",
            '{"model": "fake-model", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
            "messages.[0].content",
        ),
        ("/v1/chat/completions", '{"model": "fake-\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (
            "/v1/chat/completions",
            '{"model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
            "messages.[0].content.[0].text",
        ),
        ("/v1/chat/completions", CHAT + ', "stop": ["ok", "x\\ud83d"]}', "stop.[1]"),
        ("/v1/chat/completions", CHAT + ', "user": "\\ud800"}', "user"),
        ("/v1/completions", '{"model": "fake-model", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"model": "fake-model", "prompt": ["ok", "a\\ud800b"]}', "prompt.[1]"),
        ("/v1/completions", '{"model": "\\udbff", "prompt": "hi"}', "model"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(http, path, body, param):
    err = error_400(post_raw(http, path, body))
    assert err["param"] == param and "surrogate" in err["message"], err


def test_surrogate_pairs_are_text(http):
    # \ud83d\ude00 is one character (an emoji), written as a pair: valid
    r = post_raw(
        http,
        "/v1/chat/completions",
        '{"model": "fake-model", "messages": [{"role": "user", "content": "a\\ud83d\\ude00b"}], "max_tokens": 2}',
    )
    assert r.status_code == 200, r.text
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize(
    "path, change, param",
    [
        ("/v1/chat/completions", '"max_tokens": "10"', "max_tokens"),
        ("/v1/chat/completions", '"max_tokens": true', "max_tokens"),
        ("/v1/chat/completions", '"max_tokens": 10.5', "max_tokens"),
        ("/v1/chat/completions", '"max_completion_tokens": "5"', "max_completion_tokens"),
        ("/v1/chat/completions", '"stream": "yes"', "stream"),
        ("/v1/chat/completions", '"stream": 1', "stream"),
        ("/v1/chat/completions", '"n": "2"', "n"),
        ("/v1/chat/completions", '"temperature": "0.5"', "temperature"),
        ("/v1/chat/completions", '"temperature": true', "temperature"),
        ("/v1/chat/completions", '"seed": "1"', "seed"),
        ("/v1/chat/completions", '"logprobs": "true"', "logprobs"),
        ("/v1/chat/completions", '"logprobs": true, "top_logprobs": "2"', "top_logprobs"),
        (
            "/v1/chat/completions",
            '"stream": true, "stream_options": {"include_usage": "yes"}',
            "stream_options.include_usage",
        ),
        ("/v1/chat/completions", '"user": 5', "user"),
        ("/v1/completions", '"echo": "yes"', "echo"),
        ("/v1/completions", '"logprobs": "1"', "logprobs"),
        ("/v1/completions", '"max_tokens": "2"', "max_tokens"),
    ],
)
def test_wrong_json_types_are_400_not_converted(http, path, change, param):
    base = CHAT if path == "/v1/chat/completions" else COMPLETION
    err = error_400(post_raw(http, path, base + ", " + change + "}"))
    assert err["param"] == param, err


def test_integers_are_numbers(http):
    r = post_raw(http, "/v1/chat/completions", CHAT + ', "temperature": 1, "top_p": 1, "presence_penalty": 0}')
    assert r.status_code == 200, r.text
