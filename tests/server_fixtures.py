"""A real uvicorn server on 127.0.0.1 (free port, own thread and event loop) for server tests,
plus helpers to read /metrics and wait for the engine to go idle."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from server.app import create_app
from server.http_server import AppServer, uvicorn_config
from server.settings import ServerSettings


def make_settings(**overrides: Any) -> ServerSettings:
    """Settings for tests: no key, small drain, whatever the environment says otherwise."""
    base: dict[str, Any] = {
        "api_key": None,
        "served_model_name": None,
        "drain_timeout_s": 5.0,
        "max_body_bytes": 1 << 20,
        "log_level": "warning",
    }
    base.update(overrides)
    return ServerSettings(**base)


class LiveServer:
    """`with LiveServer(app) as s:` serves `app` at `s.url` until the block ends."""

    def __init__(self, app: Any, graceful_timeout_s: float = 5.0) -> None:
        self.app = app
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only then (else
        # Nagle + delayed ACKs add ~40 ms to every response).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # the production config and server (server/http_server.py), on this socket
        config = uvicorn_config(
            app, app.state.settings, log_level="warning", access_log=False, timeout_graceful_shutdown=graceful_timeout_s
        )
        self.server = AppServer(config, app)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # surfaced by start()/stop()
            self.error = exc
        finally:
            pending = asyncio.all_tasks(self.loop)  # e.g. sse-starlette's shutdown watcher
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start: {self.error!r}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        """Shuts down as a SIGTERM does: the app drains, then uvicorn stops."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.begin_shutdown)
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "uvicorn did not stop"
        self.sock.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` on the server's event loop (where the engine lives) and returns its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_engine(engine: Any, **settings: Any) -> LiveServer:
    """A started LiveServer for `engine` (stop it when done)."""
    return LiveServer(create_app(make_settings(**settings), engine=engine)).start()


def metrics(url: str, **headers: str) -> dict[str, float]:
    """The /metrics samples as {'name{labels}': value}."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def engine_idle(server: LiveServer) -> bool:
    """No request running or waiting and no KV block held, as the engine and /metrics both say."""
    stats = server.call(server.app.state.engine.stats)
    if stats.running or stats.waiting or stats.kv_blocks_used:
        return False
    m = metrics(server.url)
    return (
        m["athena_requests_running"] == 0
        and m["athena_requests_waiting"] == 0
        and m["athena_kv_cache_usage_ratio"] == 0
    )


class HealthProbe:
    """`with HealthProbe(url) as probe:` asks GET /health every `interval_s` in a thread; `probe.worst` is the
    longest any answer took (a frozen event loop shows up here), `probe.statuses` what they were."""

    def __init__(self, url: str, interval_s: float = 0.02) -> None:
        self.url, self.interval_s = url, interval_s
        self.latencies: list[float] = []
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self._stop.is_set():
                start = time.monotonic()
                self.statuses.append(http.get(f"{self.url}/health").status_code)
                self.latencies.append(time.monotonic() - start)
                self._stop.wait(self.interval_s)

    @property
    def worst(self) -> float:
        return max(self.latencies)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(60)
