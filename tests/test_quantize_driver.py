"""The layer-by-layer driver: activations match the full model; quantize + eval end to end; resume."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_model, write_text

from athena_runtime.format.source import load_hf_model
from quantize.calibration import CalibConfig
from quantize.driver import QuantizeJob, build_context, embed, run, run_layer
from quantize.evaluate import eval_ppl, load_compressed_as_hf
from quantize.recipe import AthenaRecipe, ScalarRecipe

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
SMALL_ATHENA = AthenaRecipe(d=2, n=16, k=64, codebook_bits=8, lowrank=0.05, kmeans_iters=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny_model(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return write_text(root / "calib.txt", (0, 30)), write_text(root / "heldout.txt", (40, 70))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_driver_matches_full_model_hidden_states(models, family):
    """Chaining run_layer over the decoder equals the model's own hidden states (no KV-cache leak)."""
    model = load_hf_model(models[family])
    ids = torch.randint(0, 384, (3, 40), generator=torch.Generator().manual_seed(1))  # 40 > sliding window 16
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    x = embed(model, ids, "cpu", torch.float32)
    ctx = build_context(model, ids.shape[1], "cpu", torch.float32)
    for i, layer in enumerate(model.model.layers):
        x = run_layer(layer, i, x, ctx, batch_size=2)
        if i + 1 < len(model.model.layers):  # the last hidden state is after the final norm
            torch.testing.assert_close(x, ref[i + 1], rtol=1e-4, atol=1e-4)


def _job(model, out, texts, method="athena", **kw):
    return QuantizeJob(
        model=str(model),
        out=str(out),
        method=method,
        athena=SMALL_ATHENA,
        scalar=ScalarRecipe(method="gptq" if method == "athena" else method, bits=4, group_size=32),
        calib=CalibConfig(files=(str(texts[0]),), nsamples=8, seqlen=48, seed=0),
        batch_size=4,
        **kw,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_and_eval_end_to_end(models, texts, tmp_path, family):
    meta = run(_job(models[family], tmp_path / "q", texts))
    assert meta["complete"] and meta["format_version"] == 2
    assert (
        len(meta["layers"]) == 7 * meta["num_layers"]
        and meta["architecture"] == load_hf_model(models[family]).config.model_type
    )
    for st in meta["layers"].values():
        assert 0.0 <= st["proxy_loss"] < 0.5 and st["bits_per_weight"] > 0
    ref = eval_ppl(models[family], [str(texts[1])], seqlen=64, max_tokens=2048)
    q = eval_ppl(tmp_path / "q", [str(texts[1])], seqlen=64, max_tokens=2048)
    assert ref["bits_per_weight"] is None and q["bits_per_weight"] == pytest.approx(meta["bits_per_weight"]["linear"])
    assert math.isfinite(q["ppl"]) and q["tokens"] == ref["tokens"]
    # random tiny models sit near uniform perplexity: quantization may move it, but not blow it up
    assert q["ppl"] < 1.5 * ref["ppl"]
    # our runtime on the compressed checkpoint (PQLinear, paged cache) agrees with the dequantized transformers model
    from athena_runtime.perplexity import eval_ppl_runtime

    ours = eval_ppl_runtime(tmp_path / "q", [str(texts[1])], 64, 2048, "fp32")
    assert ours["tokens"] == q["tokens"] and ours["ppl"] == pytest.approx(q["ppl"], rel=1e-4)


def test_bits_from_stored_bytes(models, texts, tmp_path):
    meta = run(_job(models["llama"], tmp_path / "q", texts))
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    total_bits = total_weights = 0
    for prefix, st in meta["layers"].items():
        nbytes = sum(
            t.numel() * t.element_size()
            for k, t in tensors.items()
            if k.startswith(prefix + ".") and not k.endswith(".bias")
        )
        n, m = st["shape"]
        assert st["bits_per_weight"] == pytest.approx(8 * nbytes / (n * m))
        total_bits += 8 * nbytes
        total_weights += n * m
    assert meta["bits_per_weight"]["linear"] == pytest.approx(total_bits / total_weights)
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert meta["bits_per_weight"]["file"] == pytest.approx(8 * size / meta["source_parameters"])


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_scalar_baselines_in_same_driver(models, texts, tmp_path, method):
    meta = run(_job(models["qwen2"], tmp_path / method, texts, method=method))
    assert meta["method"] == method
    assert meta["bits_per_weight"]["linear"] == pytest.approx(4 + 32 / 32, rel=0.05)  # 4 bits + fp16 scale/zero per 32
    model, _ = load_compressed_as_hf(tmp_path / method)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # qwen2 qkv bias survived


def test_resume_after_interruption_gives_same_checkpoint(models, texts, tmp_path):
    full = tmp_path / "full"
    run(_job(models["llama"], full, texts))
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(_job(models["llama"], part, texts), stop_after_layers=1)
    assert not (part / "athena.json").exists() and (part / ".partial" / "layer_0000.safetensors").exists()
    with pytest.raises(ValueError, match="--resume"):
        run(_job(models["llama"], part, texts))
    with pytest.raises(ValueError, match="different settings"):
        run(_job(models["llama"], part, texts, resume=True, method="rtn"))
    run(_job(models["llama"], part, texts, resume=True))
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (part / ".partial").exists()
