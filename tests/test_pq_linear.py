"""PQLinear: loading from checkpoint tensors (FORMAT.md), the backend registry's rules, paths agreeing, errors.

Triton paths run on CPU under TRITON_INTERPRET=1 (conftest.py). Tolerance: relative Frobenius
error 4e-3 for fp16 activations against the fp32 spec computed straight from the FORMAT tensors.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from test_pq_kernels import DEV, pack_format, rel_err

from athena_runtime.kernels import backends, nvrtc
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.tuning import Tuning
from athena_runtime.pq_linear import PATH_ENV, PQLinear

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

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


@pytest.mark.parametrize(
    "N,M,d,n,k,rank,bias,cbits",
    [
        (37, 29, 3, 16, 20, 3, True, 8),
        (64, 100, 2, 64, 64, 0, False, 16),
        (20, 9, 4, 256, 7, 2, False, 8),
    ],
)
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
    qlayers = pytest.importorskip("athena_runtime.format.layers")
    t, meta, W, bvec = checkpoint_layer(40, 33, 3, 64, 16, rank=2, bias=True)
    theirs = qlayers.AthenaLayer.from_tensors(PREFIX, t, meta)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device=DEV, path="reference")
    x = torch.randn(4, 33)
    ref = x @ theirs.dequantize(include_lowrank=True).t() + bvec.float()
    assert rel_err(layer(x.to(DEV)).cpu(), ref) < 1e-3  # their fp32 codebook vs our fp16 one


@pytest.mark.parametrize("path", ["triton-gemv", "triton-dequant"])
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


def test_env_var_forces_a_path(monkeypatch):
    t, meta, _, _ = checkpoint_layer(33, 40, 2, 16, 40)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device="cpu")
    assert layer.bind() == ["reference"] * 5
    monkeypatch.setenv(PATH_ENV, "triton-dequant")
    if os.environ.get("TRITON_INTERPRET") == "1":  # read when the layer binds (again: the forced path changed)
        assert layer.bind() == ["triton-dequant"] * 5 and layer.backend_for(5) == "triton-dequant"
    else:  # a GPU machine: Triton paths on CPU tensors only exist under the interpreter
        with pytest.raises(ValueError, match="needs a CUDA device"):
            layer.bind()
    monkeypatch.setenv(PATH_ENV, "no-such-path")
    with pytest.raises(ValueError, match="unknown PQLinear path"):
        layer.bind()


class FakeRegistry(backends.Registry):
    """The rules of backends.Registry with `ok` backends runnable (the reference always), on no real device."""

    def __init__(self, ok, fail=()):
        self.device, self.tuning, self.ok, self.fail, self.binds = torch.device("cpu"), Tuning(), set(ok), set(fail), []

    def can_run(self, name, geo, tokens, dtype):
        return (name in self.ok or name == "reference"), f"{name} off in this test"

    def bind(self, name, layer):
        self.binds.append(name)
        if name in self.fail:
            raise nvrtc.KernelUnavailable(f"{name} did not compile")
        return lambda x, glu, name=name: torch.full((x.shape[0], layer.geo.N), float(len(name)))


def test_registry_rules():
    geo, f16 = PQGeometry(4096, 4096, 2, 64, 4096), torch.float16

    def pick(tokens, ok):
        return FakeRegistry(ok).resolve(geo, tokens, f16)[0]

    cuda = {"lut", "frag", "dequant", "triton-gemv", "triton-dequant"}
    assert [pick(t, cuda) for t in (1, 2, 64, 65, 2048)] == ["lut", "frag", "frag", "dequant", "dequant"]
    no_frag = cuda - {"frag"}  # a recipe frag does not serve: the table up to 8 tokens, then dequantize
    assert [pick(t, no_frag) for t in (1, 4, 5, 8, 9)] == ["lut", "lut", "lut", "lut", "dequant"]
    triton = {"triton-gemv", "triton-dequant"}  # no NVRTC: the portable paths
    assert [pick(t, triton) for t in (1, 4, 5, 2048)] == [
        "triton-gemv",
        "triton-gemv",
        "triton-dequant",
        "triton-dequant",
    ]
    assert pick(1, set()) == "reference"
    name, skipped = FakeRegistry(triton).resolve(geo, 1, f16)
    assert name == "triton-gemv" and [n for n, _ in skipped] == ["lut", "frag"] and "off in this test" in skipped[0][1]
    assert backends.token_classes(Tuning()) == (1, 4, 8, 64, float("inf"))


def test_path_bound_once_per_token_class(monkeypatch):
    """One registry decision and one bind per token class when the layer first runs; none afterwards."""
    t, meta, _, _ = checkpoint_layer(33, 40, 2, 16, 40)
    layer = PQLinear.from_tensors(PREFIX, t, meta, device="cpu")
    reg = FakeRegistry({"lut", "frag", "dequant"})
    monkeypatch.setattr("athena_runtime.pq_linear.registry", lambda device: reg)
    assert layer(torch.randn(1, 40))[0, 0] == 3  # "lut"
    assert reg.binds == ["lut", "frag", "frag", "frag", "dequant"]
    assert layer(torch.randn(3, 40))[0, 0] == 4 and layer(torch.randn(65, 40))[0, 0] == 7  # "frag", "dequant"
    assert len(reg.binds) == 5 and layer.backend_for(64) == "frag" and layer.backend_for(10_000) == "dequant"


def test_a_backend_that_fails_to_bind_falls_back_loudly(monkeypatch, caplog):
    t, meta, _, _ = checkpoint_layer(29, 40, 2, 16, 40)  # a shape no other test uses
    layer = PQLinear.from_tensors(PREFIX, t, meta, device="cpu")
    reg = FakeRegistry({"lut", "triton-gemv", "dequant"}, fail={"lut"})
    monkeypatch.setattr("athena_runtime.pq_linear.registry", lambda device: reg)
    with caplog.at_level(logging.INFO, logger="athena_runtime.pq_linear"):
        assert layer.bind()[0] == "triton-gemv"
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "[29 x 40]" in r.getMessage()]
    assert (
        warn and "path triton-gemv" in warn[0] and "lut unavailable (KernelUnavailable: lut did not compile)" in warn[0]
    )


def test_triton_path_on_cpu_needs_interpreter(monkeypatch):
    t, meta, _, _ = checkpoint_layer(33, 40, 2, 16, 40)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        PQLinear.from_tensors(PREFIX, t, meta, device="cpu", path="triton-gemv").bind()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        PQLinear.from_tensors(PREFIX, t, meta, device="cpu", path="lut").bind()


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


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t, m: (_mutate(t, f"{PREFIX}.indices", None), m), "indices is missing"),
        (lambda t, m: (_mutate(t, f"{PREFIX}.indices", t[f"{PREFIX}.indices"][:, :-1]), m), "indices has shape"),
        (lambda t, m: (_mutate(t, f"{PREFIX}.codebook", t[f"{PREFIX}.codebook"].half()), m), "codebook has dtype"),
        (lambda t, m: (_mutate(t, f"{PREFIX}.codebook_scale", None), m), "codebook_scale is missing"),
        (lambda t, m: (_mutate(t, f"{PREFIX}.lowrank_a", t[f"{PREFIX}.lowrank_a"].float()), m), "lowrank_a has dtype"),
        (lambda t, m: (t, {**m, "rank": 0}), "lowrank_a present but athena.json says rank 0"),
        (lambda t, m: (t, {**m, "method": "gptq"}), "method is 'gptq', expected 'athena'"),
        (lambda t, m: (t, {**m, "n": 48}), "invalid recipe.*n=48"),
        (lambda t, m: (t, {**m, "codebook_bits": 4}), "codebook_bits"),
        (lambda t, m: (t, {**m, "shape": [24]}), "'shape' must be"),
        (lambda t, m: (t, {**m, "d": 0}), "invalid recipe.*d=0"),
        (lambda t, m: (t, {**m, "rank": 21}), "rank 21 exceeds min\\(N, M\\) = 20"),
        (lambda t, m: (t, {**m, "k": 7}), "codebook has shape"),
    ],
)
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


def _real_registry(cuda_reason, triton_reason):
    """The registry's own rules and can_run on a CUDA device whose probes gave these reasons (None: available)."""
    reg = object.__new__(backends.Registry)
    reg.device, reg.tuning = torch.device("cuda", 0), Tuning()
    reg.cuda_reason, reg.triton_reason = cuda_reason, triton_reason
    return reg


def test_registry_fallbacks_say_why():
    """No NVRTC: the Triton paths, then (no Triton either) the reference, each class naming every backend passed over
    and why (PQLinear logs that list once at WARNING). With NVRTC, the Triton paths still serve the --target-bits
    recipes the CUDA kernels are not instantiated for (b = 2, 3, 5, 7: lut and dequant take b in 4/6/8)."""
    f16, menu_b5 = torch.float16, PQGeometry(4096, 4096, 2, 32, 4096)
    geo = PQGeometry(4096, 4096, 2, 64, 4096)
    no_nvrtc = _real_registry("no NVRTC library (test)", None)
    assert [no_nvrtc.resolve(geo, t, f16)[0] for t in (1, 4, 5, 2048)] == ["triton-gemv"] * 2 + ["triton-dequant"] * 2
    bare = _real_registry("no NVRTC library (test)", "Triton is not installed")
    for t in (1, 4, 64, 2048):
        name, skipped = bare.resolve(geo, t, f16)
        assert name == "reference" and skipped and all(why for _, why in skipped)
        assert {n for n, why in skipped if "no NVRTC library" in why} >= {"dequant"}
        assert any(n.startswith("triton") and "Triton is not installed" in why for n, why in skipped)
    full = _real_registry(None, None)
    assert [full.resolve(geo, t, f16)[0] for t in (1, 2, 64, 65)] == ["lut", "frag", "frag", "dequant"]
    assert [full.resolve(menu_b5, t, f16)[0] for t in (1, 4, 5, 2048)] == ["triton-gemv"] * 2 + ["triton-dequant"] * 2
