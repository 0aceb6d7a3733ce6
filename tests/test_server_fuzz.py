"""Property-based fuzz of both POST endpoints: random bodies (plausible fields with random types and
values, unknown fields, raw bytes) never get a 5xx, every refusal is an OpenAI-shaped error, every
200 is a well-formed response or stream, and the server is healthy and idle afterwards."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from fake_engine import FakeEngine
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from server_fixtures import engine_idle, serve_engine, wait_until

MODEL = "fake-model"

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
any_json = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)


part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)})
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "user", "assistant"]),
        "content": st.text(max_size=60) | st.lists(part, max_size=3),
    },
    optional={"name": st.text(max_size=5)},
)
unit = st.floats(min_value=0.01, max_value=1.0)
stop = st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=4)

# Valid values; `one_wild` below puts one field out of range or of the wrong type.
COMMON = {
    "model": st.sampled_from([MODEL] * 8 + ["gpt-4o"]),
    "n": st.integers(1, 3),
    "max_tokens": st.integers(1, 30),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": unit,
    "min_p": unit,
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": stop,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logit_bias": st.just({}),
    "user": st.text(max_size=10),
}
CHAT = {
    **COMMON,
    "messages": st.lists(message, min_size=1, max_size=3),
    "max_completion_tokens": st.integers(1, 30),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "tool_choice": st.just("none"),
    "response_format": st.just({"type": "text"}),
}
COMPLETION = {
    **COMMON,
    "prompt": (
        st.text(min_size=1, max_size=60)
        | st.lists(st.integers(0, 420), min_size=1, max_size=20)
        | st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3)
        | st.lists(st.lists(st.integers(0, 399), min_size=1, max_size=6), min_size=1, max_size=3)
    ),
    "echo": st.booleans(),
    "logprobs": st.integers(0, 5),
    "best_of": st.integers(1, 2),
    "suffix": st.just(""),
}
# Fields we refuse or that are absent above, for the "one wild field" bodies.
EXTRA_NAMES = [
    "tools",
    "functions",
    "function_call",
    "modalities",
    "audio",
    "logit_bias",
    "suffix",
    "best_of",
    "response_format",
    "tool_choice",
    "brand_new_field",
]


def consistent(body: dict) -> dict:
    """Makes a body of valid fields valid together (what the server checks across fields)."""
    if "stream_options" in body:
        body["stream"] = True
    if "top_logprobs" in body and "messages" in body:
        body["logprobs"] = True
    if body.get("echo") and "logprobs" in body:
        del body["logprobs"]
    if "best_of" in body:
        body["best_of"] = body.get("n", 1)
    return body


def bodies(fields: dict, required: tuple[str, ...]) -> st.SearchStrategy:
    """JSON bodies: plausible (required fields always there, others half the time), plausible with one
    field of any type, random fields of random types, or not a JSON object at all."""
    plausible = st.fixed_dictionaries(
        {k: fields[k] for k in required}, optional={k: v for k, v in fields.items() if k not in required}
    ).map(consistent)
    one_wild = st.builds(
        lambda body, name, value: {**body, name: value},
        plausible,
        st.sampled_from(sorted(fields) + EXTRA_NAMES),
        any_json,
    )
    random_fields = st.dictionaries(
        st.sampled_from(sorted(fields) + EXTRA_NAMES) | st.text(max_size=8), any_json, max_size=6
    )
    as_json = st.one_of(plausible, plausible, plausible, one_wild, one_wild, random_fields, any_json)
    return st.one_of(as_json.map(lambda v: json.dumps(v).encode()), st.binary(max_size=80))


@pytest.fixture(scope="module")
def server():
    s = serve_engine(FakeEngine(model_name=MODEL, max_model_len=128, max_num_seqs=16, step_delay_s=0.0))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def check(http: httpx.Client, path: str, body: bytes) -> None:
    with http.stream("POST", path, content=body, headers={"content-type": "application/json"}) as r:
        raw = r.read()
    assert r.status_code < 500, raw
    event(f"status {r.status_code} {r.headers.get('content-type', '')[:12]}")
    if r.status_code != 200:
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        # SSE lines end at CR, LF or CRLF only (str.splitlines would also split at U+0085, U+2028, ...)
        events = [line[6:] for line in re.split(r"\r\n|\r|\n", raw.decode()) if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            chunk = json.loads(e)
            assert "error" not in chunk, chunk
            assert chunk["object"] in ("chat.completion.chunk", "text_completion")
    else:
        response = json.loads(raw)
        assert response["choices"] and response["usage"]["total_tokens"] >= response["usage"]["prompt_tokens"]


FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@FUZZ
@given(body=bodies(CHAT, ("model", "messages")))
def test_fuzz_chat(http, body):
    check(http, "/v1/chat/completions", body)


@FUZZ
@given(body=bodies(COMPLETION, ("model", "prompt")))
def test_fuzz_completions(http, body):
    check(http, "/v1/completions", body)


def test_healthy_and_idle_after_fuzzing(server, http):
    # runs after the fuzz tests in this module (pytest keeps file order)
    assert http.get("/health").status_code == 200
    wait_until(lambda: engine_idle(server), 5.0, "the engine to go idle")
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200
