"""Fused element-wise kernels (kernels/fused_ops.py) against their PyTorch references: Triton under
TRITON_INTERPRET=1 on CPU (conftest), on the GPU when there is one. Odd sizes (not powers of two)."""

import pytest
import torch

from athena_runtime.kernels.fused_ops import (
    add_rmsnorm,
    add_rmsnorm_reference,
    gelu_tanh_mul,
    gelu_tanh_mul_reference,
    rope_,
    rope_reference,
    scatter_rows_pair_,
    scatter_rows_pair_reference,
    silu_mul,
    silu_mul_reference,
)

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32: identical up to summation order; fp16: one rounding of the result (values ~1)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert not torch.isnan(a).any()
    err = (a.float() - b.float()).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, b.float().abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H", [(1, 64), (3, 576), (5, 100)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm(dtype, T, H, with_residual):
    g = torch.Generator().manual_seed(T * H)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    res = torch.randn(T, H, generator=g).to(DEV, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(DEV, dtype)
    y, r = add_rmsnorm(x, res, w, 1e-5, use_triton=True)
    y_ref, r_ref = add_rmsnorm_reference(x, res, w, 1e-5)
    _close(r, r_ref, dtype)
    _close(y, y_ref, dtype)
    if not with_residual:
        assert r is x  # the stream itself, no copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H", [(1, 64), (3, 640), (2, 100)])
def test_add_rmsnorm_unit_offset_is_gemmas(dtype, T, H):
    """Gemma: y = (norm(r) · (1 + w)) in float32, rounded once; checked against transformers' Gemma3RMSNorm."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    g = torch.Generator().manual_seed(T + H)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    res = torch.randn(T, H, generator=g).to(DEV, dtype)
    w = (0.3 * torch.randn(H, generator=g)).to(DEV, dtype)
    hf = Gemma3RMSNorm(H, eps=1e-6).to(DEV, dtype)
    hf.weight.data.copy_(w)
    y_ref, r_ref = add_rmsnorm_reference(x, res, w, 1e-6, unit_offset=True)
    assert torch.equal(y_ref, hf(x + res))
    y, r = add_rmsnorm(x, res, w, 1e-6, use_triton=True, unit_offset=True)
    _close(r, r_ref, dtype)
    _close(y, y_ref, dtype)
    # a float32 residual stream under float16 layers: the sum stays float32, the norm comes out in `out_dtype`
    x32, res32 = x.float() * 1e3, res.float() * 1e3  # beyond float16's range once summed
    y, r = add_rmsnorm(x32, res32, w, 1e-6, use_triton=True, unit_offset=True, out_dtype=dtype)
    y_ref, r_ref = add_rmsnorm_reference(x32, res32, w, 1e-6, unit_offset=True, out_dtype=dtype)
    assert r.dtype == torch.float32 and y.dtype == dtype
    _close(r, r_ref, torch.float32)
    _close(y, y_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,Hkv,D", [(1, 4, 2, 64), (3, 9, 3, 64), (2, 5, 1, 34)])
def test_rope_in_place(dtype, T, H, Hkv, D):
    g = torch.Generator().manual_seed(T + H + D)
    q = torch.randn(T, H, D, generator=g).to(DEV, dtype)
    k = torch.randn(T, Hkv, D, generator=g).to(DEV, dtype)
    ang = torch.rand(T, D // 2, generator=g) * 100
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().to(DEV, dtype), emb.sin().to(DEV, dtype)
    q_ref, k_ref = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    q2, k2 = rope_(q, k, cos, sin, use_triton=True)
    assert q2.data_ptr() == q.data_ptr() and k2.data_ptr() == k.data_ptr()  # in place
    _close(q2, q_ref, dtype)
    _close(k2, k_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("unit_offset", [False, True])  # Qwen3's norm, Gemma's
@pytest.mark.parametrize("T,H,Hkv,D", [(1, 4, 1, 256), (3, 5, 2, 34), (2, 8, 4, 128)])
def test_rope_with_qk_norm(dtype, unit_offset, T, H, Hkv, D):
    """Each head of q and k RMS-normed (its own weights), then rotated: one launch, as the two references."""
    g = torch.Generator().manual_seed(T + H + D + unit_offset)
    q = (3 * torch.randn(T, H, D, generator=g)).to(DEV, dtype)
    k = torch.randn(T, Hkv, D, generator=g).to(DEV, dtype)
    wq = (0.5 * torch.randn(D, generator=g) + (0 if unit_offset else 1)).to(DEV, dtype)
    wk = (0.5 * torch.randn(D, generator=g) + (0 if unit_offset else 1)).to(DEV, dtype)
    ang = torch.rand(T, D // 2, generator=g) * 100
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().to(DEV, dtype), emb.sin().to(DEV, dtype)
    norm = (wq, wk, 1e-6, unit_offset)
    q_ref = rope_reference(add_rmsnorm_reference(q, None, wq, 1e-6, unit_offset)[0], cos, sin)
    k_ref = rope_reference(add_rmsnorm_reference(k, None, wk, 1e-6, unit_offset)[0], cos, sin)
    q2, k2 = rope_(q, k, cos, sin, use_triton=True, qk_norm=norm)
    assert q2.data_ptr() == q.data_ptr() and k2.data_ptr() == k.data_ptr()  # in place
    _close(q2, q_ref, dtype)
    _close(k2, k_ref, dtype)
    with pytest.raises(ValueError, match="norm weights"):
        rope_(q, k, cos, sin, use_triton=True, qk_norm=(wq[:-2], wk, 1e-6, unit_offset))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,F", [(1, 7), (3, 1500), (4, 2048)])
def test_gelu_tanh_mul(dtype, T, F):
    g = torch.Generator().manual_seed(T * F + 1)
    gate = (4 * torch.randn(T, F, generator=g)).to(DEV, dtype)
    up = torch.randn(T, F, generator=g).to(DEV, dtype)
    _close(gelu_tanh_mul(gate, up, use_triton=True), gelu_tanh_mul_reference(gate, up), dtype)
    with pytest.raises(ValueError, match="gelu_tanh_mul"):
        gelu_tanh_mul(gate, up[:, :-1], use_triton=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,F", [(1, 7), (3, 1500), (4, 2048)])
def test_silu_mul(dtype, T, F):
    g = torch.Generator().manual_seed(T * F)
    gate = (3 * torch.randn(T, F, generator=g)).to(DEV, dtype)
    up = torch.randn(T, F, generator=g).to(DEV, dtype)
    _close(silu_mul(gate, up, use_triton=True), silu_mul_reference(gate, up), dtype)


def test_bad_shapes_are_clear_errors():
    x = torch.randn(2, 8).to(DEV)
    with pytest.raises(ValueError, match="add_rmsnorm"):
        add_rmsnorm(x, torch.randn(2, 9).to(DEV), torch.ones(8).to(DEV), 1e-5, use_triton=True)
    with pytest.raises(ValueError, match="silu_mul"):
        silu_mul(x, torch.randn(2, 9).to(DEV), use_triton=True)
    with pytest.raises(ValueError, match="rope_"):
        rope_(
            torch.randn(2, 1, 8).to(DEV),
            torch.randn(2, 1, 8).to(DEV),
            torch.ones(2, 6).to(DEV),
            torch.ones(2, 6).to(DEV),
            use_triton=True,
        )


@pytest.mark.parametrize("T,R,rows", [(1, 64, 9), (5, 40, 33), (3, 2048, 7)])
def test_scatter_rows_pair(T, R, rows):
    """Both rows land exactly where the index says; other rows are untouched."""
    a = torch.randn(rows, R).half().to(DEV)
    b = torch.randn(rows, R).half().to(DEV)
    a_src, b_src = torch.randn(T, R).half().to(DEV), torch.randn(T, R).half().to(DEV)
    idx = torch.randperm(rows)[:T].to(DEV)
    a2, b2 = a.clone(), b.clone()
    scatter_rows_pair_(a, b, a_src, b_src, idx, use_triton=True)
    scatter_rows_pair_reference(a2, b2, a_src, b_src, idx)
    assert torch.equal(a, a2) and torch.equal(b, b2)
