"""`athena bench serve`: metric arithmetic on constructed timings, and the whole tool against a small
fake OpenAI-compatible streaming server (FastAPI + uvicorn on 127.0.0.1, known sleeps per token)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import serve
from bench.serve_client import SSEParser, Target, build_payload, chunk_text, v1_base
from bench.serve_metrics import RequestRecord, percentile, stats_ms, summarize

TTFT_S = 0.10  # the fake server's delay before the first token
ITL_S = 0.03  # and between tokens

# ---------------------------------------------------------------------------------------------
# metrics on constructed timings


def test_ttft_tpot_itl_exact_on_constructed_request():
    r = RequestRecord(
        send_s=10.0, chunk_times=(10.5, 10.6, 10.8, 11.1), end_s=11.2, completion_tokens=4, prompt_tokens=7
    )
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(1.2)
    assert r.tpot_s == pytest.approx(0.7 / 3)
    assert r.itl_s == pytest.approx([0.1, 0.2, 0.3])
    # usage wins over the chunk count (a chunk may carry several tokens)
    r8 = RequestRecord(send_s=10.0, chunk_times=(10.5, 10.6, 10.8, 11.1), end_s=11.2, completion_tokens=8)
    assert r8.output_tokens == 8 and r8.tpot_s == pytest.approx(0.7 / 7)
    nousage = RequestRecord(send_s=0.0, chunk_times=(0.2, 0.3), end_s=0.4, prompt_tokens_estimate=5)
    assert nousage.output_tokens == 2 and nousage.input_tokens == 5 and nousage.tpot_s == pytest.approx(0.2)
    one = RequestRecord(send_s=0.0, chunk_times=(0.2,), end_s=0.3)
    assert one.tpot_s is None and one.itl_s == []

    s = summarize([r, nousage, one], duration_s=2.0, concurrency=3)
    assert s.completed == 3 and s.failed == 0 and s.errors == {}
    assert s.ttft_ms.count == 3 and s.ttft_ms.mean == pytest.approx((500 + 200 + 200) / 3)
    assert s.tpot_ms.count == 2 and s.tpot_ms.p50 == pytest.approx((700 / 3 + 200) / 2)
    assert s.itl_ms.count == 4 and s.itl_ms.mean == pytest.approx((100 + 200 + 300 + 100) / 4)
    assert s.e2e_ms.p50 == pytest.approx(400) and s.e2e_ms.p99 == pytest.approx(400 + 800 * 0.98)  # of 300, 400, 1200
    assert s.total_output_tokens == 4 + 2 + 1 and s.total_input_tokens == 7 + 5 + 0
    assert s.requests_per_s == pytest.approx(1.5) and s.output_tokens_per_s == pytest.approx(3.5)
    assert s.token_counts_from == "mixed"


def test_percentiles_of_a_synthetic_stream_match_known_values():
    """1000 requests: TTFT uniform on 100..200 ms, 20 tokens 10 ms apart, in shuffled order."""
    rng = random.Random(1)
    recs = []
    for i in range(1000):
        ttft = 0.100 + 0.100 * i / 999
        send = rng.uniform(0, 10)
        chunks = tuple(send + ttft + 0.010 * k for k in range(20))
        recs.append(RequestRecord(send_s=send, chunk_times=chunks, end_s=chunks[-1], completion_tokens=20))
    rng.shuffle(recs)
    s = summarize(recs, duration_s=10.0, concurrency=64)
    for got, want in ((s.ttft_ms.p50, 150), (s.ttft_ms.p90, 190), (s.ttft_ms.p99, 199), (s.ttft_ms.mean, 150)):
        assert got == pytest.approx(want, rel=0.05)
    assert s.tpot_ms.p50 == pytest.approx(10.0, rel=1e-6) and s.tpot_ms.p99 == pytest.approx(10.0, rel=1e-6)
    assert s.itl_ms.count == 1000 * 19 and s.itl_ms.mean == pytest.approx(10.0, rel=1e-6)
    assert s.e2e_ms.p90 == pytest.approx(190 + 190, rel=0.05)
    assert s.requests_per_s == pytest.approx(100.0) and s.output_tokens_per_s == pytest.approx(2000.0)
    assert s.token_counts_from == "usage"


def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert stats_ms([]).p50 is None
    with pytest.raises(ValueError):
        percentile([], 50)


def test_failed_requests_are_counted_by_kind_and_left_out_of_latencies():
    ok = RequestRecord(send_s=0.0, chunk_times=(0.1, 0.2), end_s=0.3)
    bad = [
        RequestRecord(send_s=0.0, end_s=0.01, error="http_429", error_detail="busy"),
        RequestRecord(send_s=0.0, end_s=0.01, error="http_429"),
        RequestRecord(send_s=0.0, chunk_times=(5.0,), end_s=9.0, error="timeout"),
    ]
    s = summarize([ok, *bad], duration_s=1.0, concurrency=4, unfinished=2)
    assert s.errors == {"http_429": 2, "timeout": 1}
    assert (s.requests, s.completed, s.failed, s.unfinished) == (4, 1, 3, 2)
    assert s.ttft_ms.count == 1 and s.ttft_ms.p99 == pytest.approx(100.0)
    assert s.e2e_ms.p99 == pytest.approx(300.0)
    assert s.error_examples["http_429"] == "busy"
    json.dumps(s.to_dict(), allow_nan=False)


def test_sse_parser_events_comments_multiline_and_flush():
    p = SSEParser()
    assert p.feed(": ping", 0.0) is None
    assert p.feed('data: {"a":', 1.0) is None
    assert p.feed("data: 1}", 2.0) is None
    ev = p.feed("", 3.0)
    assert ev.data == '{"a":\n1}' and ev.t == 1.0 and ev.event is None
    p.feed("event: error", 4.0)
    p.feed("data:{}", 5.0)
    ev = p.flush()
    assert ev.event == "error" and ev.data == "{}" and ev.t == 5.0
    assert p.flush() is None


def test_payload_is_plain_openai_and_extra_body_merges():
    t = Target(base_url="http://127.0.0.1:1/v1", model="m")
    body = build_payload(t, "hi", 5)
    assert body == {
        "model": "m",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
    t2 = Target(base_url="http://127.0.0.1:1/v1", model="m", endpoint="completions", extra_body={"ignore_eos": True})
    body2 = build_payload(t2, "hi", 5)
    assert body2["prompt"] == "hi" and body2["ignore_eos"] is True and "messages" not in body2
    assert t2.url == "http://127.0.0.1:1/v1/completions"
    assert chunk_text({"choices": [{"delta": {"content": "a"}}, {"delta": {}}]}, "chat") == "a"
    assert chunk_text({"choices": [{"text": "b"}]}, "completions") == "b"
    assert v1_base("http://h:1/") == v1_base("http://h:1/v1/") == "http://h:1/v1"


# ---------------------------------------------------------------------------------------------
# loopback guard and arguments


@pytest.mark.parametrize(
    "url,ok",
    [
        ("http://127.0.0.1:8000", True),
        ("http://127.3.4.5:9/v1", True),
        ("http://localhost:8000/", True),
        ("http://[::1]:8000", True),
        ("http://[::ffff:127.0.0.1]:80", True),
        ("https://LOCALHOST.", True),
        ("http://10.0.0.2:8000", False),
        ("http://192.168.1.1", False),
        ("http://example.com:8000", False),
        ("http://127.0.0.1.nip.io", False),
        ("http://0.0.0.0:8000", False),
        ("ftp://127.0.0.1", False),
        ("127.0.0.1:8000", False),
    ],
)
def test_loopback_guard(url, ok):
    assert serve.is_loopback_url(url) is ok


def test_remote_url_is_refused_before_any_request(capsys):
    t0 = time.monotonic()
    rc = serve.main(["--base-url", "http://203.0.113.7:8000", "--model", "m", "--num-prompts", "1", "--json"])
    assert rc == 2 and time.monotonic() - t0 < 2
    cap = capsys.readouterr()
    assert "refusing" in cap.err and "--allow-remote" in cap.err and cap.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["--num-prompts", "0"],
        ["--num-prompts", "10001"],
        ["--concurrency", "0"],
        ["--concurrency", "a,b"],
        ["--request-rate", "-1"],
        ["--extra-body", "[1]"],
        ["--endpoint", "embeddings"],
        ["--timeout-s", "0"],
        ["--concurrency", "2", "--request-rate", "3"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        serve.main(argv)
    assert exc.value.code == 2


def test_every_settings_field_is_a_documented_flag():
    import dataclasses

    from bench.cli import BENCHMARKS

    assert BENCHMARKS["serve"][0] == "bench.serve"
    text = serve.build_parser().format_help()
    for f in dataclasses.fields(serve.ServeBenchSettings):
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata["help"]
    s = serve.parse_settings(["--concurrency", "2,4", "--extra-body", '{"x": 1}', "--no-progress"])
    assert s.concurrency == (2, 4) and s.extra_body == {"x": 1} and s.progress is False and s.request_rate is None


# ---------------------------------------------------------------------------------------------
# the fake server


@dataclass
class FakeState:
    bodies: list = field(default_factory=list)
    headers: list = field(default_factory=list)
    flaky: int = 0
    requests: list = field(default_factory=list)  # (method, path) in arrival order


def _chunk(
    kind: str, text: str | None, usage: dict | None = None, delta: dict | None = None, finish: str | None = None
) -> str:
    """One SSE event; chat events end in CRLF (as sse-starlette writes them), completions in LF."""
    if kind == "chat":
        d = delta if delta is not None else {"content": text}
        choices = [] if text is None and delta is None else [{"index": 0, "delta": d, "finish_reason": finish}]
        obj = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake", "choices": choices}
        end = "\r\n\r\n"
    else:
        choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish}]
        obj = {"id": "c1", "object": "text_completion", "created": 0, "model": "fake", "choices": choices}
        end = "\n\n"
    if usage is not None:
        obj["usage"] = usage
    return f"data: {json.dumps(obj)}{end}"


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models(request: Request):
        state.requests.append(("GET", request.url.path))
        return {"object": "list", "data": [{"id": "fake", "object": "model"}, {"id": "other", "object": "model"}]}

    async def respond(request: Request, kind: str):
        state.requests.append(("POST", request.url.path))
        body = await request.json()
        state.bodies.append(body)
        state.headers.append(dict(request.headers))
        model, n = body["model"], int(body["max_tokens"])
        prompt = body["messages"][0]["content"] if kind == "chat" else body["prompt"]
        if model == "err-429":
            return JSONResponse(
                {"error": {"message": "queue full", "type": "rate_limit"}}, 429, headers={"Retry-After": "1"}
            )
        if model == "flaky":
            state.flaky += 1
        if model == "err-500" or (model == "flaky" and state.flaky % 2 == 0):
            return JSONResponse({"error": {"message": "boom"}}, 500)
        if model == "auth" and request.headers.get("authorization") != "Bearer sekrit":
            return JSONResponse({"error": {"message": "bad key"}}, 401)
        if model == "json":
            return JSONResponse({"choices": [{"message": {"content": "hi"}}]})
        usage = body.get("stream_options", {}).get("include_usage") and model != "nousage"

        async def events():
            if model == "slow":
                await asyncio.sleep(30)
            if model == "garbage":
                yield "data: this is not json\n\n"
                return
            if model == "midstream-error":
                yield _chunk(kind, "x")
                yield 'data: {"error": {"message": "engine died"}}\n\n'
                return
            if kind == "chat":  # an empty role chunk at once, as real servers send: not a token
                yield _chunk(kind, None, delta={"role": "assistant", "content": ""})
            await asyncio.sleep(TTFT_S)
            for i in range(n):
                if i:
                    await asyncio.sleep(ITL_S)
                yield _chunk(kind, f" t{i}")
                if model == "drop" and i == 1:
                    raise RuntimeError("connection dropped on purpose")
                if i == 0:
                    yield ": keep-alive comment\n\n"
            yield _chunk(
                kind, "" if kind == "completions" else None, delta={} if kind == "chat" else None, finish="length"
            )
            if usage:
                yield _chunk(
                    kind,
                    None,
                    {
                        "prompt_tokens": len(prompt.split()),
                        "completion_tokens": n,
                        "total_tokens": len(prompt.split()) + n,
                    },
                )
            if model != "nodone":
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await respond(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, "completions")

    return app


@pytest.fixture(scope="module")
def fake_server():
    state = FakeState()
    # IPPROTO_TCP: asyncio then sets TCP_NODELAY on accepted sockets (no Nagle delay per chunk)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(make_app(state), log_level="critical", lifespan="off", timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def run_json(capsys, argv) -> tuple[int, dict]:
    rc = serve.main([*argv, "--json", "--no-progress"])
    out = capsys.readouterr().out.strip().splitlines()
    return rc, json.loads(out[-1])


# ---------------------------------------------------------------------------------------------
# end to end


def test_end_to_end_timings_json_and_plot(fake_server, capsys, tmp_path):
    url, state = fake_server
    state.bodies.clear()
    png = tmp_path / "serve.png"
    rc, res = run_json(
        capsys,
        [
            "--base-url",
            url,
            "--model",
            "fake",
            "--concurrency",
            "1,4",
            "--num-prompts",
            "8",
            "--input-len",
            "16",
            "--output-len",
            "6",
            "--plot",
            str(png),
        ],
    )
    assert rc == 0
    assert res["bench"] == "serve" and res["model"] == "fake" and res["mode"] == "concurrency"
    assert res["base_url"] == url + "/v1" and res["deadline_reached"] is False
    assert res["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 4]

    e2e_known = TTFT_S + 5 * ITL_S
    for lv in res["levels"]:
        assert (lv["completed"], lv["failed"], lv["errors"], lv["unfinished"]) == (8, 0, {}, 0)
        assert lv["token_counts_from"] == "usage"
        assert lv["total_output_tokens"] == 8 * 6 and lv["total_input_tokens"] == 8 * 16
        # measured latencies against the server's known sleeps: lower bounds are physical (the role
        # chunk sent at once must not count as a token); upper ones leave room for a busy shared machine
        assert TTFT_S * 1000 <= lv["ttft_ms"]["p50"] <= TTFT_S * 1000 + 100
        assert ITL_S * 1000 * 0.6 <= lv["itl_ms"]["p50"] <= ITL_S * 1000 * 2
        assert lv["itl_ms"]["count"] == 8 * 5
        assert ITL_S * 1000 * 0.9 <= lv["tpot_ms"]["p50"] <= ITL_S * 1000 * 2
        assert e2e_known * 1000 <= lv["e2e_ms"]["p50"] <= e2e_known * 1000 + 150
        for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            st = lv[m]
            assert st["p50"] <= st["p90"] <= st["p99"]
    c1, c4 = res["levels"]
    assert 0.5 / e2e_known <= c1["requests_per_s"] <= 1 / e2e_known
    assert 2 / e2e_known <= c4["requests_per_s"] <= 4 / e2e_known
    assert c4["output_tokens_per_s"] == pytest.approx(c4["requests_per_s"] * 6, rel=1e-6)

    # what went over the wire: plain OpenAI fields only, fresh prompts per level
    assert len(state.bodies) == 16
    b = state.bodies[0]
    assert set(b) == {"model", "messages", "max_tokens", "stream", "stream_options"}
    assert b["stream"] is True and b["stream_options"] == {"include_usage": True} and b["max_tokens"] == 6
    assert len(b["messages"][0]["content"].split()) == 16
    assert len({bb["messages"][0]["content"] for bb in state.bodies}) == 16


def test_request_rate_completions_dataset_without_usage(fake_server, capsys, tmp_path):
    url, state = fake_server
    state.bodies.clear()
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "alpha beta gamma", "max_tokens": 3},
                {"conversations": [{"from": "human", "value": "delta epsilon"}, {"from": "gpt", "value": "x"}]},
                {"text": "zeta"},
            ]
        )
        + "\n"
    )
    rc, res = run_json(
        capsys,
        [
            "--base-url",
            url,
            "--model",
            "nousage",
            "--endpoint",
            "completions",
            "--request-rate",
            "40,inf",
            "--num-prompts",
            "6",
            "--dataset",
            str(data),
            "--output-len",
            "4",
            "--extra-body",
            '{"ignore_eos": true}',
        ],
    )
    assert rc == 0 and res["mode"] == "request_rate"
    assert [lv["request_rate"] for lv in res["levels"]] == [40.0, "inf"]
    assert res["settings"]["request_rate"] == [40.0, "inf"] and res["settings"]["concurrency"] is None
    for lv in res["levels"]:
        assert lv["completed"] == 6 and lv["concurrency"] is None
        assert lv["token_counts_from"] == "chunks"
        assert lv["total_output_tokens"] == 2 * (3 + 4 + 4)  # each record twice in 6 draws
    prompts = sorted(b["prompt"] for b in state.bodies)
    assert prompts == sorted(["alpha beta gamma", "delta epsilon", "zeta"] * 4)
    assert all(b["ignore_eos"] is True and "messages" not in b for b in state.bodies)
    assert {b["max_tokens"] for b in state.bodies if b["prompt"] == "alpha beta gamma"} == {3}


@pytest.mark.parametrize(
    "model,kind",
    [
        ("err-429", "http_429"),
        ("err-500", "http_500"),
        ("drop", "connection"),
        ("garbage", "bad_stream"),
        ("json", "bad_stream"),
        ("nodone", "bad_stream"),
        ("midstream-error", "stream_error"),
        ("slow", "timeout"),
    ],
)
def test_errors_are_counted_by_kind(fake_server, capsys, model, kind):
    url, _ = fake_server
    t0 = time.monotonic()
    rc, res = run_json(
        capsys,
        [
            "--base-url",
            url,
            "--model",
            model,
            "--concurrency",
            "2",
            "--num-prompts",
            "3",
            "--output-len",
            "4",
            "--timeout-s",
            "0.4",
        ],
    )
    assert rc == 1  # nothing completed
    (lv,) = res["levels"]
    assert lv["errors"] == {kind: 3} and lv["failed"] == 3 and lv["completed"] == 0
    assert lv["ttft_ms"]["p50"] is None and lv["requests_per_s"] == 0
    assert time.monotonic() - t0 < 5


def test_mixed_errors_and_successes(fake_server, capsys):
    url, _ = fake_server
    rc, res = run_json(
        capsys, ["--base-url", url, "--model", "flaky", "--concurrency", "1", "--num-prompts", "6", "--output-len", "2"]
    )
    (lv,) = res["levels"]
    assert rc == 0 and lv["errors"] == {"http_500": 3} and lv["completed"] == 3
    assert "boom" in lv["error_examples"]["http_500"]


def test_connection_refused_is_counted(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the run: nothing listens
    rc, res = run_json(
        capsys, ["--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--concurrency", "2", "--num-prompts", "2"]
    )
    assert rc == 1 and res["levels"][0]["errors"] == {"connection": 2}


def test_model_discovery_failure_is_a_clear_error(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = serve.main(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1", "--no-progress"])
    assert rc == 2 and "pass --model" in capsys.readouterr().err


def test_api_key_sent_and_hidden_model_discovered(fake_server, capsys, monkeypatch):
    url, state = fake_server
    monkeypatch.delenv("ATHENA_API_KEY", raising=False)
    rc, res = run_json(
        capsys,
        ["--base-url", url + "/v1", "--model", "auth", "--concurrency", "1", "--num-prompts", "2", "--output-len", "2"],
    )
    assert rc == 1 and res["levels"][0]["errors"] == {"http_401": 2}
    monkeypatch.setenv("ATHENA_API_KEY", "sekrit")
    rc, res = run_json(
        capsys,
        ["--base-url", url + "/v1", "--model", "auth", "--concurrency", "1", "--num-prompts", "2", "--output-len", "2"],
    )
    assert rc == 0 and res["levels"][0]["completed"] == 2
    assert res["settings"]["api_key"] == "***" and "sekrit" not in json.dumps(res)
    state.bodies.clear()
    rc, res = run_json(capsys, ["--base-url", url, "--concurrency", "1", "--num-prompts", "1", "--output-len", "2"])
    assert rc == 0 and res["model"] == "fake" and state.bodies[0]["model"] == "fake"


def test_an_untimed_request_warms_the_client_up_before_the_first_level(fake_server, capsys):
    """A fresh httpx client spent 30-70 ms of its own set-up in its first request, which counted as the first
    timed request's TTFT (most of `bench.serve_overhead`'s one-stream TTFT on CPU); with --model given nothing
    else came first."""
    url, state = fake_server
    state.requests.clear()
    rc, res = run_json(
        capsys, ["--base-url", url, "--model", "fake", "--concurrency", "1", "--num-prompts", "2", "--output-len", "2"]
    )
    assert rc == 0 and res["levels"][0]["completed"] == 2
    assert state.requests == [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/chat/completions")]


def test_overall_deadline_cancels_and_skips(fake_server, capsys):
    url, _ = fake_server
    t0 = time.monotonic()
    rc, res = run_json(
        capsys,
        [
            "--base-url",
            url,
            "--model",
            "slow",
            "--concurrency",
            "2,4",
            "--num-prompts",
            "5",
            "--timeout-s",
            "60",
            "--deadline-s",
            "0.5",
        ],
    )
    assert time.monotonic() - t0 < 4
    assert rc == 1 and res["deadline_reached"] is True and res["skipped_levels"] == [4]
    (lv,) = res["levels"]
    assert lv["unfinished"] == 5 and lv["requests"] == 0 and 0.5 <= res["duration_s"] < 2


def test_human_report_without_json(fake_server, capsys):
    url, _ = fake_server
    rc = serve.main(
        [
            "--base-url",
            url,
            "--model",
            "fake",
            "--concurrency",
            "2",
            "--num-prompts",
            "2",
            "--output-len",
            "3",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "== concurrency 2: 2 ok, 0 failed" in out
    for name in ("TTFT", "TPOT", "ITL", "E2E", "requests/s", "output tok/s"):
        assert name in out
    assert not out.strip().startswith("{")


def test_against_athena_server_with_fake_engine(capsys):
    """The tool speaks the real server's dialect (role chunk, usage chunk, CRLF events, 429 bodies)."""
    fake_engine = pytest.importorskip("fake_engine")
    server_fixtures = pytest.importorskip("server_fixtures")
    s = server_fixtures.serve_engine(
        fake_engine.FakeEngine(
            model_name="fake-model", max_model_len=128, max_num_seqs=2, max_queue=2, step_delay_s=0.01
        )
    )
    try:
        rc, res = run_json(
            capsys,
            [
                "--base-url",
                s.url,
                "--concurrency",
                "2,6",
                "--num-prompts",
                "6",
                "--input-len",
                "8",
                "--output-len",
                "6",
            ],
        )
    finally:
        s.stop()
    assert rc == 0 and res["model"] == "fake-model"
    c2, c6 = res["levels"]
    assert c2["completed"] == 6 and c2["token_counts_from"] == "usage" and c2["total_output_tokens"] == 36
    assert c2["tpot_ms"]["p50"] >= 10 * 0.9 and c2["ttft_ms"]["p50"] > 0
    # 2 running + 2 waiting fit (a request counts as waiting until it takes a slot); of 6 sent at once some get 429
    assert c6["errors"].get("http_429", 0) >= 1 and c6["completed"] + c6["failed"] == 6


def test_json_schema_on_every_request_compared_with_none(capsys, tmp_path):
    """--json-schema builtin --compare-unconstrained: each level runs free, then with the schema (which
    the real server accepts), and the report gives the constrained share of output tok/s."""
    fake_engine = pytest.importorskip("fake_engine")
    server_fixtures = pytest.importorskip("server_fixtures")
    engine = fake_engine.FakeEngine(model_name="fake-model", max_model_len=256, step_delay_s=0.002)
    s = server_fixtures.serve_engine(engine)
    try:
        rc, res = run_json(
            capsys,
            [
                "--base-url",
                s.url,
                "--concurrency",
                "2",
                "--num-prompts",
                "4",
                "--input-len",
                "8",
                "--output-len",
                "5",
                "--json-schema",
                "builtin",
                "--compare-unconstrained",
            ],
        )
        schema_file = tmp_path / "s.json"
        schema_file.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
        rc2, res2 = run_json(
            capsys,
            [
                "--base-url",
                s.url,
                "--concurrency",
                "2",
                "--num-prompts",
                "2",
                "--input-len",
                "8",
                "--output-len",
                "4",
                "--json-schema",
                str(schema_file),
            ],
        )
    finally:
        s.stop()
    assert rc == 0 and [lv["json_schema"] for lv in res["levels"]] == [False, True]
    assert all(lv["completed"] == 4 and lv["failed"] == 0 for lv in res["levels"])
    [row] = res["constrained_share"]
    assert row["level"] == 2 and row["share"] == pytest.approx(
        res["levels"][1]["output_tokens_per_s"] / res["levels"][0]["output_tokens_per_s"]
    )
    assert rc2 == 0 and [lv["json_schema"] for lv in res2["levels"]] == [True] and "constrained_share" not in res2
    assert res["settings"]["json_schema"] == "builtin"


@pytest.mark.parametrize("argv", [["--compare-unconstrained"], ["--json-schema", "/nonexistent/schema.json"]])
def test_bad_schema_arguments(argv, capsys):
    try:
        rc = serve.main(argv)
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
