"""The benchmark's HTTP side: one streaming OpenAI-style request, timed chunk by chunk.

`stream_request` posts a `stream: true` request with `stream_options.include_usage`, parses the
server-sent events (`data:` lines, events ended by a blank line, `:` comment lines ignored) until
`data: [DONE]`, and returns a `RequestRecord` with the arrival time of every content chunk and the
token counts of the final usage chunk when the server sends one. It never raises for a failed
request: the failure becomes the record's error kind (`http_<status>`, `timeout`, `connection`,
`bad_stream`, `stream_error`, `client_error`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from bench.serve_metrics import RequestRecord

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


@dataclass(frozen=True)
class Target:
    """Where and how to send requests."""

    base_url: str  # ends in /v1
    model: str
    endpoint: str = "chat"  # "chat" or "completions"
    api_key: str | None = None
    timeout_s: float = 120.0  # whole request, connect to [DONE]
    extra_body: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINT_PATHS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        h = {"Accept": "text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


def v1_base(url: str) -> str:
    """`http://h:p`, `http://h:p/` and `http://h:p/v1/` all become `http://h:p/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def build_payload(target: Target, prompt: str, max_tokens: int) -> dict:
    """The request body: only standard OpenAI fields, then `extra_body` merged over them."""
    body: dict = {
        "model": target.model,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(target.extra_body)
    return body


class _Failure(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass
class SSEEvent:
    data: str
    event: str | None
    t: float  # arrival of the event's first data line


class SSEParser:
    """Incremental server-sent-events parser fed one line at a time (without the line ending)."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._t: float | None = None

    def feed(self, line: str, t: float) -> SSEEvent | None:
        if line == "":
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            if self._t is None:
                self._t = t
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def flush(self) -> SSEEvent | None:
        if not self._data:
            self._event = None
            return None
        ev = SSEEvent("\n".join(self._data), self._event, self._t if self._t is not None else 0.0)
        self._data, self._event, self._t = [], None, None
        return ev


def chunk_text(chunk: dict, endpoint: str) -> str:
    """The generated text in one stream chunk (chat: `delta.content`; completions: `text`)."""
    out = []
    for choice in chunk.get("choices") or ():
        if endpoint == "chat":
            piece = (choice.get("delta") or {}).get("content")
        else:
            piece = choice.get("text")
        if isinstance(piece, str):
            out.append(piece)
    return "".join(out)


@dataclass
class _Progress:
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    done_s: float | None = None


def _handle_event(ev: SSEEvent, endpoint: str, p: _Progress) -> bool:
    """Update `p` from one event; True when it was `[DONE]`."""
    if ev.data.strip() == "[DONE]":
        p.done_s = ev.t
        return True
    try:
        chunk = json.loads(ev.data)
    except json.JSONDecodeError:
        raise _Failure("bad_stream", f"data is not JSON: {ev.data[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise _Failure("bad_stream", f"data is not a JSON object: {ev.data[:80]!r}")
    if ev.event == "error" or "error" in chunk:
        raise _Failure("stream_error", json.dumps(chunk.get("error", chunk))[:200])
    if chunk_text(chunk, endpoint):
        p.chunk_times.append(ev.t)
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            p.completion_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            p.prompt_tokens = usage["prompt_tokens"]
    return False


async def _exchange(
    client: httpx.AsyncClient, target: Target, body: dict, p: _Progress, clock: Callable[[], float]
) -> None:
    async with client.stream("POST", target.url, json=body, headers=target.headers) as resp:
        if resp.status_code != 200:
            text = (await resp.aread())[:300].decode("utf-8", "replace")
            raise _Failure(f"http_{resp.status_code}", text)
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            raise _Failure("bad_stream", f"expected text/event-stream, got {ctype!r}")
        parser = SSEParser()
        async for line in resp.aiter_lines():
            ev = parser.feed(line, clock())
            if ev is not None and _handle_event(ev, target.endpoint, p):
                return
        ev = parser.flush()
        if ev is not None and _handle_event(ev, target.endpoint, p):
            return
        raise _Failure("bad_stream", "stream ended without data: [DONE]")


async def stream_request(
    client: httpx.AsyncClient,
    target: Target,
    prompt: str,
    max_tokens: int,
    *,
    prompt_tokens_estimate: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> RequestRecord:
    """Send one streaming request and time it; failures become the record's `error`."""
    body = build_payload(target, prompt, max_tokens)
    p = _Progress()
    error, detail = None, ""
    send = clock()
    try:
        await asyncio.wait_for(_exchange(client, target, body, p, clock), target.timeout_s)
    except _Failure as exc:
        error, detail = exc.kind, exc.detail
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
        error, detail = "timeout", f"no [DONE] within {target.timeout_s:g} s ({type(exc).__name__})"
    except httpx.TransportError as exc:  # refused, reset, closed mid-body, protocol errors
        error, detail = "connection", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one odd request must not end the benchmark
        error, detail = "client_error", f"{type(exc).__name__}: {exc}"
    end = p.done_s if (error is None and p.done_s is not None) else clock()
    return RequestRecord(
        send_s=send,
        end_s=end,
        chunk_times=tuple(p.chunk_times),
        prompt_tokens=p.prompt_tokens,
        completion_tokens=p.completion_tokens,
        prompt_tokens_estimate=prompt_tokens_estimate,
        error=error,
        error_detail=detail,
    )


async def warm_up(client: httpx.AsyncClient, base_url: str, api_key: str | None = None) -> str | None:
    """One untimed `GET /v1/models` through `client`: a fresh client's first request pays for its own set-up
    (httpx's and anyio's lazy imports and connection machinery: 30-70 ms measured on a 2-core CPU), which
    would otherwise count as the server's time to first token of the first timed request. Returns why it
    failed (the timed requests then report their own errors), or None."""
    try:
        await list_models(client, base_url, api_key)
    except (httpx.HTTPError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def list_models(client: httpx.AsyncClient, base_url: str, api_key: str | None = None) -> list[str]:
    """Model ids from `GET /v1/models`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = await client.get(base_url + "/models", headers=headers)
    resp.raise_for_status()
    return [m["id"] for m in resp.json().get("data", []) if isinstance(m, dict) and "id" in m]
