"""Calibration Hessians: the blocked symmetric XᵀX, the finiteness check, and the driver's early-stopping pass."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from athena_runtime.format.source import load_hf_model
from quantize.driver import LINEAR_GROUPS, _submodule, build_context, collect_hessians, embed, run_layer
from quantize.hessian import SYMMETRIC_MIN_M, HessianAccumulator, add_gram_, all_finite


@pytest.mark.parametrize("M", [7, SYMMETRIC_MIN_M - 1, SYMMETRIC_MIN_M, 515, 1030])
def test_gram_matches_full_product(M):
    """Both sides of the size boundary, widths that do not split evenly into block rows."""
    g = torch.Generator().manual_seed(M)
    X = torch.randn(300, M, generator=g, dtype=torch.float64).float()
    H0 = torch.randn(M, M, generator=g)
    H0 = H0 + H0.T
    H = H0.clone()
    add_gram_(H, X, 0.25)
    ref = H0.double() + 0.25 * (X.double().T @ X.double())
    torch.testing.assert_close(H.double(), ref, rtol=1e-5, atol=1e-3)
    assert torch.equal(H, H.T) or M < SYMMETRIC_MIN_M  # blocked: the lower triangle is the mirrored upper one


def test_accumulator_equals_average_over_all_rows():
    X = torch.randn(2, 300, 600, generator=torch.Generator().manual_seed(0))
    acc = HessianAccumulator(600)
    acc.add_batch(X[0])
    acc.add_batch(X[1, :17])
    rows = torch.cat([X[0], X[1, :17]]).double()
    torch.testing.assert_close(acc.hessian(0.0).double(), 2 * rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-4)
    assert acc.nsamples == 317


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_is_refused(bad):
    acc = HessianAccumulator(600)
    x = torch.randn(4, 600)
    x[2, 599] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        acc.add_batch(x)
    assert acc.nsamples == 0
    assert not all_finite(x) and all_finite(torch.randn(3, 3)) and all_finite(torch.zeros(0))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_collect_hessians_equals_hooks_on_the_full_forward(tmp_path, family):
    """The Hessian pass stops each batch at the down projection's input; its Hessians equal those from
    forward hooks on the whole layer."""
    model = load_hf_model(make_tiny_model(tmp_path / family, family))
    ids = torch.randint(0, 384, (5, 24), generator=torch.Generator().manual_seed(1))
    ctx = build_context(model, ids.shape[1], torch.device("cpu"), torch.float32)
    inps = embed(model, ids, torch.device("cpu"), torch.float32)
    layer = model.model.layers[0]
    got = collect_hessians(layer, 0, inps, ctx, batch_size=2)
    ref, hooks = {}, []
    for group in LINEAR_GROUPS:
        mod = _submodule(layer, group[0])
        acc = ref[group[0]] = HessianAccumulator(mod.in_features)
        hooks.append(mod.register_forward_hook(lambda m, a, o, acc=acc: acc.add_batch(a[0])))

    run_layer(layer, 0, inps, ctx, 2)
    for h in hooks:
        h.remove()
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].nsamples == ref[name].nsamples == 5 * 24
        torch.testing.assert_close(got[name].hessian(0.0), ref[name].hessian(0.0))
    assert not layer._forward_pre_hooks and all(not m._forward_pre_hooks for m in layer.modules())
