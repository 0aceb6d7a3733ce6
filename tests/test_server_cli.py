"""`athena serve`: flags map 1:1 onto ServerSettings and win over ATHENA_* env vars; it exits 1 when
the model cannot load; the process drains running streams on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from server.cli import build_parser, main
from server.serve_cli import serve, settings_from_args
from server.settings import ENGINE_FIELDS, ServerSettings

REPO = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> ServerSettings:
    return settings_from_args(build_parser("serve").parse_args(["serve", *argv]))


def test_every_setting_has_a_flag_with_help():
    serve = next(a for a in build_parser("serve")._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]
    flags = {a.dest: a for a in serve._actions if a.dest != "help"}
    assert set(flags) == set(ServerSettings.model_fields)
    assert all(a.help for a in flags.values())
    assert flags["model"].option_strings == []  # the positional MODEL
    assert flags["kv_cache"].choices == ["fp16", "int8", "int4"]


def test_flags_map_onto_settings(monkeypatch):
    for name in list(os.environ):
        if name.startswith("ATHENA_"):
            monkeypatch.delenv(name)
    s = parse(
        "/models/x",
        "--port",
        "9001",
        "--host",
        "0.0.0.0",
        "--api-key",
        "k",
        "--kv-cache",
        "int4",
        "--max-num-seqs",
        "3",
        "--max-model-len",
        "1024",
        "--served-model-name",
        "x",
        "--no-use-cuda-graphs",
        "--kv-hadamard",
        "--drain-timeout-s",
        "2.5",
        "--max-body-bytes",
        "100",
    )
    assert (s.model, s.port, s.host, s.api_key.get_secret_value(), s.served_model_name) == (
        "/models/x",
        9001,
        "0.0.0.0",
        "k",
        "x",
    )
    e = s.engine_settings()
    assert (e.kv_cache, e.max_num_seqs, e.max_model_len, e.use_cuda_graphs, e.kv_hadamard) == (
        "int4",
        3,
        1024,
        False,
        True,
    )
    assert (s.drain_timeout_s, s.max_body_bytes) == (2.5, 100)
    # nothing given: the engine's own defaults, the embedded model, loopback only
    d = parse()
    assert d.model is None and d.host == "127.0.0.1" and d.api_key is None
    from athena_runtime.engine_settings import EngineSettings

    assert d.engine_settings() == EngineSettings()
    assert all(getattr(d, name) is None for name in ENGINE_FIELDS)


def test_env_vars_and_flag_precedence(monkeypatch):
    monkeypatch.setenv("ATHENA_PORT", "7000")
    monkeypatch.setenv("ATHENA_API_KEY", "from-env")
    monkeypatch.setenv("ATHENA_KV_CACHE", "int8")
    s = parse()
    assert (s.port, s.api_key.get_secret_value(), s.kv_cache) == (7000, "from-env", "int8")
    s = parse("--port", "7001", "--kv-cache", "fp16")
    assert (s.port, s.api_key.get_secret_value(), s.kv_cache) == (7001, "from-env", "fp16")


def test_bad_values_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        build_parser("serve").parse_args(["serve", "--kv-cache", "int3"])
    assert main(["serve", "--port", "70000"]) == 2
    assert "port" in capsys.readouterr().err


def run_serve(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_unloadable_model_exits_1(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = ServerSettings(model=str(tmp_path), port=0, api_key=None, log_level="critical")
    assert asyncio.run(asyncio.wait_for(serve(settings), 60)) == 1
    assert "could not load the model" in caplog.text


SERVE_FAKE = """
    import sys
    import server.app
    from fake_engine import FakeEngine
    from server.cli import main
    server.app._build_engine = lambda settings: FakeEngine(model_name="fake", max_model_len=512, step_delay_s=0.01)
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_drains_running_streams():
    import socket

    with socket.socket() as s:  # a free port for the child (tiny race, acceptable in a test)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_serve(SERVE_FAKE, "serve", "--port", str(port), "--drain-timeout-s", "20", "--log-level", "warning")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.1)
        body = {
            "model": "fake",
            "prompt": "hi",
            "max_tokens": 80,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # ~0.8 s of generation left
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 80
        proc.wait(30)
        assert proc.returncode in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
