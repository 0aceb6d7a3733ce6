"""PQLinear: loading from checkpoint tensors (FORMAT.md), the path selector, paths agreeing, errors.

Triton paths run on CPU under TRITON_INTERPRET=1 (conftest.py). Tolerance: relative Frobenius
error 4e-3 for fp16 activations against the fp32 spec computed straight from the FORMAT tensors.
"""
from __future__ import annotations

import logging

import os

import pytest
import torch

from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.pq_linear import PATH_ENV, PQLinear, select_path
from test_pq_kernels import DEV, pack_format, rel_err

PREFIX = "model.layers.0.mlp.up_proj"


def checkpoint_layer(N, M, d, n, k, rank=0, bias=False, codebook_bits=8, seed=0):
    """FORMAT.md tensors + athena.json meta of a random layer, and its fp32 W_eff (the spec)."""
    g = torch.Generator().manual_seed(seed)
    G, Nb, b = -(-M // d), -(-N // k), n.bit_length() - 1
    I = torch.randint(0, n, (N, G), generator=g)
    t = {f"{PREFIX}.indices": pack_format(I, b)}
    if codebook_bits == 8:
        codes = torch.randint(0, 256, (Nb, G, n, d), generator=g, dtype=torch.int64).to(torch.uint8)
        scale = (torch.rand(Nb, G, d, generator=g) * 0.01 + 1e-3).half()
        cmin = (-torch.rand(Nb, G, d, generator=g)).half()
        t.update({f"{PREFIX}.codebook": codes, f"{PREFIX}.codebook_scale": scale, f"{PREFIX}.codebook_min": cmin})
        C = codes.float() * scale.float()[:, :, None, :] + cmin.float()[:, :, None, :]
    else:
        C16 = torch.randn(Nb, G, n, d, generator=g).half()
        t[f"{PREFIX}.codebook"] = C16
        C = C16.float()
    C = C.half().float()  # the runtime keeps fp16 codebooks
    W = C[(torch.arange(N) // k)[:, None], torch.arange(G)[None, :], I].reshape(N, G * d)[:, :M]
    if rank:
        A = (torch.randn(N, rank, generator=g) * 0.05).half()
        B = (torch.randn(rank, M, generator=g) * 0.05).half()
        t.update({f"{PREFIX}.lowrank_a": A, f"{PREFIX}.lowrank_b": B})
        W = W + A.float() @ B.float()
    bvec = None
    if bias:
        bvec = torch.randn(N, generator=g).half()
        t[f"{PREFIX}.bias"] = bvec
    meta = {"method": "athena", "shape": [N, M], "d": d, "n": n, "k": k, "codebook_bits": codebook_bits, "rank": rank}
    return t, meta, W, bvec


def spec(x, W, bvec):
    y = x.float() @ W.t()
    return y + bvec.float() if bvec is not None else y


@pytest.mark.parametrize("N,M,d,n,k,rank,bias,cbits", [
    (37, 29, 3, 16, 20, 3, True, 8),
    (64, 100, 2, 64, 64, 0, False, 16),
    (20, 9, 4, 256, 7, 2, False, 8),
])
def test_reference_path_matches_format_spec(N, M, d, n, k, rank, bias, cbits):
    t, meta, W, bvec = checkpoint_layer(N, M, d, n, k, rank, bias, cbits)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device=DEV, path="reference")
    x = torch.randn(2, 3, M).half()
    y = layer(x.to(DEV)).cpu()
    assert y.shape == (2, 3, N) and y.dtype == torch.float16
    assert rel_err(y, spec(x, W, bvec)) < 4e-3
    y32 = layer(x.float().to(DEV)).cpu()  # reference computes in fp32 and returns x's dtype
    assert y32.dtype == torch.float32 and rel_err(y32, spec(x.float(), W, bvec)) < 1e-5
    Wq = layer.dequantize_weight().cpu()
    assert Wq.dtype == torch.float16 and Wq.shape == (N, M)
    if rank == 0:
        assert torch.equal(Wq.float(), W)


def test_matches_quantize_qlayers_when_available():
    qlayers = pytest.importorskip("quantize.qlayers")
    t, meta, W, bvec = checkpoint_layer(40, 33, 3, 64, 16, rank=2, bias=True)
    theirs = qlayers.AthenaLayer.from_tensors(PREFIX, t, meta)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device=DEV, path="reference")
    x = torch.randn(4, 33)
    ref = x @ theirs.dequantize(include_lowrank=True).t() + bvec.float()
    assert rel_err(layer(x.to(DEV)).cpu(), ref) < 1e-3  # their fp32 codebook vs our fp16 one


@pytest.mark.parametrize("path", ["triton-decode", "triton-prefill", "dequant-matmul"])
@pytest.mark.parametrize("T", [1, 3])
def test_forced_paths_agree_with_reference(path, T):
    t, meta, W, bvec = checkpoint_layer(45, 70, 2, 64, 32, rank=3, bias=True, seed=T)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device=DEV, path=path)
    ref_layer = PQLinear.from_tensors(PREFIX, t, meta, device=DEV, path="reference")
    x = torch.randn(T, 1, 70).half()
    y = layer(x.to(DEV)).cpu()
    assert y.shape == (T, 1, 45) and y.dtype == torch.float16
    assert rel_err(y, ref_layer(x.to(DEV)).cpu()) < 4e-3
    assert rel_err(y, spec(x, W, bvec)) < 4e-3


def test_env_var_forces_a_path(monkeypatch, caplog):
    t, meta, _, _ = checkpoint_layer(33, 40, 2, 16, 40)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device="cpu")
    monkeypatch.setenv(PATH_ENV, "triton-prefill")
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert layer.choose_path(5) == "triton-prefill"
    else:  # a GPU machine: Triton paths on CPU tensors only exist under the interpreter
        with pytest.raises(ValueError, match="needs a CUDA device"):
            layer.choose_path(5)
    monkeypatch.setenv(PATH_ENV, "no-such-path")
    with pytest.raises(ValueError, match="unknown PQLinear path"):
        layer(torch.randn(1, 40))


def test_path_decided_once_per_token_class(monkeypatch):
    """choose_path asks select_path once per (token class, forced path, device): every count above
    MMA_MAX_TOKENS shares one answer, smaller counts and a forced path get their own."""
    import athena_runtime.pq_linear as pql
    t, meta, _, _ = checkpoint_layer(33, 40, 2, 16, 40)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device="cpu")
    calls = []
    monkeypatch.setattr(pql, "select_path", lambda tokens, *a, **k: calls.append(tokens) or "reference")
    for tokens in (2048, 65, 4096, 1, 1, pql.MMA_MAX_TOKENS, pql.MMA_MAX_TOKENS + 1):
        assert layer.choose_path(tokens) == "reference"
    assert calls == [2048, 1, pql.MMA_MAX_TOKENS]
    monkeypatch.setenv(PATH_ENV, "reference")
    layer.choose_path(2048)
    assert calls == [2048, 1, pql.MMA_MAX_TOKENS, 2048]


def test_select_path_rules():
    geo = PQGeometry(4096, 4096, 2, 64, 4096)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert select_path(1, cpu, geo, torch.float16) == "reference"
    yes = lambda g, t, dt: True  # noqa: E731
    no = lambda g, t, dt: False  # noqa: E731
    assert select_path(1, gpu, geo, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=yes, cuda_frag_ok=no) == "cuda-decode"
    assert select_path(4, gpu, geo, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=yes, cuda_frag_ok=no) == "cuda-decode"
    assert select_path(5, gpu, geo, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=yes, cuda_frag_ok=no) == "cuda-mma"
    assert select_path(64, gpu, geo, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=yes, cuda_frag_ok=no) == "cuda-mma"
    assert select_path(65, gpu, geo, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=yes, cuda_frag_ok=no, cuda_dequant_ok=no) == "dequant-matmul"
    assert select_path(8, gpu, geo, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=no, cuda_frag_ok=no) == "cuda-decode"
    assert select_path(9, gpu, geo, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=no, cuda_frag_ok=no, cuda_dequant_ok=no) == "dequant-matmul"
    assert select_path(4, gpu, geo, torch.float16, cuda_decode_ok=no, cuda_mma_ok=no, cuda_frag_ok=no) == "triton-decode"
    assert select_path(5, gpu, geo, torch.float16, cuda_decode_ok=no, cuda_mma_ok=yes, cuda_frag_ok=no) == "cuda-mma"
    assert select_path(5, gpu, geo, torch.float16, cuda_decode_ok=no, cuda_mma_ok=no, cuda_frag_ok=no, cuda_dequant_ok=no) == "dequant-matmul"
    kw = dict(cuda_decode_ok=yes, cuda_mma_ok=yes, cuda_frag_ok=yes)
    assert select_path(1, gpu, geo, torch.float16, **kw) == "cuda-decode"
    assert select_path(2, gpu, geo, torch.float16, **kw) == "cuda-frag"
    assert select_path(64, gpu, geo, torch.float16, **kw) == "cuda-frag"
    assert select_path(65, gpu, geo, torch.float16, **kw, cuda_dequant_ok=no) == "dequant-matmul"
    assert select_path(16, gpu, geo, torch.float16, cuda_decode_ok=no, cuda_mma_ok=no, cuda_frag_ok=yes) == "cuda-frag"
    big_n = PQGeometry(64, 64, 2, 1024, 64)
    assert select_path(1, gpu, big_n, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=no, cuda_frag_ok=no, cuda_dequant_ok=no) == "dequant-matmul"
    assert select_path(65, gpu, geo, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=yes, cuda_dequant_ok=yes) == "cuda-dequant"
    assert select_path(2048, gpu, geo, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=yes, cuda_dequant_ok=yes) == "cuda-dequant"
    assert select_path(9, gpu, geo, torch.float16, cuda_decode_ok=yes, cuda_mma_ok=no, cuda_frag_ok=no, cuda_dequant_ok=yes) == "cuda-dequant"
    with pytest.raises(ValueError, match="unknown"):
        select_path(1, gpu, geo, torch.float16, forced="fast")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_path(1, cpu, geo, torch.float16, forced="cuda-decode")


def test_triton_path_on_cpu_needs_interpreter(monkeypatch):
    geo = PQGeometry(8, 8, 2, 16, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_path(1, torch.device("cpu"), geo, torch.float16, forced="triton-decode")


def test_path_logged_once_per_layer_shape(caplog):
    t, meta, _, _ = checkpoint_layer(27, 31, 2, 16, 27)  # a shape no other test uses
    a = PQLinear.from_tensors(PREFIX, t, meta, device="cpu", path="reference")
    b = PQLinear.from_tensors(PREFIX, t, meta, device="cpu", path="reference")
    with caplog.at_level(logging.INFO, logger="athena_runtime.pq_linear"):
        for layer in (a, b, a):
            layer(torch.randn(2, 31))
    msgs = [r.getMessage() for r in caplog.records if "[27 x 31]" in r.getMessage()]
    assert len(msgs) == 1 and "path reference" in msgs[0]


def test_lowrank_padded_to_aligned_rank():
    t, meta, W, bvec = checkpoint_layer(30, 20, 2, 16, 30, rank=3, bias=True)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device="cpu", path="reference")
    assert layer.lowrank_a.shape == (30, 16) and layer.lowrank_b.shape == (16, 20)
    x = torch.randn(2, 20)
    assert rel_err(layer(x), spec(x, W, bvec)) < 1e-5


def test_empty_batch():
    t, meta, _, _ = checkpoint_layer(10, 12, 2, 16, 10)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device="cpu")
    assert layer(torch.randn(0, 12)).shape == (0, 10)


# ----------------------------------------------------------------------------------- errors
def _mutate(t, key, value):
    t = dict(t)
    if value is None:
        del t[key]
    else:
        t[key] = value
    return t


@pytest.mark.parametrize("change,match", [
    (lambda t, m: (_mutate(t, f"{PREFIX}.indices", None), m), "indices: missing"),
    (lambda t, m: (_mutate(t, f"{PREFIX}.indices", t[f"{PREFIX}.indices"][:, :-1]), m), "indices: expected"),
    (lambda t, m: (_mutate(t, f"{PREFIX}.codebook", t[f"{PREFIX}.codebook"].half()), m), "codebook: expected"),
    (lambda t, m: (_mutate(t, f"{PREFIX}.codebook_scale", None), m), "codebook_scale: missing"),
    (lambda t, m: (_mutate(t, f"{PREFIX}.lowrank_a", t[f"{PREFIX}.lowrank_a"].float()), m), "lowrank_a: expected"),
    (lambda t, m: (t, {**m, "rank": 0}), "present but the layer's rank is 0"),
    (lambda t, m: (t, {**m, "method": "gptq"}), "method must be 'athena'"),
    (lambda t, m: (t, {**m, "n": 48}), "power of two"),
    (lambda t, m: (t, {**m, "codebook_bits": 4}), "codebook_bits"),
    (lambda t, m: (t, {**m, "shape": [24]}), "shape must be"),
    (lambda t, m: (t, {**m, "d": 0}), "d must be"),
    (lambda t, m: (t, {**m, "k": 7}), "codebook: expected"),
])
def test_from_tensors_errors(change, match):
    t, meta, _, _ = checkpoint_layer(24, 20, 2, 16, 12, rank=2)
    t, meta = change(t, meta)
    with pytest.raises(ValueError, match=match):
        PQLinear.from_tensors(PREFIX, t, meta, device="cpu")


def test_wrong_input_width():
    t, meta, _, _ = checkpoint_layer(10, 12, 2, 16, 10)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device="cpu")
    with pytest.raises(ValueError, match=r"\[\.\.\., 12\]"):
        layer(torch.randn(3, 11))
