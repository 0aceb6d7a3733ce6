"""The one-launch quantized KV write (kernels/kv_write.py) against the cache's PyTorch write: Triton under
TRITON_INTERPRET=1 on CPU (conftest), on the GPU when there is one.

Exactness (kv_write.py docstring): without rotation the stored bytes are identical; with it the kernel's
x·H sums in another order than the reference's matmul, so a rare value may round the other way. There
the tests ask: nearly all stored values identical, every dequantized value within 1.5 quantization steps
of the reference's (one step for a flipped n, a bit more for an int4 group that took another clip ratio
of equal error), and no more total quantization error than the reference."""

import logging

import pytest
import torch

import athena_runtime.kv_cache as kv_cache_module
from athena_runtime.kernels.kv_write import hadamard_entry, kv_write, kv_write_unsupported
from athena_runtime.kv_cache import KeyBasis, KVCache, hadamard_matrix, unpack_nibbles

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FIELDS = ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero")


def _twin_caches(fmt, layers, Hkv, D, hadamard, calibrated, group_size, seed):
    """Two identical caches whose storage holds random bytes (so untouched rows are visible)."""
    gen = torch.Generator().manual_seed(seed)
    caches = [
        KVCache.create(fmt, layers, 4, 4, Hkv, D, DEV, hadamard=hadamard, group_size=group_size) for _ in range(2)
    ]
    for name in FIELDS:
        t = getattr(caches[0], name)
        if t is None:
            continue
        if t.dtype.is_floating_point:
            t.copy_(torch.randn(t.shape, generator=gen))
        else:
            t.copy_(torch.randint(-128 if t.dtype == torch.int8 else 0, 128, t.shape, generator=gen))
        getattr(caches[1], name).copy_(t)
    if calibrated:
        basis = KeyBasis(
            offset=torch.randn(layers, Hkv, D, generator=gen) * 3,
            scale=torch.rand(layers, Hkv, D, generator=gen) + 0.5,
            sink=torch.randn(layers, Hkv, D, generator=gen),
        )
        for c in caches:
            c.set_key_basis(basis)
    return caches


def _kv(T, Hkv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(T, Hkv, D, generator=gen) * 2 + 0.5
    v = torch.randn(T, Hkv, D, generator=gen) * torch.logspace(-2, 1, T)[:, None, None]
    k[0], v[0] = 0.0, 0.0  # all zero: every clip ratio ties, the first must win
    k[1, :, 3] = 60.0  # an outlier channel
    v[2] += 5.0  # an offset: all values of the token positive
    return k.to(DEV, dtype), v.to(DEV, dtype)


def _codes(cache, name):
    """The stored integers of field `name` (nibbles unpacked), as int32."""
    t = getattr(cache, name)
    return (unpack_nibbles(t) if cache.fmt == "int4" and name in ("k", "v") else t).to(torch.int32)


def _steps(cache, layer, slots):
    """The quantization step of every stored element [len(slots), Hkv, D]: its group's scale."""
    out = []
    for scale in (cache.k_scale, cache.v_scale):
        s = scale[layer].view(-1, cache.num_kv_heads, scale.shape[-1])[slots].float()
        out.append(s.repeat_interleave(cache.group_size, -1))
    return out


CASES = [  # fmt, hadamard, calibrated, head_dim, Hkv, group_size, dtype, tokens
    ("int8", False, False, 128, 3, None, torch.float16, 7),
    ("int8", False, True, 64, 1, None, torch.float32, 5),  # the key basis without rotation
    ("int8", True, False, 64, 3, None, torch.float16, 6),
    ("int8", True, True, 128, 1, 16, torch.bfloat16, 5),
    ("int4", True, False, 128, 1, None, torch.float16, 9),
    ("int4", True, True, 64, 3, None, torch.float16, 8),
    ("int4", True, True, 128, 3, None, torch.float32, 5),
    ("int4", True, True, 64, 1, 32, torch.bfloat16, 6),
    ("int8", False, False, 256, 2, None, torch.float16, 4),  # Gemma 3's head_dim (two warps per program)
    ("int4", True, True, 256, 1, None, torch.float16, 5),
]


@pytest.mark.parametrize("fmt,hadamard,calibrated,D,Hkv,group_size,dtype,T", CASES)
def test_kernel_write_matches_reference(fmt, hadamard, calibrated, D, Hkv, group_size, dtype, T):
    seed = D * 10 + Hkv + T
    kern, ref = _twin_caches(fmt, 2, Hkv, D, hadamard, calibrated, group_size, seed)
    before = {name: getattr(kern, name).clone() for name in FIELDS if getattr(kern, name) is not None}
    k, v = _kv(T, Hkv, D, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(5 * 4, generator=gen)[:T].to(DEV)  # the null block's slots included
    positions = (torch.randperm(40, generator=gen)[:T] + 1).to(DEV)
    positions[T // 2] = 0  # a first token: stored relative to m + δ
    kern.write(1, k, v, slots, positions, use_triton=True)
    ref.write(1, k, v, slots, positions, use_triton=False)

    written = torch.zeros(5 * 4, dtype=torch.bool, device=DEV)
    written[slots] = True
    for name, old in before.items():  # rows not written (and the other layer) are untouched
        new = getattr(kern, name)
        assert torch.equal(new[0], old[0]), name
        rows = new[1].view(-1, Hkv, new.shape[-1])
        assert torch.equal(rows[~written], old[1].view(-1, Hkv, new.shape[-1])[~written]), name

    rotated = kern.rotation is not None
    for name in before:
        a, b = (_codes(c, name) if name in ("k", "v") else getattr(c, name) for c in (kern, ref))
        if not rotated:  # every operation rounds as the reference: identical bytes
            assert torch.equal(a, b), name
            continue
        a = a[1].view(-1, Hkv, a.shape[-1])[slots]
        b = b[1].view(-1, Hkv, b.shape[-1])[slots]
        differ = (a != b).sum().item()
        if name in ("k", "v"):  # an n / q off by one where x·H landed on the other side of a rounding
            assert differ <= 0.01 * a.numel(), (name, differ)
        else:  # a group's float16 scale / zero (or its clip ratio)
            assert differ <= 1 + 0.02 * a.numel(), (name, differ)

    steps = [torch.maximum(s_k, s_r) for s_k, s_r in zip(_steps(kern, 1, slots), _steps(ref, 1, slots))]
    for pos in (None, positions):  # dequantized, in the stored basis; with positions the sink key is added back
        got, want = kern.read(1, slots, pos), ref.read(1, slots, pos)
        for g, w, step in zip(got, want, steps):
            assert not torch.isnan(g).any()
            if rotated:
                assert ((g - w).abs() <= 1.5 * step + 1e-6 * w.abs()).all()
            else:
                assert torch.equal(g, w)

    exact = (ref.stored_key(1, k, positions).float(), ref.rotate(v).float())  # x̃ before quantization
    for g, w, x in zip(kern.read(1, slots), ref.read(1, slots), exact):
        assert (g - x).square().sum() <= 1.01 * (w - x).square().sum() + 1e-9


def test_round_half_to_even_on_ties():
    """Values exactly halfway between two steps round to the even one, as torch.round."""
    cache, ref = (KVCache.create("int8", 1, 2, 4, 1, 64, DEV) for _ in range(2))
    steps = torch.arange(-15, 16, dtype=torch.float32) + 0.5  # x / s = k + 1/2
    group = torch.cat([steps / 16, torch.tensor([7.93])])  # amax 7.93: the float16 scale is exactly 1/16
    x = torch.cat([group, -group])  # two groups of 32
    k = x.view(1, 1, 64).to(DEV, torch.float16)
    slots = torch.zeros(1, dtype=torch.long, device=DEV)
    cache.write(0, k, k, slots, slots, use_triton=True)
    ref.write(0, k, k, slots, slots, use_triton=False)
    assert cache.k_scale[0, 0, 0, 0].tolist() == [1 / 16, 1 / 16]
    assert torch.equal(cache.k, ref.k) and torch.equal(cache.k_scale, ref.k_scale)
    assert cache.k[0, 0, 0, 0, :31].tolist() == torch.round(steps).int().tolist()  # ..., -2, 0, 0, 2, 2, 4, ...


def test_rotation_constant_is_the_caches():
    for n in (2, 8, 32, 64, 128, 256):
        assert hadamard_entry(n) == hadamard_matrix(n)[0, 0].item()


def test_default_path_is_the_reference_on_cpu_and_the_kernel_on_cuda(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(kv_cache_module, "kv_write", lambda *args: calls.append(args))
    cache = KVCache.create("int4", 1, 2, 4, 1, 64, DEV)
    k, v = _kv(3, 1, 64, torch.float16, 0)
    slots, positions = torch.arange(3, device=DEV), torch.arange(3, device=DEV)
    with caplog.at_level(logging.INFO, logger="athena_runtime.kv_cache"):
        cache.write(0, k, v, slots, positions)
        cache.write(0, k, v, slots, positions)
    assert len(calls) == (2 if DEV.type == "cuda" else 0)
    assert len([r for r in caplog.records if "KV cache write" in r.message]) == 1  # the path, logged once
    fp16 = KVCache.create("fp16", 1, 2, 4, 1, 64, DEV)
    with caplog.at_level(logging.INFO, logger="athena_runtime.kv_cache"):
        fp16.write(0, k, v, slots, positions)
    assert len(calls) == (2 if DEV.type == "cuda" else 0)  # fp16 keeps its own write
    assert any("KV cache write (fp16)" in r.message for r in caplog.records)  # its path is logged too
    torch.testing.assert_close(fp16.read(0, slots)[0], k.float())


def test_unsupported_caches_and_shapes_are_clear_errors():
    assert kv_write_unsupported(KVCache.create("fp16", 1, 2, 4, 1, 64, DEV)) is not None
    odd = KVCache.create("int8", 1, 2, 4, 1, 48, DEV, group_size=16)  # head_dim not a power of two
    assert "power" in kv_write_unsupported(odd)
    k, v = _kv(3, 1, 48, torch.float16, 0)
    slots = torch.arange(3, device=DEV)
    with pytest.raises(ValueError, match="kv_write"):
        kv_write(odd, 0, k, v, slots, slots)
    odd.write(0, k, v, slots, slots)  # the default path falls back to the reference
    cache = KVCache.create("int8", 1, 2, 4, 2, 64, DEV)
    k, v = _kv(3, 1, 64, torch.float16, 0)  # one KV head, the cache has two
    with pytest.raises(ValueError, match="kv_write"):
        kv_write(cache, 0, k, v, slots, slots)


def test_empty_write_is_a_no_op():
    cache = KVCache.create("int4", 1, 2, 4, 2, 64, DEV)
    k = torch.empty(0, 2, 64, dtype=torch.float16, device=DEV)
    idx = torch.empty(0, dtype=torch.long, device=DEV)
    cache.write(0, k, k, idx, idx, use_triton=True)
    assert (cache.k == 0).all() and (cache.k_scale == 0).all()
