"""The CPU fast path (athena_runtime/cpu/path.py): the compiled linear kernels against PyTorch on odd shapes, the
batched decode attention against the reference, and whole-model logits against the reference path
within the int8 / fp16 weight tolerances."""

import random

import pytest
import torch
from tiny_models import make_tiny_model

from athena_runtime.batch import SequenceChunk
from athena_runtime.cpu.linear import (
    KERNELS,
    LAYER_FORMATS,
    CPULinear,
    PQ8Linear,
    effective_weight,
    pq_uint8_form,
    quantize_groups_int8,
    quantize_rows_int8,
)
from athena_runtime.cpu.path import CPUPathSettings
from athena_runtime.model_runner import ModelRunner

pytestmark = pytest.mark.skipif(not KERNELS.available()[0], reason="no C compiler for the CPU kernels")

FAST = CPUPathSettings("fast")
REFERENCE = CPUPathSettings("reference")


@pytest.mark.parametrize("T", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("N,M", [(1, 1), (7, 13), (33, 8), (40, 1537), (832, 576)])
@pytest.mark.parametrize("weights", ["int8", "fp16", "q8g"])
def test_kernel_matches_torch_on_odd_shapes(T, N, M, weights):
    """y = x Wᵀ + b with the kernel's own (dequantized) weight: fp32 accumulation-order error only."""
    g = torch.Generator().manual_seed(N * 1000 + M + T)
    W, b, x = torch.randn(N, M, generator=g), torch.randn(N, generator=g), torch.randn(T, M, generator=g)
    lin = CPULinear(W, b, weights)
    want = x.double() @ lin.dequantize().double().T + b.double()
    got = lin(x)
    assert got.dtype == torch.float32 and got.shape == (T, N) and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * (M**0.5))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_threads_give_the_same_result(threads):
    before = torch.get_num_threads()
    W, x = torch.randn(200, 96), torch.randn(3, 96)
    lin = CPULinear(W, None)
    try:
        torch.set_num_threads(1)
        want = lin(x)
        torch.set_num_threads(threads)
        assert torch.equal(lin(x), want)  # rows are split over threads, each row's sum is the same
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("N,M", [(1, 1), (9, 33), (17, 64)])
def test_q8g_panels_round_trip(N, M):
    """pack_q8g stores rows in panels of 8 (the last padded) and columns in groups of 32; unpack_q8g inverts it."""
    from athena_runtime.cpu.linear import pack_q8g, quantize_groups_int8, unpack_q8g

    q, scale = quantize_groups_int8(torch.randn(N, M))
    qp, sp = pack_q8g(q, scale)
    assert qp.shape == (-(-N // 8), -(-M // 32), 8, 32) and sp.shape == (-(-N // 8), -(-M // 32), 8)
    q2, s2 = unpack_q8g(qp, sp, N, M)
    assert torch.equal(q2, q) and torch.equal(s2, scale)


def test_pq8_panels_round_trip_across_blocks():
    """Blocks of 5, 8 and 3 rows: each block's rows start a new panel (zero rows pad its last one)."""
    from athena_runtime.cpu.linear import pack_panels, unpack_panels

    U = torch.randint(0, 256, (16, 13), dtype=torch.uint8)
    starts = [0, 5, 13, 16]
    panels, prow, pblk = pack_panels(U, starts)
    assert prow.tolist() == [0, 5, 13] and pblk.tolist() == [0, 1, 2] and panels.shape == (3, 8 * 16)
    assert torch.equal(unpack_panels(panels, prow, torch.tensor(starts), 13), U)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("T", [1, 4, 6])
def test_packed_layers_threads_give_the_same_result(threads, T):
    """pq8 and q8g split their panels over threads: every row's sum is computed the same way."""
    before = torch.get_num_threads()
    pq8 = PQ8Linear([_pq_layers(7, 90, 50, 16, 2, True)])
    q8g = CPULinear(torch.randn(90, 50), None, "q8g")
    x = torch.randn(T, 50)
    try:
        torch.set_num_threads(1)
        want = pq8(x), q8g(x)
        torch.set_num_threads(threads)
        assert torch.equal(pq8(x), want[0]) and torch.equal(q8g(x), want[1])
    finally:
        torch.set_num_threads(before)


def test_int8_rows_bound_and_zero_rows():
    W = torch.randn(9, 50)
    W[3] = 0
    q, scale = quantize_rows_int8(W)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale[3] == 1 and (q[3] == 0).all()
    err = (q.float() * scale[:, None] - W).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    lin = CPULinear(W, None)
    assert lin(torch.randn(2, 50))[:, 3].abs().max() == 0


def test_int8_groups_bound_tail_group_and_zero_groups():
    W = torch.randn(5, 70)  # groups of 32, 32 and a tail of 6
    W[2, 32:64] = 0
    q, scale = quantize_groups_int8(W)
    assert q.shape == (5, 70) and scale.shape == (5, 3) and q.abs().max() <= 127 and scale[2, 1] == 1
    step = scale.repeat_interleave(32, 1)[:, :70]
    assert ((q.float() * step - W).abs() <= step / 2 + 1e-7).all()
    assert (q[2, 32:64] == 0).all()


def _pq_layers(seed, N, M, k, rank, bias, n=16, d=2):
    """Random PQ layers (8-bit codebooks, as the quantizer stores them) through the checkpoint format."""
    from athena_runtime.format.layers import AthenaLayer, quantize_codebook_uint8
    from athena_runtime.pq_linear import PQLinear

    g = torch.Generator().manual_seed(seed)
    G, Nb = -(-M // d), -(-N // k)
    codes, cscale, cmin = quantize_codebook_uint8(torch.randn(Nb, G, n, d, generator=g), dim=-2)
    layer = AthenaLayer(
        shape=(N, M),
        d=d,
        n=n,
        k=k,
        codebook_bits=8,
        indices=torch.randint(0, n, (N, G), generator=g),
        codebook=codes,
        codebook_scale=cscale,
        codebook_min=cmin,
        lowrank_a=torch.randn(N, rank, generator=g).half() * 0.1 if rank else None,
        lowrank_b=torch.randn(rank, M, generator=g).half() * 0.1 if rank else None,
        bias=torch.randn(N, generator=g).half() if bias else None,
    )
    tensors = layer.to_tensors("p")
    meta = {"method": "athena", "shape": [N, M], "d": d, "n": n, "k": k, "codebook_bits": 8, "rank": rank}
    return PQLinear.from_tensors("p", tensors, meta, "cpu", torch.float32)


@pytest.mark.parametrize("T", [1, 2, 3, 7, 16, 33])  # every token count through the panel kernel (4 tokens a pass)
@pytest.mark.parametrize(
    "N,M,k,rank,bias", [(1, 2, 4, 0, False), (9, 13, 4, 1, True), (40, 70, 16, 2, False), (33, 576, 64, 3, True)]
)
def test_pq8_layer_is_exact(T, N, M, k, rank, bias):
    """The uint8 form reproduces the PQ layer's Ŵ exactly (odd M: the last column group is half padding; several
    codebook blocks; low-rank terms padded by pq_linear; bias); y within fp32 accumulation-order error."""
    pq = _pq_layers(N * 100 + M, N, M, k, rank, bias)
    U, colscale, colmin = pq_uint8_form(pq)
    blk = torch.arange(N) // k
    assert torch.equal(colmin[blk] + colscale[blk] * U.float(), pq.dequantize_weight().float())
    lin = PQ8Linear([pq])
    x = torch.randn(T, M, generator=torch.Generator().manual_seed(T))
    x[:, 0] = 60.0  # a massive activation
    want = pq.reference_matmul(x.double().float()).double()
    got = lin(x)
    assert got.dtype == torch.float32 and got.shape == (T, N) and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_pq8_without_stored_codes_is_exact_or_refused():
    """A PQ layer without its stored codes (e.g. fused by PQLinear.concat): codes recovered from each codebook
    column's min and max only when that reproduces the codebook; otherwise the layer takes fp16 weights."""
    from athena_runtime.cpu.linear import compact

    pq = _pq_layers(5, 12, 30, 4, 1, False)
    full = pq_uint8_form(pq)
    pq.codebook_codes = None
    C = pq.codebook  # [Nb, G_pad, d, n]
    lo, hi = C[:, :15].amin(3, keepdim=True), C[:, :15].amax(3, keepdim=True)
    C[:, :15] = lo + torch.round((C[:, :15] - lo) / (hi - lo) * 255) * ((hi - lo) / 255)  # codes span 0..255
    got = pq_uint8_form(pq)
    assert got is not None
    blk = torch.arange(12) // 4
    assert torch.equal(got[2][blk] + got[1][blk] * got[0].float(), pq.dequantize_weight().float())
    assert full is not None
    C[0, 0, 0, 0] = (C[0, 0, 0, 0] + C[0, 0, 0, 1]) / 2 + 1e-3  # a centroid off the 255-step grid
    assert pq_uint8_form(pq) is None
    lin = compact([pq], "auto")
    assert isinstance(lin, CPULinear) and lin.weights == "fp16"


def test_pq8_fuses_parts_with_their_own_blocks_and_ranks():
    """q/k/v-like parts (own codebooks, ranks 0/2/1, one with a bias) in one call equal each part alone."""
    parts = [_pq_layers(1, 24, 40, 16, 0, False), _pq_layers(2, 8, 40, 4, 2, True), _pq_layers(3, 11, 40, 8, 1, False)]
    lin = PQ8Linear(parts)
    assert lin.out_features == 43 and lin.rank == 3
    x = torch.randn(3, 40)
    want = torch.cat([p.reference_matmul(x) for p in parts], 1)
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(
        lin.dequantize(), torch.cat([effective_weight(p)[0] for p in parts]), rtol=1e-6, atol=1e-6
    )


def test_settings_validation_and_env():
    assert CPUPathSettings.from_env({}) == CPUPathSettings("auto", "auto", None)
    assert CPUPathSettings.from_env(
        {"ATHENA_CPU_PATH": "reference", "ATHENA_CPU_THREADS": "3", "ATHENA_CPU_WEIGHTS": "int8"}
    ) == CPUPathSettings("reference", "int8", 3)
    assert CPUPathSettings.from_env({"ATHENA_CPU_WEIGHTS": "fp16"}).weights == "fp16"
    with pytest.raises(ValueError, match="unknown CPU path"):
        CPUPathSettings("turbo")
    with pytest.raises(ValueError, match="weight format"):
        CPUPathSettings(weights="int4")
    with pytest.raises(ValueError, match="integer"):
        CPUPathSettings.from_env({"ATHENA_CPU_THREADS": "two"})
    with pytest.raises(ValueError, match=">= 1"):
        CPUPathSettings(threads=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from compressed_fixture import write_compressed

    root = tmp_path_factory.mktemp("cpu_path_models")
    llama = make_tiny_model(root / "llama", "llama", tie_word_embeddings=True)
    mistral = make_tiny_model(root / "mistral", "mistral", sliding_window=5)
    return {
        "llama": llama,
        "mistral": mistral,
        "athena": write_compressed(make_tiny_model(root / "qwen2", "qwen2"), root / "athena", "athena"),
    }


def _tokens(n, seed):
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(runner, prompts, tables, steps):
    """Prefill each prompt alone, then decode all sequences together (greedy on the REFERENCE tokens
    `steps` so both paths see the same inputs); logits [step][seq]."""
    out = [[runner.execute([SequenceChunk(p, 0, t)])[0] for p, t in zip(prompts, tables)]]
    for i, toks in enumerate(steps):
        chunks = [SequenceChunk([tok], len(p) + i, t) for tok, p, t in zip(toks, prompts, tables)]
        out.append(list(runner.execute(chunks)))
    return out


@pytest.mark.parametrize("model,kv", [("llama", "fp32"), ("mistral", "fp32"), ("athena", "fp32"), ("athena", "int8")])
@pytest.mark.parametrize("weights,tolerance", [("auto", 1e-2), ("fp16", 2e-3), ("int8", 5e-2)])
def test_fast_path_logits_match_the_reference(models, model, weights, tolerance, kv):
    """Decode of three sequences of different lengths (one past the sliding window): max logit error
    relative to the logit range within the weight format's tolerance (measured on these random tiny models:
    fp16 <= ~1e-3, int8 <= ~3e-2, auto ~6e-3: its lm_head is int8 per 32 columns, on random embeddings; its PQ
    layers are exact, test_pq8_layer_is_exact); the fp16 one also bounds the attention and fusion changes."""
    folder = models[model]
    prompts = [_tokens(n, seed=n) for n in (3, 9, 14)]
    ids = random.Random(2).sample(range(24), 18)
    tables = [ids[0:6], ids[6:12], ids[12:18]]
    steps = [_tokens(3, seed=100 + i) for i in range(6)]
    kw = dict(kv_format=kv, kv_group_size=16, block_size=4, num_blocks=24, device="cpu")
    want = _run(ModelRunner.from_path(folder, cpu_path=REFERENCE, **kw), prompts, tables, steps)
    got = _run(ModelRunner.from_path(folder, cpu_path=CPUPathSettings("fast", weights), **kw), prompts, tables, steps)
    scale = max(x.abs().max().item() for row in want for x in row)
    err = max((g - w).abs().max().item() for gr, wr in zip(got, want) for g, w in zip(gr, wr)) / scale
    assert err < (tolerance if kv == "fp32" else max(tolerance, 2e-2)), err  # int8 KV: rounding flips amplify


@pytest.mark.parametrize("model,weights,kv", [("athena", "auto", "fp16"), ("mistral", "fp16", "fp32")])
def test_fused_decode_layer_equals_the_per_module_path(models, model, weights, kv):
    """A decode step's whole stack in one compiled call (CPUCausalLM), and its layers one call each
    (CPUDecoderLayer), compute exactly what the per-module path does (the same kernels in the same order): logits
    equal bit for bit, sliding window and PQ8 layers included; a prompt chunk still takes the per-module path."""
    from athena_runtime.cpu.decoder import CPUDecoderLayer
    from athena_runtime.cpu.layer_desc import LayerDesc
    from athena_runtime.cpu.stack import CPUCausalLM

    prompts = [_tokens(n, seed=n) for n in (3, 9, 14)]
    tables = [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]
    steps = [_tokens(3, seed=100 + i) for i in range(6)]
    kw = dict(kv_format=kv, block_size=4, num_blocks=24, device="cpu", cpu_path=CPUPathSettings("fast", weights))
    calls = {"stack_decode": 0, "layer_decode": 0}

    class Counting:  # the library, counting the one-call entry points
        def __init__(self, lib):
            self.lib = lib

        def __getattr__(self, name):
            fn = getattr(self.lib, name)
            if name not in calls:
                return fn

            def counted(*args):
                calls[name] += 1
                return fn(*args)

            return counted

    def runner(stack: bool, layer: bool):
        r = ModelRunner.from_path(models[model], **kw)
        assert type(r.model) is CPUCausalLM and all(type(x) is CPUDecoderLayer for x in r.model.model.layers)
        r.model._ops = Counting(r.model._ops)
        for x in r.model.model.layers:
            x._ops = Counting(x._ops)
            if not layer:
                x._fused = "off for this test"
        if not stack:
            r.model._stack = "off for this test"
        return r

    whole = runner(stack=True, layer=True)
    got = _run(whole, prompts, tables, steps)
    assert all(isinstance(d, LayerDesc) for d in whole.model._stack)
    assert calls == {"stack_decode": len(steps), "layer_decode": 0}  # every decode step, no prompt chunk
    per_layer = runner(stack=False, layer=True)
    by_layer = _run(per_layer, prompts, tables, steps)
    assert calls["layer_decode"] == len(per_layer.model.model.layers) * len(steps)
    want = _run(runner(stack=False, layer=False), prompts, tables, steps)
    for g, b, w in zip(got, by_layer, want):
        assert all(torch.equal(x, z) for x, z in zip(g, w)) and all(torch.equal(y, z) for y, z in zip(b, w))


def test_mixed_step_on_the_fast_path(models):
    """A step with a prompt chunk and two decode tokens equals the same sequences run alone."""
    folder = models["mistral"]
    kw = dict(kv_format="fp32", block_size=4, num_blocks=24, device="cpu", cpu_path=FAST)
    a, b, c = _tokens(6, 1), _tokens(10, 2), _tokens(7, 3)
    runner = ModelRunner.from_path(folder, **kw)
    runner.execute([SequenceChunk(a[:5], 0, [0, 1])])
    runner.execute([SequenceChunk(b[:9], 0, [2, 3, 4])])
    mixed = runner.execute(
        [SequenceChunk(a[5:6], 5, [0, 1]), SequenceChunk(c, 0, [5, 6]), SequenceChunk(b[9:10], 9, [2, 3, 4])]
    )
    for row, (toks, n) in enumerate([(a, 5), (c, 0), (b, 9)]):
        alone = ModelRunner.from_path(folder, **kw)
        if n:
            alone.execute([SequenceChunk(toks[:n], 0, [0, 1, 2])])
        want = alone.execute([SequenceChunk(toks[n:], n, [0, 1, 2])])[0]
        torch.testing.assert_close(mixed[row], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_path_is_logged_and_reference_is_selectable(models, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        ModelRunner.from_path(
            models["llama"],
            kv_format="fp32",
            block_size=4,
            num_blocks=4,
            device="cpu",
            cpu_path=CPUPathSettings("fast", threads=1),
        )
    assert "CPU path: fast" in caplog.text and "CPU threads: 1 (ATHENA_CPU_THREADS" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        runner = ModelRunner.from_path(
            models["llama"], kv_format="fp32", block_size=4, num_blocks=4, device="cpu", cpu_path=REFERENCE
        )
    assert "CPU path: reference" in caplog.text
    assert not any(isinstance(m, CPULinear) for m in runner.model.modules())


def test_fast_requested_without_kernels_is_an_error_and_auto_falls_back_loudly(monkeypatch, caplog):
    """A machine without a C compiler (PATH emptied, CC unset): the kernels cannot build."""
    import logging

    from athena_runtime.cpu import linear as cpu_linear
    from athena_runtime.cpu import path as cpu_path
    from athena_runtime.cpu.build import CPUKernels

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(cpu_linear, "KERNELS", CPUKernels())
    with pytest.raises(RuntimeError, match="ATHENA_CPU_PATH=fast, but CPU linear kernels unavailable.*no C compiler"):
        cpu_path.choose_path(FAST)
    with caplog.at_level(logging.WARNING):
        assert cpu_path.choose_path(CPUPathSettings("auto"))[0] == "reference"
    assert "CPU fast path unavailable" in caplog.text and "no C compiler" in caplog.text


def test_portable_build_matches_the_native_one(monkeypatch):
    """The scalar loops (a build for plain x86-64: no AVX2/FMA/F16C) give the native build's results within fp32
    accumulation-order error, for every packed format and token count."""
    import platform

    from athena_runtime.cpu import linear as cpu_linear
    from athena_runtime.cpu.build import CPUKernels

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable build is an x86-64 one")
    g = torch.Generator().manual_seed(3)
    W, b = torch.randn(41, 70, generator=g), torch.randn(41, generator=g)
    pq = _pq_layers(11, 41, 70, 16, 2, True)
    native = [CPULinear(W, b, f) for f in LAYER_FORMATS] + [PQ8Linear([pq])]
    monkeypatch.setattr(cpu_linear, "KERNELS", CPUKernels("x86-64"))
    portable = [CPULinear(W, b, f) for f in LAYER_FORMATS] + [PQ8Linear([pq])]
    for T in (1, 2, 3, 4, 5):
        x = torch.randn(T, 70, generator=g)
        for n, p in zip(native, portable):
            want = n(x)
            torch.testing.assert_close(p(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("weights,rel", [("auto", 1e-3), ("fp16", 2e-3)])
def test_fast_path_perplexity_equals_the_reference_path(models, weights, rel):
    """`athena eval ppl`'s runtime perplexity (prompt chunks of 64, the prefill path) on the compressed tiny model:
    the fast path's equals the reference path's within the weight format's bound (auto: exact PQ weights, its int8
    lm_head on random embeddings the only rounding: 2.7e-4 measured; fp16: 2^-11 per weight)."""
    from athena_runtime.perplexity import runtime_perplexity

    ids = torch.tensor(_tokens(200, seed=7))
    kw = dict(kv_format="fp32", block_size=4, num_blocks=40, device="cpu")
    ref = runtime_perplexity(ModelRunner.from_path(models["athena"], cpu_path=REFERENCE, **kw), ids, 96)
    fast = runtime_perplexity(
        ModelRunner.from_path(models["athena"], cpu_path=CPUPathSettings("fast", weights), **kw), ids, 96
    )
    assert fast["tokens"] == ref["tokens"] > 0
    assert fast["ppl"] == pytest.approx(ref["ppl"], rel=rel)
