"""`python -m bench.decode --family ...` on the CPU at tiny shapes: the families' random models are built in memory,
decoded at batch 1, and their rates reported against the baseline shape's per byte read."""

import json

import pytest
import torch

from bench import decode
from bench.random_checkpoint import FAMILIES, model_shapes


@pytest.mark.slow  # ~35 s on 2 busy cores
def test_family_decode_runs_on_cpu(capsys):
    argv = [
        "--family",
        "tiny-llama,tiny-gemma3",
        "--baseline",
        "tiny-llama",
        "--device",
        "cpu",
        "--paths",
        "pq,fp16",
        "--prompt",
        "5",
        "--new",
        "3",
        "--context",
        "32",
        "--rounds",
        "1",
        "--json",
    ]
    assert decode.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["family"], r["path"]): r for r in result["rows"]}
    assert set(rows) == {(f, p) for f in ("tiny-llama", "tiny-gemma3") for p in ("pq", "fp16")}
    for (family, path), r in rows.items():
        assert r["tok_s"] > 0 and r["gb_s"] == r["tok_s"] * r["bytes_per_token"] / 1e9
        assert r["vs_baseline"] == (1.0 if family == "tiny-llama" else r["gb_s"] / rows["tiny-llama", path]["gb_s"])
    # Gemma's tied 262k-style embedding is read whole by the lm_head: counted in full (fp32 on the CPU)
    cfg = FAMILIES["tiny-gemma3"]
    assert rows["tiny-gemma3", "fp16"]["weight_gb"] * 1e9 >= 4 * cfg["vocab_size"] * cfg["hidden_size"]


def test_family_shapes_are_the_released_ones():
    """Linear shapes of the 7B-class shapes (q: heads x head_dim, GQA k/v) and their biases."""
    linears, dense = model_shapes(FAMILIES["gemma3-12b"])
    assert linears["model.layers.0.self_attn.q_proj"] == (16 * 256, 3840, False)
    assert linears["model.layers.0.self_attn.k_proj"] == (8 * 256, 3840, False)
    assert linears["model.layers.0.mlp.down_proj"] == (3840, 15360, False)
    assert "lm_head.weight" not in dense and dense["model.embed_tokens.weight"] == (262208, 3840)
    assert dense["model.layers.47.self_attn.q_norm.weight"] == (256,)
    linears, dense = model_shapes(FAMILIES["qwen2.5-7b"])
    assert linears["model.layers.0.self_attn.k_proj"] == (512, 3584, True)
    assert linears["model.layers.0.mlp.gate_proj"] == (18944, 3584, False)
    linears, dense = model_shapes(FAMILIES["llama3-8b"])
    assert linears["model.layers.0.self_attn.v_proj"] == (1024, 4096, False)
    assert dense["lm_head.weight"] == (128256, 4096)
    assert torch.Size(dense["model.embed_tokens.weight"]) == (128256, 4096)
