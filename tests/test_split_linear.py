"""Fused projections (split_linear.py, PQLinear.concat): the fused layer's parts equal the separate
layers on every path (CPU reference, Triton dequantize + matmul and lookup-table under
TRITON_INTERPRET=1), padding between codebook blocks included; refusals are logged, not errors."""

from __future__ import annotations

import logging

import pytest
import torch
from test_pq_kernels import DEV
from test_pq_linear import PREFIX, checkpoint_layer
from torch import nn

from athena_runtime.pq_linear import PQLinear
from athena_runtime.split_linear import SplitLinear, fuse

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

DTYPE = torch.float16 if DEV.type == "cuda" else torch.float32  # the kernels' dtype on a GPU
TOL = 4e-3 if DEV.type == "cuda" else 1e-4


def _pq(N, M, rank, bias, seed, path=None, k=32):
    t, meta, W, b = checkpoint_layer(N, M, 2, 16, k, rank=rank, bias=bias, codebook_bits=16, seed=seed)
    return PQLinear.from_tensors(PREFIX, t, meta, DEV, DTYPE, path=path)


@pytest.mark.parametrize("path", [None, "triton-dequant", "triton-gemv"])
def test_fused_pq_parts_equal_separate_layers(path):
    # 64 rows (two blocks of 32), 40 rows (padded to 64: straddles a block), 24 rows (last: unpadded);
    # ranks 0 / 3 / 2 and one bias: block-diagonal low-rank factors, zero bias rows
    parts = [_pq(64, 50, 0, False, 1, path), _pq(40, 50, 3, True, 2, path), _pq(24, 50, 2, False, 3, path)]
    fused = PQLinear.concat(parts, max_pad=1.0)
    assert fused is not None
    layer, offsets = fused
    assert offsets == [0, 64, 128] and layer.geo.N == 152 and layer.geo.Nb == 5
    split = SplitLinear(layer, offsets, [p.out_features for p in parts])
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).to(DEV, DTYPE)
    with torch.no_grad():
        got = split(x)
        for y, p in zip(got, parts):
            want = p(x).float()
            assert y.shape == want.shape and not torch.isnan(y).any()
            torch.testing.assert_close(y.float(), want, rtol=TOL, atol=TOL * want.abs().max().item())


def test_fusion_refused_when_padding_is_large(caplog):
    parts = [_pq(40, 50, 0, False, 1), _pq(24, 50, 0, False, 2)]  # 40 -> 64 rows: 24 padding on 64 real
    PQLinear._logged -= {k for k in PQLinear._logged if k[0] == "not-fused"}  # logged by an earlier test?
    with caplog.at_level(logging.INFO):
        assert PQLinear.concat(parts) is None
        assert PQLinear.concat(parts) is None
    assert caplog.text.count("not fusing") == 1  # once per shape set, not once per decoder layer
    assert PQLinear.concat([_pq(64, 50, 0, False, 1), _pq(40, 30, 0, False, 2)]) is None  # different inputs


def test_dense_fusion_concatenates_weights_and_biases():
    a, b = nn.Linear(20, 8, bias=True), nn.Linear(20, 5, bias=False)
    split = fuse([a, b])
    x = torch.randn(4, 20)
    ya, yb = split(x)
    torch.testing.assert_close(ya, a(x))
    torch.testing.assert_close(yb, b(x))
    assert fuse([a, _pq(64, 20, 0, False, 1)]) is None  # mixed types stay separate


@pytest.mark.parametrize("path", [None, "triton-dequant", "triton-gemv"])
@pytest.mark.parametrize("T", [1, 3, 6])
def test_fused_gate_up_silu_mul_equals_unfused(path, T):
    """SplitLinear.silu_mul: silu(gate) · up from the PQ layer's epilogue (lookup-table paths) or from
    fused_ops.silu_mul (other paths) equals silu_mul over the parts; gate 40 rows padded to 64."""
    from athena_runtime.kernels.fused_ops import silu_mul

    parts = [_pq(40, 50, 3, True, 4, path), _pq(40, 50, 2, False, 5, path)]
    layer, offsets = PQLinear.concat(parts, max_pad=1.0)
    assert offsets == [0, 64]
    split = SplitLinear(layer, offsets, [40, 40])
    x = torch.randn(T, 50, generator=torch.Generator().manual_seed(T)).to(DEV, DTYPE)
    with torch.no_grad():
        gate, up = split(x)
        want = silu_mul(gate, up).float()
        got = split.silu_mul(x)
    assert got.shape == (T, 40) and not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want, rtol=TOL, atol=TOL * want.abs().max().item())
    with pytest.raises(ValueError, match="two parts of one size"):
        SplitLinear(layer, offsets, [40, 24]).silu_mul(x)
