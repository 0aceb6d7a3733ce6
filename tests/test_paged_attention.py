"""Paged attention: Triton decode kernel vs the PyTorch reference, and the reference vs dense attention."""

import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses
import json
import math
import random

import pytest
import torch

from athena_runtime.kernels import paged_attention as pa
from athena_runtime.kernels.tuning import Tuning
from athena_runtime.kv_cache import KeyBasis, KVCache

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _basis(num_layers, num_kv_heads, head_dim, seed):
    """A random key basis: offsets m and δ of the keys' size, channel scales d in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed + 100)
    shape = (num_layers, num_kv_heads, head_dim)
    return KeyBasis(
        offset=torch.randn(shape, generator=gen) * 2,
        scale=torch.rand(shape, generator=gen) + 0.5,
        sink=torch.randn(shape, generator=gen) * 3,
    )


def _filled_cache(
    fmt,
    seq_lens,
    num_kv_heads,
    head_dim,
    block_size,
    seed,
    num_layers=1,
    hadamard=False,
    calibrated=False,
    group_size=None,
):
    """A cache holding random K/V for each sequence (positions from 0), its blocks shuffled, with a
    random key basis when `calibrated`; returns cache, tables, K, V."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3
    cache = KVCache.create(
        fmt,
        num_layers,
        num_blocks,
        block_size,
        num_kv_heads,
        head_dim,
        DEVICE,
        hadamard=hadamard,
        group_size=group_size,
    )
    if calibrated:
        cache.set_key_basis(_basis(num_layers, num_kv_heads, head_dim, seed))
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    tables, keys, values = [], [], []
    for n, nb in zip(seq_lens, need):
        blocks, ids = ids[:nb], ids[nb:]
        tables.append(blocks)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen) * 2
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        k[:, :, 3] += 4.0  # an outlier channel
        k[0] -= 6.0  # a first key unlike the others (an attention sink)
        pos = torch.arange(n)
        slots = torch.tensor(blocks)[pos // block_size] * block_size + pos % block_size
        for layer in range(num_layers):
            cache.write(layer, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), pos.to(DEVICE))
        keys.append(k)
        values.append(v)
    width = max(need)
    table = torch.tensor([t + [cache.null_block] * (width - len(t)) for t in tables], dtype=torch.int32)
    return cache, table.to(DEVICE), keys, values


def _dense_attention(q, k, v, sm_scale, window, softcap=None):
    """q [n, H, D] at the last n positions of k, v [L, Hkv, D]; causal (+ window, + soft-capping); float64."""
    n, num_heads, _ = q.shape
    length, group = k.shape[0], num_heads // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * sm_scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    pos_q, pos_k = torch.arange(length - n, length), torch.arange(length)
    visible = pos_k[None] <= pos_q[:, None]
    if window is not None:
        visible &= pos_k[None] > pos_q[:, None] - window
    return torch.einsum("hnl,lhd->nhd", scores.masked_fill(~visible, -math.inf).softmax(-1), v)


@pytest.mark.parametrize(
    "window,softcap,calibrated",
    [
        (None, None, False),
        (7, None, False),
        (None, None, True),
        (7, None, True),
        (None, 1.5, False),  # soft-capping is not shift-invariant: no key offset (kv_calibration drops it then)
    ],
)
def test_reference_prefill_matches_dense_attention(window, softcap, calibrated):
    """Exact cache: attention in the stored basis (query in, output back) is attention on q, k, v."""
    seq_lens, new = [23, 5, 40], [9, 5, 1]
    cache, table, keys, values = _filled_cache(
        "fp32", seq_lens, 2, 64, 16, seed=1, hadamard=calibrated, calibrated=calibrated
    )
    q = torch.randn(sum(new), 6, 64)
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    out = pa.paged_attention_reference(
        cache.query(0, q.to(DEVICE)),
        cache,
        0,
        table.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32),
        qsl,
        0.125,
        window,
        softcap,
    )
    out = cache.output(out).cpu()
    for s in range(3):
        want = _dense_attention(q[qsl[s] : qsl[s + 1]], keys[s], values[s], 0.125, window, softcap)
        torch.testing.assert_close(out[qsl[s] : qsl[s + 1]].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
@pytest.mark.parametrize("num_splits", [1, 3, None])  # None: the automatic choice (4 or 2 here, see below)
@pytest.mark.parametrize(
    "fmt,queries_per_kv,window,hadamard,calibrated,head_dim,block_size",
    [
        ("fp16", 1, None, False, False, 64, 16),
        ("fp16", 3, 5, False, False, 64, 16),
        ("fp16", 3, None, True, True, 64, 16),  # the key basis on an unquantized cache: the sink score term
        ("int8", 3, None, False, False, 64, 16),
        ("int8", 1, 20, True, False, 64, 16),
        ("int4", 3, None, True, True, 64, 16),  # what the runner uses: calibrated, GQA
        ("int4", 1, None, True, False, 64, 16),  # uncalibrated: rotation only
        ("int4", 4, 20, True, True, 64, 8),  # window: position 0 (and its sink term) out of sight for long sequences
        ("int4", 2, None, True, True, 128, 16),  # two scale/zero groups per head
        ("int4", 2, 7, True, True, 16, 4),  # tiny heads (the runner tests' models): miscompiled on the GPU once
    ],
)
def test_triton_decode_matches_reference(
    fmt, queries_per_kv, window, hadamard, calibrated, head_dim, block_size, num_splits
):
    """Every format, GQA, windows, tiles of several pages and the context split over programs. Tiles
    are 64 keys (Tuning.decode_tile_tokens), so 200 keys make 4 tiles: 3 splits take 2, 2 and 0 of them (a split
    without tiles), and a 1-key sequence leaves two splits empty; the table width (13 or 25 pages) is
    no multiple of the tile's pages. The automatic choice on CPU (32 stand-in SMs, 16 programs) is 4
    splits, 2 with a window (a window spans at most 2 tiles)."""
    num_kv_heads = 2
    seq_lens = [1, 16, 17, 50, 64, 65, 130, 200]  # odd lengths, block- and tile-boundary neighbours
    cache, table, _, _ = _filled_cache(
        fmt, seq_lens, num_kv_heads, head_dim, block_size, seed=2, hadamard=hadamard, calibrated=calibrated
    )
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q = torch.randn(len(seq_lens), num_kv_heads * queries_per_kv, head_dim).to(DEVICE, dtype)
    q = cache.query(0, q)
    args = (
        q,
        cache,
        0,
        table,
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE),
        head_dim**-0.5,
        window,
    )
    got = pa.paged_attention_decode(*args, num_splits=num_splits)
    if num_splits is None and DEVICE == "cpu":
        tuning = Tuning.for_device(q.device)
        tile = tuning.decode_launch_shape(head_dim)[0]
        auto = pa.decode_num_splits(len(seq_lens), num_kv_heads, table.shape[1], block_size, tile, tuning, window)
        assert auto == (4 if window is None else 2)
    want = pa.paged_attention_reference(*args)
    assert not torch.isnan(got).any()
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_triton_decode_fp16_query_gqa(fmt):
    """A float16 query, as on the GPU: GQA groups go through tl.dot in float16 (the interpreter, like
    the tensor cores, multiplies float16 operands exactly and accumulates in float32), so the GPU
    tolerance is checked on CPU too. Sharp attention (q x 3): with dequantized K rounded to float16 in
    one part, int8 and int4 land at 1.5-1.8x the tolerance here; with two parts at 0.3x."""
    seq_lens = [1, 16, 50, 65, 200]
    rotated = fmt == "int4"
    cache, table, _, _ = _filled_cache(fmt, seq_lens, 2, 64, 16, seed=6, hadamard=rotated, calibrated=rotated)
    q = 3 * torch.randn(len(seq_lens), 6, 64, generator=torch.Generator().manual_seed(7))
    q = cache.query(0, q.to(DEVICE))
    args = (
        q.half(),
        cache,
        0,
        table,
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE),
        0.125,
        None,
    )
    got = pa.paged_attention_decode(*args, num_splits=3)
    want = pa.paged_attention_reference(*args)
    assert got.dtype == torch.float16 and not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
@pytest.mark.parametrize(
    "fmt,queries_per_kv,head_dim,group_size,block_size",
    [
        ("int8", 1, 96, 32, 16),  # head_dim below BLOCK_D: the last scale group is masked
        ("int8", 2, 96, 48, 12),  # a group size that is no power of two (per-element scale gathers), 12-key pages
        ("fp16", 2, 64, None, 128),  # pages larger than the tile: tiles cut pages
        ("int4", 1, 64, 32, 24),  # int4 with two groups per head, pages cut by tiles
    ],
)
def test_triton_decode_odd_geometry(fmt, queries_per_kv, head_dim, group_size, block_size):
    """Shapes the default models do not have; 3 splits. The key basis needs a power-of-two head_dim."""
    seq_lens = [1, 23, 64, 150]
    pow2 = head_dim & (head_dim - 1) == 0
    cache, table, _, _ = _filled_cache(
        fmt, seq_lens, 2, head_dim, block_size, seed=4, hadamard=pow2, calibrated=pow2, group_size=group_size
    )
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q = cache.query(0, torch.randn(len(seq_lens), 2 * queries_per_kv, head_dim).to(DEVICE, dtype))
    args = (
        q,
        cache,
        0,
        table,
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE),
        head_dim**-0.5,
        None,
    )
    got = pa.paged_attention_decode(*args, num_splits=3)
    want = pa.paged_attention_reference(*args)
    assert not torch.isnan(got).any()
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_empty_sequence_gives_zeros(num_splits):
    """Padding rows of a CUDA-graph bucket: seq_len 0, every split empty, the output zeros."""
    cache, table, _, _ = _filled_cache("int8", [3, 1], 1, 64, 16, seed=3)
    q = torch.randn(2, 1, 64, device=DEVICE)
    seq_lens = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    out = pa.paged_attention_decode(
        q, cache, 0, table, seq_lens, torch.arange(3, device=DEVICE), 0.125, None, num_splits=num_splits
    )
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_decode_split_choice():
    """The split count depends on static shapes only: enough programs for 2 per SM, no more splits than
    the table width (or the window) has tiles, at most 16."""
    # Llama-2-7B on an H100 (132 SMs), 32 KV heads, a 4096-token table of 16-token pages, 64-key tiles
    h100 = Tuning(sms=132)
    assert pa.decode_num_splits(1, 32, 256, 16, 64, h100) == 9  # cdiv(264, 32)
    assert pa.decode_num_splits(16, 32, 256, 16, 64, h100) == 1  # 512 programs already
    assert pa.decode_num_splits(64, 32, 256, 16, 64, h100) == 1
    assert pa.decode_num_splits(1, 32, 8, 16, 64, h100) == 2  # a 128-token table: 2 tiles
    assert pa.decode_num_splits(1, 32, 256, 16, 64, h100, sliding_window=100) == 3  # cdiv(100, 64) + 1
    assert pa.decode_num_splits(1, 1, 1024, 16, 64, h100) == 16  # capped
    assert pa.decode_num_splits(0, 32, 256, 16, 64, h100) == 16  # no sequences: no division by zero
    # the CPU interpreter aims at 32 SMs whatever Tuning.sms says there
    assert pa.decode_num_splits(1, 32, 256, 16, 64, Tuning.for_device(torch.device("cpu"))) == 2


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
@pytest.mark.parametrize(
    "fmt,window,max_tokens,calibrated",
    [
        ("fp16", None, 4096, False),
        ("int8", 6, 4096, False),
        ("int4", None, 4096, True),
        ("int4", None, 25, False),
        ("fp16", 4, 25, False),
    ],
)
def test_mixed_batch_matches_reference(fmt, window, max_tokens, calibrated):
    """Continuous batching: prefill chunks (fresh and continued) between decode tokens; the one-token
    sequences go through the decode kernel in one launch, the chunks through SDPA."""
    seq_lens, new = [23, 1, 40, 17, 9, 30, 21, 5], [1, 1, 12, 1, 9, 1, 21, 5]  # fresh prompts: 9, 21, 5 tokens
    cache, table, _, _ = _filled_cache(fmt, seq_lens, 2, 64, 16, seed=5, calibrated=calibrated)
    q = (torch.randn(sum(new), 6, 64, generator=torch.Generator().manual_seed(6))).to(DEVICE)
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    if fmt == "fp16":
        q = q.half() if DEVICE == "cuda" else q
    tuning = dataclasses.replace(Tuning.for_device(q.device), fresh_sdpa_max_tokens=max_tokens)  # 25: SDPA groups
    want = pa.paged_attention_reference(q, cache, 0, table, lens, qsl, 0.125, window)
    got = pa.paged_attention_mixed(q, cache, 0, table, lens, qsl, 0.125, window, seq_lens, qsl.tolist(), tuning=tuning)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
@pytest.mark.parametrize("fmt,window", [("fp16", None), ("int4", None), ("fp16", 5), ("int8", 20)])
def test_mixed_batch_equal_length_prompts_batched(fmt, window, monkeypatch):
    """Fresh prompts of one length go through one causal SDPA call as a batch (7, 7, 7; 12, 12; 4),
    prompts longer than a sliding window through the masked call."""
    seq_lens, new = [7, 30, 7, 12, 7, 1, 12, 4], [7, 1, 7, 12, 7, 1, 12, 4]
    cache, table, _, _ = _filled_cache(fmt, seq_lens, 2, 64, 16, seed=9)
    q = (torch.randn(sum(new), 6, 64, generator=torch.Generator().manual_seed(10))).to(DEVICE)
    if fmt == "fp16" and DEVICE == "cuda":
        q = q.half()
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    calls = {"batched": 0, "masked": 0}
    same, masked = pa._same_length_prompts, pa._masked_prompts
    monkeypatch.setattr(
        pa, "_same_length_prompts", lambda *a: (calls.__setitem__("batched", calls["batched"] + 1), same(*a))[1]
    )
    monkeypatch.setattr(
        pa, "_masked_prompts", lambda *a: (calls.__setitem__("masked", calls["masked"] + 1), masked(*a))[1]
    )
    want = pa.paged_attention_reference(q, cache, 0, table, lens, qsl, 0.125, window)
    got = pa.paged_attention_mixed(q, cache, 0, table, lens, qsl, 0.125, window, seq_lens, qsl.tolist())
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)
    if window is None or window >= 12:
        assert calls == {"batched": 3, "masked": 0}
    else:  # lengths 7 and 12 > 5 are masked (one call), 4 is batched
        assert calls == {"batched": 1, "masked": 1}


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
def test_bench_attention_smoke(capsys):
    """`python -m bench.attention --smoke`: the benchmark's plumbing (cache, tables, check, table)."""
    if DEVICE == "cuda":
        pytest.skip("the smoke run is the CPU one")
    from bench import attention

    assert (
        attention.main(
            ["--smoke", "--formats", "int4", "--batches", "2", "--contexts", "70", "--splits", "1,auto", "--json"]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["num_splits"] for r in rows] == [1, 2] and all(r["max_err"] < 1e-5 for r in rows)


def _step_kv(keys, values, new):
    """This step's k, v rows (the last `new[s]` tokens of each sequence, in batch order), as the model passes them."""
    return (
        torch.cat([k[len(k) - m :] for k, m in zip(keys, new)]).to(DEVICE),
        torch.cat([v[len(v) - m :] for v, m in zip(values, new)]).to(DEVICE),
    )


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
@pytest.mark.parametrize(
    "fmt,window,calibrated,hadamard",
    [
        ("fp16", None, False, False),
        ("fp16", 5, False, True),
        ("int8", None, False, False),
        ("int4", None, True, True),
        ("int4", 6, True, True),
    ],
)
def test_mixed_batch_fresh_prompts_attend_over_their_own_kv(fmt, window, calibrated, hadamard):
    """With the step's k, v given, whole prompts attend over them as computed (no read back, no quantization):
    their rows match dense attention over the exact keys (1e-3, or fp16 rounding), the decode tokens and the
    continued chunk still match the reference over the cache; an fp16 cache gives what reading it back gives."""
    seq_lens, new = [23, 1, 40, 17, 9, 30, 21, 5], [1, 1, 12, 1, 9, 1, 21, 5]  # fresh prompts: 9, 21, 5 tokens
    cache, table, keys, values = _filled_cache(
        fmt, seq_lens, 2, 64, 16, seed=5, calibrated=calibrated, hadamard=hadamard
    )
    q = torch.randn(sum(new), 6, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    qsl_list = [0] + torch.tensor(new).cumsum(0).tolist()
    qsl = torch.tensor(qsl_list, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    fresh = _step_kv(keys, values, new)
    query = cache.query(0, q)
    got = cache.output(
        pa.paged_attention_mixed(query, cache, 0, table, lens, qsl, 0.125, window, seq_lens, qsl_list, fresh_kv=fresh)
    )
    via_cache = cache.output(
        pa.paged_attention_mixed(query, cache, 0, table, lens, qsl, 0.125, window, seq_lens, qsl_list)
    )
    assert not torch.isnan(got).any()
    for s, (n_new, length) in enumerate(zip(new, seq_lens)):
        rows = slice(qsl_list[s], qsl_list[s + 1])
        if n_new == length > 1:  # a whole prompt: exact keys (a one-token sequence goes with the decode tokens)
            want = _dense_attention(q[rows].cpu(), keys[s], values[s], 0.125, window)
            torch.testing.assert_close(got[rows].double().cpu(), want, rtol=1e-3, atol=1e-3)
        else:  # decode tokens and the continued chunk: untouched
            torch.testing.assert_close(got[rows], via_cache[rows])
    if fmt == "fp16" and not hadamard:  # keys as fp16 as the model's are: what the cache gives back, to rounding
        fresh16 = tuple(t.half().to(q.dtype) for t in fresh)
        same = pa.paged_attention_mixed(
            query, cache, 0, table, lens, qsl, 0.125, window, seq_lens, qsl_list, fresh_kv=fresh16
        )
        torch.testing.assert_close(same, via_cache, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
@pytest.mark.parametrize(
    "fmt,window,softcap,calibrated",
    [
        ("fp16", 5, None, False),
        ("int8", None, 1.5, False),  # soft-capped scores (exp clamped: no overflow for large scores)
        ("int4", 20, None, True),  # what a Gemma runner with --kv-cache int4 runs: calibrated basis, GQA, window
        ("int4", None, None, True),
    ],
)
def test_triton_decode_wide_heads(fmt, window, softcap, calibrated):
    """Gemma 3's heads: head_dim 256 (decode_launch_shape: 32-key tiles, 8 warps), 4 queries per KV head,
    sliding windows, soft-capping; 3 splits; against the reference and, for the unquantized cache, dense attention."""
    assert Tuning().decode_launch_shape(256) == (32, 8) and Tuning().decode_launch_shape(128) == (64, 4)
    seq_lens = [1, 33, 70, 96]
    cache, table, keys, values = _filled_cache(
        fmt, seq_lens, 2, 256, 16, seed=11, hadamard=fmt == "int4", calibrated=calibrated
    )
    q = torch.randn(len(seq_lens), 8, 256, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    if DEVICE == "cuda":
        q = q.half()
    args = (
        cache.query(0, q),
        cache,
        0,
        table,
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE),
        256**-0.5,
        window,
    )
    got = pa.paged_attention_decode(*args, num_splits=3, softcap=softcap)
    want = pa.paged_attention_reference(*args, softcap=softcap)
    assert not torch.isnan(got).any()
    tol = 2e-3 if q.dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    if fmt == "fp16" or softcap is not None:  # int8 with a cap: the reference itself against exact attention
        for s in range(len(seq_lens)):
            dense = _dense_attention(q[s : s + 1].float().cpu(), keys[s], values[s], 256**-0.5, window, softcap)
            torch.testing.assert_close(cache.output(want)[s : s + 1].double().cpu(), dense, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
def test_mixed_batch_soft_capped(monkeypatch):
    """With soft-capping every chunk (whole prompts too) takes the per-sequence einsum path: SDPA is never called,
    and the result is the reference's."""
    seq_lens, new = [23, 1, 40, 9], [1, 1, 12, 9]
    cache, table, _, _ = _filled_cache("fp16", seq_lens, 2, 64, 16, seed=13)
    q = torch.randn(sum(new), 6, 64, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)

    def no_sdpa(*a, **k):
        raise AssertionError("SDPA cannot soft-cap")

    monkeypatch.setattr(pa.F, "scaled_dot_product_attention", no_sdpa)
    want = pa.paged_attention_reference(q, cache, 0, table, lens, qsl, 0.125, 6, softcap=2.0)
    got = pa.paged_attention_mixed(q, cache, 0, table, lens, qsl, 0.125, 6, seq_lens, qsl.tolist(), softcap=2.0)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)
    uncapped = pa.paged_attention_reference(q, cache, 0, table, lens, qsl, 0.125, 6)
    assert not torch.allclose(uncapped, want, atol=1e-3)  # the cap really bites at these scores


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
@pytest.mark.parametrize("fmt,window,calibrated", [("fp16", None, False), ("int4", None, True), ("int8", 23, False)])
def test_one_sequence_chunk_kernel_matches_the_reference(fmt, window, calibrated):
    """A chunk after a cached prefix as the prefill CUDA graphs run it: every query row one 'sequence' of the decode
    kernel over the shared block table, keys up to its own position, against the PyTorch path and dense attention;
    padding rows (positions past the real keys, table padded with the null block) stay finite and inside the table."""
    block_size, num_kv_heads, head_dim, L, T = 4, 2, 32, 61, 9  # 9 real rows at positions 52..60, 7 padding rows
    cache, table, keys, values = _filled_cache(fmt, [L], num_kv_heads, head_dim, block_size, 5, calibrated=calibrated)
    table = torch.cat([table, torch.full((1, 5), cache.null_block, dtype=torch.int32, device=DEVICE)], 1)  # 80 keys
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q = cache.query(0, torch.randn(T + 7, num_kv_heads * 2, head_dim).to(DEVICE, dtype))
    positions = torch.arange(L - T, L - T + q.shape[0], device=DEVICE)
    seq_lens = torch.tensor([L], dtype=torch.int32, device=DEVICE)
    args = (q, cache, 0, table, seq_lens, positions, head_dim**-0.5, window)
    got = pa.one_sequence_attention(*args, use_kernel=True)
    want = pa.one_sequence_attention(*args, use_kernel=False)
    assert torch.isfinite(got).all()
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(got[:T].float(), want[:T].float(), rtol=tol, atol=tol)
    if fmt == "fp16" and not calibrated:  # the cache stores K/V rounded to fp16: the dense spec within that
        dense = _dense_attention(q[:T].double().cpu(), keys[0].double(), values[0].double(), head_dim**-0.5, window)
        torch.testing.assert_close(got[:T].double().cpu(), dense, rtol=5e-3, atol=5e-3)


@pytest.mark.skipif(pa.triton is None, reason="needs Triton")
@pytest.mark.parametrize("fmt,window,calibrated", [("fp16", None, False), ("int4", 11, True), ("int8", None, False)])
def test_fresh_prompts_of_unequal_lengths_share_padded_sdpa_calls(fmt, window, calibrated, monkeypatch):
    """Whole prompts of 12, 11, 10, 12, 9 and 3 tokens among decode tokens and a continued chunk: with the step's k, v
    they go through padded causal SDPA calls (12, 12, 11, 10, 9 | 3 by the 25% padding rule; with an 11-token window
    the 12-token prompts go through the masked call: 11, 10, 9 | 3), each row equal to dense attention over its own
    prompt's exact keys; the per-step index tensors are built once and reused by a second layer's call."""
    seq_lens = [12, 30, 11, 10, 1, 12, 9, 25, 3]
    new = [12, 1, 11, 10, 1, 12, 9, 4, 3]  # fresh: 12, 11, 10, 12, 9, 3; decode: 30, 1; continued: 25 (4 new)
    cache, table, keys, values = _filled_cache(fmt, seq_lens, 2, 64, 16, seed=7, calibrated=calibrated)
    q = torch.randn(sum(new), 6, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    qsl_list = [0] + torch.tensor(new).cumsum(0).tolist()
    qsl = torch.tensor(qsl_list, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    fresh, query = _step_kv(keys, values, new), cache.query(0, q)
    groups = []
    padded = pa._padded_prompts
    monkeypatch.setattr(
        pa, "_padded_prompts", lambda *a, **k: (groups.append(sorted(a[5][s] for s in a[4])), padded(*a, **k))[1]
    )
    step_cache: dict = {}
    args = (query, cache, 0, table, lens, qsl, 0.125, window, seq_lens, qsl_list)
    got = cache.output(pa.paged_attention_mixed(*args, fresh_kv=fresh, step_cache=step_cache))
    via_cache = cache.output(pa.paged_attention_mixed(*args))
    again = cache.output(pa.paged_attention_mixed(*args, fresh_kv=fresh, step_cache=step_cache))  # the next layer
    assert groups == ([[9, 10, 11, 12, 12]] if window is None else [[9, 10, 11]]) * 2
    assert ("padded", (0, 5, 2, 3, 6) if window is None else (2, 3, 6)) in step_cache
    torch.testing.assert_close(again, got)
    for s, (n_new, length) in enumerate(zip(new, seq_lens)):
        rows = slice(qsl_list[s], qsl_list[s + 1])
        if n_new == length > 1:
            want = _dense_attention(q[rows].cpu(), keys[s], values[s], 0.125, window)
            torch.testing.assert_close(got[rows].double().cpu(), want, rtol=1e-3, atol=1e-3)
        else:
            torch.testing.assert_close(got[rows], via_cache[rows])
