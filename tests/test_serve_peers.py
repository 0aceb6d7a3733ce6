"""`athena bench serve-peers` (bench/serve_peers.py) without running the servers: its arguments, the llama-server it
finds, reuses or skips (with the reason printed), its table and JSON, and the llama-server additions to
bench/llama_build.py (the slim sdist that keeps the server's sources, the refusal of one that lacks them)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from bench import llama_build, serve_peers


def _level(c, tps, tpot):
    return {
        "concurrency": c,
        "output_tokens_per_s": tps,
        "tpot_ms": {"p50": tpot},
        "ttft_ms": {"p50": 50.0},
        "total_output_tokens": 1024,
        "failed": 0,
    }


def _hide_cmake(monkeypatch):
    real = llama_build.shutil.which
    monkeypatch.setattr(llama_build.shutil, "which", lambda n: None if n == "cmake" else real(n))


def test_arguments_defaults_and_refusals(capsys):
    a = serve_peers.parse_args([])
    assert (a.concurrency, a.num_prompts, a.input_len, a.output_len, a.threads, a.parallel, a.jobs) == (
        "1,4",
        16,
        64,
        64,
        2,
        4,
        2,
    )
    for bad, why in (
        (["--concurrency", "1,x"], "comma-separated integers"),
        (["--concurrency", "0"], ">= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--athena-env", "NOEQUALS"], "KEY=VALUE"),
        (["--skip-llama", "--skip-athena"], "nothing to measure"),
    ):
        with pytest.raises(SystemExit):
            serve_peers.parse_args(bad)
        assert why in capsys.readouterr().err


def test_without_cmake_llama_server_is_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    _hide_cmake(monkeypatch)
    why = serve_peers.find_or_build_llama_server(None, None, tmp_path, 2, print)
    assert isinstance(why, str) and why.startswith("llama.cpp skipped: cannot build llama-server") and "cmake" in why
    out = tmp_path / "r.json"
    assert serve_peers.main(["--skip-athena", "--build-dir", str(tmp_path), "--json-out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "llama.cpp    llama.cpp skipped: cannot build llama-server (missing cmake" in table
    report = json.loads(out.read_text())
    assert report["servers"]["llama.cpp"]["skipped"].startswith("llama.cpp skipped")
    assert report["workload"] == {"num_prompts": 16, "input_len": 64, "output_len": 64, "concurrency": "1,4"}


def test_a_built_or_given_binary_is_used_and_a_missing_one_refused(tmp_path, monkeypatch):
    _hide_cmake(monkeypatch)  # no build may start
    built = tmp_path / "build-cpu" / "bin" / "llama-server"
    built.parent.mkdir(parents=True)
    built.write_text("")
    assert serve_peers.find_or_build_llama_server(None, None, tmp_path, 2, print) == built
    assert serve_peers.find_or_build_llama_server(str(built), None, tmp_path, 2, print) == built
    why = serve_peers.find_or_build_llama_server(str(tmp_path / "nope"), None, tmp_path, 2, print)
    assert isinstance(why, str) and "does not exist" in why


def test_table_rows_skip_line_and_ratio():
    both = {
        "servers": {
            "athena": {"levels": [_level(1, 40.0, 20.0), _level(4, 60.0, 50.0)]},
            "llama.cpp": {"levels": [_level(1, 80.0, 8.0), _level(4, 120.0, 20.0)]},
        }
    }
    lines = serve_peers.format_table(both).splitlines()
    assert lines[0].split()[:4] == ["server", "streams", "output", "tok/s"]
    assert lines[1].split()[:4] == ["athena", "1", "40.0", "20.0"]
    assert lines[4].split()[:4] == ["llama.cpp", "4", "120.0", "20.0"]
    assert lines[5:] == [
        "athena / llama.cpp at 1 stream(s): output tok/s 0.50x",
        "athena / llama.cpp at 4 stream(s): output tok/s 0.50x",
    ]
    skipped = {"servers": {"athena": both["servers"]["athena"], "llama.cpp": {"skipped": "llama.cpp skipped: why"}}}
    table = serve_peers.format_table(skipped)
    assert table.splitlines()[-1] == "llama.cpp    llama.cpp skipped: why" and "x" not in table.splitlines()[-1][-2:]


def _tar(path, names):
    with tarfile.open(path, "w:gz") as t:
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))


def test_slim_sdist_with_server_keeps_the_server_sources(tmp_path):
    server = [f"p-1/llama.cpp/{p}" for p in ("tools/server/server.cpp", "tools/ui/CMakeLists.txt")]
    server += ["p-1/llama.cpp/scripts/ui-assets.cmake", "p-1/llama.cpp/tools/ui/ui.cpp.in"]
    always_dropped = ["p-1/llama.cpp/tools/ui/src/app.svelte", "p-1/llama.cpp/scripts/other.sh", "p-1/llama.cpp/docs/a"]
    base = ["p-1/llama.cpp/CMakeLists.txt"]
    src = tmp_path / "p-1.tar.gz"
    _tar(src, base + server + always_dropped)
    assert llama_build.slim_sdist(src, tmp_path / "a.tar.gz") == (1, 7)
    assert llama_build.slim_sdist(src, tmp_path / "b.tar.gz", server=True) == (5, 3)
    with tarfile.open(tmp_path / "b.tar.gz") as t:
        assert sorted(t.getnames()) == sorted(base + server)


def test_server_build_refuses_a_source_without_the_server(tmp_path):
    src = tmp_path / "p-1.tar.gz"
    _tar(src, ["p-1/llama.cpp/CMakeLists.txt"])
    cpp = llama_build.source_dir(src, tmp_path / "b")
    assert "--slim --server" in llama_build.server_sources_missing(cpp)
    with pytest.raises(RuntimeError, match="cannot build"):  # no server sources (or, on a bare machine, no cmake)
        llama_build.build(src, tmp_path / "b", "cpu", 2, print, targets=(llama_build.SERVER,))
