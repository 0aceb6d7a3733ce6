"""Scalar baselines (RTN, GPTQ), their storage, and the Hessian accumulator."""

import pytest
import torch

from athena_runtime.format.layers import ScalarLayer, layer_from_tensors
from quantize.gptq import quantize_gptq
from quantize.hessian import HessianAccumulator
from quantize.recipe import ScalarRecipe
from quantize.rtn import quantize_rtn


def calibration(M, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = S or 4 * M
    X = torch.randn(S, M, generator=g) @ (torch.eye(M) + 0.5 * torch.randn(M, M, generator=g) / M**0.5)
    X = X * torch.exp(0.7 * torch.randn(M, generator=g))
    acc = HessianAccumulator(M)
    acc.add_batch(X)
    return X, acc.hessian(0.0)


def test_hessian_accumulator_matches_definition():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 7, 5, generator=g)  # [batch, tokens, M]
    acc = HessianAccumulator(5)
    acc.add_batch(X[:1])
    acc.add_batch(X[1:])
    flat = X.reshape(-1, 5)
    assert acc.nsamples == 21
    assert torch.allclose(acc.hessian(0.0), 2 / 21 * flat.T @ flat, atol=1e-5)
    damped = acc.hessian(0.1)
    expected = 2 / 21 * flat.T @ flat
    expected += 0.1 * torch.diagonal(expected).mean() * torch.eye(5)
    assert torch.allclose(damped, expected, atol=1e-5)
    with pytest.raises(ValueError, match="x\\[..., 5\\]"):
        acc.add_batch(torch.randn(2, 4))
    with pytest.raises(ValueError, match="no samples"):
        HessianAccumulator(5).hessian()
    with pytest.raises(ValueError, match="positive"):
        HessianAccumulator(0)


@pytest.mark.parametrize("bits,group_size", [(3, 16), (4, 32), (2, 24)])
def test_gptq_beats_rtn(bits, group_size):
    M = 64
    X, H = calibration(M)
    W = torch.randn(48, M, generator=torch.Generator().manual_seed(1)) * 0.02
    recipe = ScalarRecipe(method="gptq", bits=bits, group_size=group_size, block_size=16)
    gptq, s_gptq = quantize_gptq(W, H, recipe)
    rtn, s_rtn = quantize_rtn(W, ScalarRecipe(method="rtn", bits=bits, group_size=group_size), H)
    assert s_gptq["proxy_loss"] < 0.8 * s_rtn["proxy_loss"]
    # the reported loss is ‖(W - Ŵ) Xᵀ‖² / ‖W Xᵀ‖²
    direct = float(((W - gptq.dequantize()) @ X.T).square().sum() / (W @ X.T).square().sum())
    assert s_gptq["proxy_loss"] == pytest.approx(direct, rel=1e-3)
    assert quantize_rtn(W, ScalarRecipe(method="rtn", bits=bits, group_size=group_size))[1]["proxy_loss"] is None


def test_gptq_does_not_depend_on_lazy_block_width():
    M = 40
    _, H = calibration(M)
    W = torch.randn(12, M, generator=torch.Generator().manual_seed(2))
    # groups of 12 straddle blocks of 7 and 16; a block of 64 holds everything
    layers = [quantize_gptq(W, H, ScalarRecipe(bits=3, group_size=12, block_size=bs))[0] for bs in (7, 16, 64)]
    for other in layers[1:]:
        assert (other.q != layers[0].q).float().mean() < 0.01
        assert torch.allclose(other.scales.float(), layers[0].scales.float(), rtol=1e-2)


def test_rtn_grid_error_bound_and_layout():
    N, M, g = 9, 50, 16  # last group has 2 columns
    W = torch.randn(N, M, generator=torch.Generator().manual_seed(3))
    layer, _ = quantize_rtn(W, ScalarRecipe(method="rtn", bits=4, group_size=g))
    assert layer.q.shape == (N, M) and int(layer.q.max()) <= 15
    assert layer.scales.shape == (N, 4) and layer.scales.dtype == torch.float16
    assert layer.zeros.shape == (N, 4) and bool((layer.zeros == layer.zeros.round()).all())
    step = layer.scales.float().repeat_interleave(g, 1)[:, :M]
    assert bool(((W - layer.dequantize()).abs() <= step / 2 * 1.001 + 1e-6).all())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_scalar_storage_round_trip(method):
    N, M = 10, 30
    _, H = calibration(M)
    W = torch.randn(N, M, generator=torch.Generator().manual_seed(4))
    recipe = ScalarRecipe(method=method, bits=3, group_size=8)
    layer, _ = quantize_gptq(W, H, recipe) if method == "gptq" else quantize_rtn(W, recipe)
    layer.bias = torch.randn(N).half()
    tensors = layer.to_tensors("m.o_proj")
    assert set(tensors) == {"m.o_proj.qweight", "m.o_proj.scales", "m.o_proj.zeros", "m.o_proj.bias"}
    assert tensors["m.o_proj.qweight"].shape == (N, (M * 3 + 7) // 8)
    meta = layer.meta()
    assert meta == {"method": method, "shape": [N, M], "bits": 3, "group_size": 8}
    again = layer_from_tensors("m.o_proj", tensors, meta)
    assert isinstance(again, ScalarLayer) and torch.equal(again.dequantize(), layer.dequantize())
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.endswith(".bias"))
    assert stored == layer.stored_bytes() == recipe.stored_bytes(N, M)
    with pytest.raises(ValueError, match="m.o_proj.scales.*dtype"):
        layer_from_tensors("m.o_proj", dict(tensors, **{"m.o_proj.scales": tensors["m.o_proj.scales"].float()}), meta)
    with pytest.raises(ValueError, match="m.o_proj.qweight.*shape"):
        layer_from_tensors("m.o_proj", tensors, dict(meta, bits=4))
    with pytest.raises(ValueError, match="m.o_proj.zeros.*missing"):
        layer_from_tensors("m.o_proj", {k: v for k, v in tensors.items() if not k.endswith("zeros")}, meta)


def test_refuses_bad_input():
    _, H = calibration(8)
    with pytest.raises(ValueError, match="H must be"):
        quantize_gptq(torch.randn(4, 8), H[:3, :3], ScalarRecipe())
    with pytest.raises(ValueError, match="H is required"):
        quantize_gptq(torch.randn(4, 8), None, ScalarRecipe())
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(torch.full((2, 8), float("nan")), ScalarRecipe(method="rtn"))
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.randn(8), ScalarRecipe(method="rtn"))
    for bad in (
        dict(method="awq"),
        dict(bits=0),
        dict(bits=9),
        dict(group_size=0),
        dict(damp=-0.1),
        dict(block_size=0),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ScalarRecipe(**bad)
