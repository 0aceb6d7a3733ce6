"""u = x Bᵀ (the prefill low-rank product) against matmul, Triton kernel under TRITON_INTERPRET=1 on CPU.

Tolerance: 2e-3 relative Frobenius error (fp16 inputs, fp32 accumulation, one fp16 rounding of u).
"""
from __future__ import annotations

import pytest
import torch

from athena_runtime.kernels import lowrank_u as lu

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(y, ref):
    assert not torch.isnan(y).any()
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("T,M,r", [(64, 128, 16), (70, 300, 5), (129, 257, 48), (64, 4096, 128)])
def test_kernel_matches_matmul(T, M, r):
    g = torch.Generator().manual_seed(T + M + r)
    x = torch.randn(T, M, generator=g).half().to(DEV)
    B = (torch.randn(r, M, generator=g) * 0.1).half().to(DEV)
    assert lu.use_kernel(x, B)
    ref = x.float() @ B.float().t()
    assert rel_err(lu.lowrank_u(x, B), ref) < 2e-3


def test_writes_into_a_strided_view():
    """The prefill rows mode: u lands in columns [M, M + r) of a wider operand, the rest untouched."""
    T, M, r, K = 65, 200, 9, 256
    x = torch.randn(T, M).half().to(DEV)
    B = (torch.randn(r, M) * 0.1).half().to(DEV)
    wide = torch.full((T, K), 7.0, dtype=torch.float16, device=DEV)
    out = lu.lowrank_u(x, B, out=wide[:, M:M + r])
    assert out.data_ptr() == wide[:, M:].data_ptr()
    assert rel_err(wide[:, M:M + r], x.float() @ B.float().t()) < 2e-3
    assert (wide[:, :M] == 7).all() and (wide[:, M + r:] == 7).all()


def test_small_or_unserved_inputs_use_matmul():
    x = torch.randn(8, 64).half()
    B = torch.randn(4, 64).half()
    assert not lu.use_kernel(x, B)  # fewer than MIN_TOKENS rows
    assert not lu.use_kernel(torch.randn(64, 64).half(), torch.randn(lu.MAX_RANK + 1, 64).half())
    assert torch.equal(lu.lowrank_u(x, B), x @ B.t())
    with pytest.raises(ValueError, match="lowrank_u"):
        lu.lowrank_u(x, torch.randn(4, 65).half())
    with pytest.raises(ValueError, match="out must be"):
        lu.lowrank_u(x, B, out=torch.empty(8, 5, dtype=torch.float16))
