"""--finetune (quantize/finetune.py): block-wise tuning with indices fixed lowers the block's output error and the
result stays a readable checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_model, write_text

from athena_runtime.format.layers import AthenaLayer
from athena_runtime.format.source import load_hf_model
from athena_runtime.perplexity import eval_ppl_runtime
from quantize.calibration import CalibConfig
from quantize.driver import QuantizeJob, build_context, embed, run, run_layer
from quantize.evaluate import eval_ppl, load_compressed_as_hf
from quantize.finetune import FinetuneConfig, finetune_block
from quantize.recipe import AthenaRecipe

RECIPE = AthenaRecipe(d=2, n=8, k=64, lowrank=0.05, kmeans_iters=4)
CALIB = dict(nsamples=16, seqlen=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return make_tiny_model(root / "m", "llama"), write_text(root / "calib.txt", (0, 30)), root


def _job(model, calib, out, finetune, row_scale=False, resume=False):
    return QuantizeJob(
        model=str(model),
        out=str(out),
        athena=dataclasses.replace(RECIPE, row_scale=row_scale),
        calib=CalibConfig(files=(str(calib),), **CALIB),
        device="cpu",
        finetune=finetune,
        resume=resume,
    )


def _block_errors(model_dir, ckpt, calib, held):
    """Relative output error of each quantized decoder layer against the reference layer, on the same inputs
    (the reference model's hidden states) -> list per layer, on calibration and on other text."""
    from athena_runtime.format.source import load_tokenizer
    from quantize.calibration import calibration_batch

    ref = load_hf_model(model_dir)
    q, _ = load_compressed_as_hf(ckpt)
    tok = load_tokenizer(model_dir)
    out = {}
    for label, path in (("calib", calib), ("held", held)):
        ids = calibration_batch(tok, CalibConfig(files=(str(path),), **CALIB))
        ctx = build_context(ref, ids.shape[1], torch.device("cpu"), torch.float32)
        x = embed(ref, ids, torch.device("cpu"), torch.float32)
        errs = []
        for i, (lr, lq) in enumerate(zip(ref.model.layers, q.model.layers)):
            y = run_layer(lr, i, x, ctx, 8)
            yq = run_layer(lq, i, x, ctx, 8)
            errs.append(float((yq - y).square().sum() / y.square().sum()))
            x = y
        out[label] = errs
    return out


@pytest.mark.slow
@pytest.mark.parametrize("row_scale", [False, True])
def test_finetune_lowers_block_error_and_stays_readable(tiny, row_scale):
    model, calib, root = tiny
    held = write_text(root / "held.txt", (40, 70))
    base = root / f"base-{row_scale}"
    tuned = root / f"tuned-{row_scale}"
    run(_job(model, calib, base, None, row_scale))
    meta = run(_job(model, calib, tuned, FinetuneConfig(steps=100, lr=1e-3, batch_windows=4), row_scale))
    layers = meta["layers"]
    assert all("finetune_rel_err_after" in s for s in layers.values())
    assert any(s["finetune_kept"] for s in layers.values())
    for s in layers.values():  # kept only when better, and then strictly better
        assert (s["finetune_rel_err_after"] < s["finetune_rel_err_before"]) == s["finetune_kept"]
    assert meta["recipe"]["finetune"]["steps"] == 100
    # the same bytes: indices, codebook shapes, factors; bits unchanged
    assert (
        meta["bits_per_weight"]["linear"] == json.loads((base / "athena.json").read_text())["bits_per_weight"]["linear"]
    )
    tb, tt = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert set(tb) == set(tt)
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(tb[f"{name}.indices"], tt[f"{name}.indices"])  # indices fixed
    assert not torch.equal(tb[f"{name}.codebook_scale"], tt[f"{name}.codebook_scale"]) or not torch.equal(
        tb[f"{name}.codebook"], tt[f"{name}.codebook"]
    )
    assert not torch.equal(tb["model.layers.0.input_layernorm.weight"], tt["model.layers.0.input_layernorm.weight"])
    errs_b, errs_t = _block_errors(model, base, calib, held), _block_errors(model, tuned, calib, held)
    for label in ("calib", "held"):
        gm = lambda e: float(torch.tensor(e).log().mean().exp())  # noqa: E731
        assert gm(errs_t[label]) < gm(errs_b[label]), (label, errs_b[label], errs_t[label])
    # the runtime reads it (PQLinear, tuned norms) and agrees with the reference dequantization
    ours = eval_ppl_runtime(tuned, [str(held)], 32, 512, "fp32")
    theirs = eval_ppl(tuned, [str(held)], 32, 512)
    assert ours["tokens"] == theirs["tokens"] and ours["ppl"] == pytest.approx(theirs["ppl"], rel=1e-4)


def test_finetune_block_keeps_a_worse_result_out():
    """A learning rate that wrecks the layer: the stored form is worse, so the inputs come back unchanged."""
    torch.manual_seed(0)
    N, M = 16, 8
    W = torch.randn(N, M)
    layer = AthenaLayer(
        shape=(N, M),
        d=2,
        n=4,
        k=16,
        codebook_bits=16,
        indices=torch.randint(0, 4, (N, M // 2)),
        codebook=torch.randn(1, M // 2, 4, 2).half(),
    )
    x = torch.randn(3, 5, M)
    target = x @ W.T

    def forward(params, xb):
        return xb @ params["lin"].T * params["gain"]

    linears, norms = {"lin": layer}, {"gain": torch.ones(())}
    out_l, out_n, st = finetune_block(
        forward, x, target, linears, norms, FinetuneConfig(steps=5, lr=1e3, batch_windows=2)
    )
    assert not st["kept"] and st["rel_err_after"] >= st["rel_err_before"]
    assert out_l["lin"] is layer and torch.equal(out_n["gain"], norms["gain"])
    good_l, _, st2 = finetune_block(
        forward, x, target, linears, norms, FinetuneConfig(steps=200, lr=1e-2, batch_windows=2)
    )
    assert st2["kept"] and st2["rel_err_after"] < st2["rel_err_before"]
    assert torch.equal(good_l["lin"].indices, layer.indices) and good_l["lin"].codebook.dtype == torch.float16


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=0.0), dict(batch_windows=0), dict(lr=True)])
def test_config_is_checked(bad):
    with pytest.raises(ValueError, match="finetune"):
        FinetuneConfig(**bad)


def test_finetune_needs_athena(tiny):
    from quantize.recipe import ScalarRecipe

    with pytest.raises(ValueError, match="needs athena"):
        QuantizeJob(model="m", out="o", method="gptq", scalar=ScalarRecipe(), finetune=FinetuneConfig())


@pytest.mark.slow
def test_finetuned_run_resumes_identically(tiny):
    """Interrupted after one layer and resumed: the same checkpoint as one uninterrupted run (tuned norms are
    stored in the layer parts and read back)."""
    model, calib, root = tiny
    cfg = FinetuneConfig(steps=20, lr=3e-3, batch_windows=2)
    full, part = root / "ft-full", root / "ft-part"
    run(_job(model, calib, full, cfg))
    with pytest.raises(KeyboardInterrupt):
        run(_job(model, calib, part, cfg), stop_after_layers=1)
    run(_job(model, calib, part, cfg, resume=True))
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
