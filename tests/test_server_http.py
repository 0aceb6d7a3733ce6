"""HTTP details: HEAD on the probe routes, and paths with a trailing slash
answered directly: never a redirect, whose Location uvicorn would build from the client's Host."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import FakeEngine
from server_fixtures import serve_engine

MODEL = "fake-model"


@pytest.fixture(scope="module")
def http():
    s = serve_engine(FakeEngine(model_name=MODEL), api_key="k3y")
    with httpx.Client(base_url=s.url, timeout=30, follow_redirects=False) as c:
        yield c
    s.stop()


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_head_answers_like_get_without_a_body(http, path):
    r = http.head(path)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-type"] == http.get(path).headers["content-type"]


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/health/", None),
        ("GET", "/v1/models/", None),
        ("GET", f"/v1/models/{MODEL}/", None),
        (
            "POST",
            "/v1/chat/completions/",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ),
        ("POST", "/v1/completions//", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
    ],
)
def test_a_trailing_slash_is_answered_directly_whatever_the_host(http, method, path, body):
    r = http.request(method, path, json=body, headers={"Host": "evil.example", "Authorization": "Bearer k3y"})
    assert r.status_code == 200, (r.status_code, r.headers.get("location"), r.text)
    assert "location" not in r.headers


def test_unknown_paths_with_a_slash_are_still_404(http):
    for path in ("/v1/embeddings/", "/nope/"):
        r = http.get(path, headers={"Host": "evil.example", "Authorization": "Bearer k3y"})
        assert r.status_code == 404 and "location" not in r.headers
    assert http.get("/v1/models/", headers={"Host": "evil.example"}).status_code == 401  # the key is still checked
