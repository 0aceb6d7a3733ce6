"""Perplexity through the runtime agrees with the reference path and degrades gracefully with KV
quantization."""

from __future__ import annotations

import pytest
from tiny_models import make_tiny_model, write_text

from athena_runtime.perplexity import eval_ppl_runtime
from quantize.evaluate import eval_ppl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rppl")
    return make_tiny_model(root / "m", "llama", hidden_size=128), write_text(root / "t.txt", (40, 50))


def test_runtime_fp16_cache_matches_reference(setup):
    model, text = setup
    ref = eval_ppl(model, [str(text)], seqlen=96, max_tokens=960)
    rt = eval_ppl_runtime(model, [str(text)], seqlen=96, max_tokens=960, kv_cache="fp16", device="cpu")
    assert rt["tokens"] == ref["tokens"]
    assert rt["ppl"] == pytest.approx(ref["ppl"], rel=2e-3)  # fp16 storage of K/V only


@pytest.mark.parametrize("fmt,tol", [("int8", 0.01), ("int4", 0.10)])
def test_quantized_cache_stays_close(setup, fmt, tol):
    model, text = setup
    base = eval_ppl_runtime(model, [str(text)], seqlen=96, max_tokens=960, kv_cache="fp16", device="cpu")
    q = eval_ppl_runtime(model, [str(text)], seqlen=96, max_tokens=960, kv_cache=fmt, device="cpu")
    assert q["kv_bytes_per_token"] < base["kv_bytes_per_token"]
    assert abs(q["ppl"] / base["ppl"] - 1) < tol


def test_eval_cli_runs_both_paths_and_agrees(setup, capsys):
    """`athena eval ppl` (server/eval_cli.py): the reference model, the runtime with --kv-cache; bad use exits 2."""
    import json

    from server.cli import main

    model, text = setup
    args = ["eval", "ppl", str(model), "--data", str(text), "--seqlen", "96", "--max-tokens", "480", "--json"]
    assert main(args) == 0
    ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--kv-cache", "fp16"]) == 0
    rt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rt["kv_cache"] == "fp16" and rt["tokens"] == ref["tokens"] > 0
    assert rt["ppl"] == pytest.approx(ref["ppl"], rel=2e-3)
    assert main(["eval"]) == 2  # no WHAT: usage, exit 2
