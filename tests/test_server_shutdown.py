"""SIGTERM to a real `athena serve` process: the server stops admitting (503 with
Retry-After, the port still answers), running streams finish if they can within --drain-timeout-s,
the rest end cleanly (an error event, `data: [DONE]`, a complete chunked body), then it exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
DRAIN_S = 3.0

SERVE = """
    import sys
    import server.app
    from server.cli import main

    def fake(settings):
        from fake_engine import FakeEngine
        return FakeEngine(model_name="m", max_model_len=4096, step_delay_s=0.01)

    def real(settings):   # the real AsyncEngine and its step thread, on the fake model runner
        from athena_runtime.engine import AsyncEngine
        from athena_runtime.engine_settings import EngineSettings
        from fake_engine import tiny_chat_tokenizer
        from fake_runner import FakeRunner
        tok = tiny_chat_tokenizer()
        runner = FakeRunner(vocab_size=len(tok), num_blocks=2048, block_size=4, max_model_len=4096,
                            banned=(tok.eos_token_id,), delay_s=0.01)
        return AsyncEngine(runner, tok, EngineSettings(block_size=4, max_num_seqs=8, max_num_batched_tokens=256), "m",
                           eos_token_ids=(tok.eos_token_id,))

    server.app._build_engine = {"fake": fake, "real": real}[sys.argv[1]]
    sys.exit(main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as s:  # a free port for the child (tiny race, acceptable in a test)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stream(threading.Thread):
    """Reads one streamed completion to its end, recording its events and how it ended."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list[str] = []
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": self.max_tokens,
            "stream": True,
        }
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=60) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():  # raises on a cut connection or an unterminated chunked body
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.started.set()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fake", "real"])
def test_sigterm_drains_then_ends_streams_cleanly_and_exits_0(engine):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(SERVE),
            engine,
            "serve",
            "--port",
            str(port),
            "--drain-timeout-s",
            str(DRAIN_S),
            "--retry-after-s",
            "2",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        short, long = Stream(url, max_tokens=60), Stream(url, max_tokens=3000)  # ~0.6 s; ~30 s at 10 ms a token
        for s in (short, long):
            s.start()
            assert s.started.wait(30) and s.error is None, s.error
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # draining: the port still answers, with 503 and Retry-After
        time.sleep(0.3)
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            timeout=10,
        )
        assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
        assert r.json()["error"]["code"] == "service_unavailable"
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and "retry-after" in health.headers

        for s in (short, long):
            s.join(30)
            assert not s.is_alive() and s.error is None, repr(s.error)  # a complete, terminated body
        # the short stream ran to its end
        assert short.events[-1] == "[DONE]"
        assert json.loads(short.events[-2])["choices"][0]["finish_reason"] == "length"
        # the long one was ended at the drain timeout: an error event, then [DONE]
        assert long.events[-1] == "[DONE]"
        error = json.loads(long.events[-2])["error"]
        assert error["code"] == "service_unavailable" and "shutting down" in error["message"], error
        assert len(long.events) < 3000
        assert DRAIN_S - 0.5 < long.ended_at - signalled < DRAIN_S + 5, long.ended_at - signalled

        assert proc.wait(20) == 0, proc.communicate()[1][-3000:]
        assert time.monotonic() - signalled < DRAIN_S + 10
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
