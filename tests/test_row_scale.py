"""Per-output-row scales (FORMAT.md version 2): the quantizer, storage and bits, the runtime paths, versioning."""

import json

import pytest
import torch
from test_athena import calibration, layer_loss

from athena_runtime.format import checkpoint
from athena_runtime.format.layers import AthenaLayer, layer_from_tensors
from athena_runtime.kernels.pq_reference import pq_matmul_reference
from athena_runtime.pq_linear import PQLinear
from athena_runtime.row_scale import row_scale_epilogue
from quantize.athena import quantize_athena, row_scales
from quantize.recipe import AthenaRecipe

PREFIX = "model.layers.0.mlp.up_proj"
pytestmark = pytest.mark.gpu  # the CUDA paths' test runs on a GPU machine (`pytest -m gpu tests`)


def uneven_rows(N, M, seed=1):
    """Rows whose scales span two orders of magnitude (as real projections' output channels do)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, M, generator=g) * 0.02 * torch.exp(1.2 * torch.randn(N, 1, generator=g))


def test_row_scales_lower_the_layer_loss_on_uneven_rows():
    N, M = 96, 48
    X, H = calibration(M)
    W = uneven_rows(N, M)
    base = AthenaRecipe(d=2, n=16, k=4096, lowrank=0.0, kmeans_iters=6)
    ((plain, _),) = quantize_athena([W], H, base)
    ((scaled, st),) = quantize_athena([W], H, AthenaRecipe(**{**base.__dict__, "row_scale": True}))
    assert scaled.row_scale is not None and scaled.row_scale.dtype == torch.float16
    assert layer_loss(W, scaled, X) < 0.8 * layer_loss(W, plain, X)
    # the accumulated whitened error is reported in weight space (scaled back by s²)
    assert st["hessian_loss_damped"] > 0


def test_row_scale_is_the_row_rms_in_fp16():
    W = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    s = row_scales(W)
    assert s.dtype == torch.float16 and s.tolist() == [pytest.approx(12.5**0.5, rel=1e-3), 1.0]


@pytest.mark.parametrize("lowrank", [0.0, 0.1])
def test_storage_round_trip_and_stored_bits(lowrank):
    N, M = 40, 30
    X, H = calibration(M)
    W = uneven_rows(N, M)
    recipe = AthenaRecipe(d=3, n=16, k=32, lowrank=lowrank, row_scale=True, kmeans_iters=3)
    ((layer, _),) = quantize_athena([W], H, recipe)
    tensors = layer.to_tensors(PREFIX)
    meta = layer.meta()
    assert meta["row_scale"] is True and f"{PREFIX}.row_scale" in tensors
    again = layer_from_tensors(PREFIX, tensors, meta)
    assert torch.equal(again.dequantize(), layer.dequantize())
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored == layer.stored_bytes() == recipe.stored_bytes(N, M)
    assert (
        recipe.stored_bytes(N, M) - AthenaRecipe(**{**recipe.__dict__, "row_scale": False}).stored_bytes(N, M) == 2 * N
    )
    # W_eff = diag(s) (Ŵ + A B)
    unscaled = AthenaLayer(**{**layer.__dict__, "row_scale": None})
    assert torch.allclose(layer.dequantize(), unscaled.dequantize() * layer.row_scale.float()[:, None])
    assert layer_loss(W, layer, X) < 0.5


def test_meta_and_tensor_must_agree():
    N, M = 16, 8
    _, H = calibration(M)
    ((layer, _),) = quantize_athena([uneven_rows(N, M)], H, AthenaRecipe(d=2, n=4, k=16, lowrank=0.0, row_scale=True))
    tensors, meta = layer.to_tensors(PREFIX), layer.meta()
    with pytest.raises(ValueError, match="row_scale present"):
        layer_from_tensors(PREFIX, tensors, {k: v for k, v in meta.items() if k != "row_scale"})
    with pytest.raises(ValueError, match="row_scale is missing"):
        layer_from_tensors(PREFIX, {k: v for k, v in tensors.items() if not k.endswith("row_scale")}, meta)
    with pytest.raises(ValueError, match="row_scale"):
        PQLinear.from_tensors(PREFIX, {k: v for k, v in tensors.items() if not k.endswith("row_scale")}, meta, "cpu")


def _layer(N=45, M=70, rank=0.05, bias=True, seed=0, n=16, k=32):
    X, H = calibration(M, seed=seed)
    ((layer, _),) = quantize_athena(
        [uneven_rows(N, M, seed)], H, AthenaRecipe(d=2, n=n, k=k, lowrank=rank, row_scale=True, kmeans_iters=3)
    )
    if bias:
        layer.bias = torch.randn(N).half()
    return layer


def test_runtime_reference_matches_the_format():
    layer = _layer()
    pq = PQLinear.from_tensors(PREFIX, layer.to_tensors(PREFIX), layer.meta(), "cpu", path="reference")
    x = torch.randn(3, 70)
    want = x @ layer.dequantize().t() + layer.bias.float()
    assert torch.allclose(pq(x), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    assert torch.allclose(pq.effective_weight(), layer.dequantize(), rtol=2e-3, atol=1e-4)


def test_accelerator_epilogue_matches_reference_with_and_without_glu():
    """What the CUDA/Triton paths run (kernel without bias, then the epilogue), checked on CPU through the
    kernels' PyTorch reference; with glu the scale comes before SiLU."""
    layer = _layer(N=40)
    pq = PQLinear.from_tensors(PREFIX, layer.to_tensors(PREFIX), layer.meta(), "cpu", path="reference")
    assert pq.kernel_args()[-1] is None  # the bias moves to the epilogue
    x = torch.randn(5, 70)
    y = row_scale_epilogue(pq_matmul_reference(x, *pq.kernel_args()), pq.row_scale.float(), pq.bias.float(), None)
    want = x @ layer.dequantize().t() + layer.bias.float()
    assert torch.allclose(y, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    g = row_scale_epilogue(pq_matmul_reference(x, *pq.kernel_args()), pq.row_scale.float(), pq.bias.float(), (20, 20))
    assert torch.allclose(g, torch.nn.functional.silu(want[:, :20]) * want[:, 20:], rtol=3e-3, atol=1e-3)


def test_concat_keeps_each_parts_scales_and_refuses_a_mix():
    a, b = _layer(N=32, seed=0), _layer(N=32, seed=0)
    pa = PQLinear.from_tensors(PREFIX, a.to_tensors(PREFIX), a.meta(), "cpu", path="reference")
    pb = PQLinear.from_tensors(PREFIX, b.to_tensors(PREFIX), b.meta(), "cpu", path="reference")
    fused, offsets = PQLinear.concat([pa, pb])
    x = torch.randn(2, 70)
    y = fused(x)
    assert torch.allclose(y[:, :32], pa(x), atol=1e-4) and torch.allclose(
        y[:, offsets[1] : offsets[1] + 32], pb(x), atol=1e-4
    )
    plain = AthenaLayer(**{**b.__dict__, "row_scale": None})
    pp = PQLinear.from_tensors(PREFIX, plain.to_tensors(PREFIX), plain.meta(), "cpu", path="reference")
    assert PQLinear.concat([pa, pp]) is None


def _write(folder, version, row_scale):
    layer = _layer(N=16, M=8, rank=0.0, bias=False)
    if not row_scale:
        layer = AthenaLayer(**{**layer.__dict__, "row_scale": None})
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(
        layer.to_tensors(PREFIX),
        str(folder / checkpoint.WEIGHTS_FILE),
        metadata={"format": "athena", "format_version": str(version)},
    )
    (folder / checkpoint.META_FILE).write_text(
        json.dumps({"format": "athena", "format_version": version, "complete": True, "layers": {PREFIX: layer.meta()}})
    )


def test_versions(tmp_path):
    _write(tmp_path / "v1", 1, row_scale=False)
    meta, _ = checkpoint.read_checkpoint(tmp_path / "v1")  # version-1 files stay readable
    assert meta["format_version"] == 1
    _write(tmp_path / "v2", 2, row_scale=True)
    checkpoint.read_checkpoint(tmp_path / "v2")
    _write(tmp_path / "v1scaled", 1, row_scale=True)
    with pytest.raises(ValueError, match="format version 1 does not have"):
        checkpoint.read_checkpoint(tmp_path / "v1scaled")
    _write(tmp_path / "v3", 3, row_scale=False)
    with pytest.raises(ValueError, match="format_version 3 is not supported"):
        checkpoint.read_meta(tmp_path / "v3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["lut", "frag", "dequant", "triton-gemv", "triton-dequant", "reference"])
@pytest.mark.parametrize("T", [1, 7, 40])
def test_every_cuda_path_applies_row_scales(path, T):
    """Each CUDA backend (kernel without bias, then the scale epilogue) against the spec W_eff, with and without
    the fused gate/up; tolerance: relative Frobenius error 4e-3 (fp16 activations)."""
    from athena_runtime.kernels import lut, nvrtc

    # d=2, 6-bit, one codebook block of 128 rows: every backend's shape (frag's 128-row tiles included)
    layer = _layer(N=128, M=96, rank=0.05, bias=True, seed=T, n=64, k=128)
    pq = PQLinear.from_tensors(PREFIX, layer.to_tensors(PREFIX), layer.meta(), "cuda", path=path)
    try:
        pq.bind()
    except nvrtc.KernelUnavailable as e:
        pytest.skip(f"{path} unavailable here: {e}")
    x = torch.randn(T, 96).half()
    if path == "lut" and T > max(lut.TOKENS):  # a forced path refuses a call it does not serve, saying why
        with pytest.raises(ValueError, match="cannot take"):
            pq(x.cuda())
        return
    want = x.float() @ layer.dequantize().t() + layer.bias.float()
    y = pq(x.cuda()).float().cpu()
    assert float((y - want).norm() / want.norm()) < 4e-3
    g = pq(x.cuda(), glu=(64, 64)).float().cpu()
    gw = torch.nn.functional.silu(want[:, :64]) * want[:, 64:]
    assert float((g - gw).norm() / gw.norm()) < 4e-3
