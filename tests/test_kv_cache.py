"""The paged KV cache: quantization error bounds, Hadamard rotation, slot writes, byte accounting."""
import pytest
import torch

from athena_runtime.kv_cache import (FP16KVCache, Int4KVCache, Int8KVCache, KVCache, blocks_for_budget,
                                     dequantize_symmetric, hadamard_matrix, pack_int4, quantize_symmetric,
                                     unpack_int4)


def _kv(T=37, heads=3, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, heads, dim, generator=gen) * torch.logspace(-3, 1, T)[:, None, None]  # wide range
    x[0] = 0.0  # an all-zero token
    x[1, :, 5] = 300.0  # an outlier channel
    return x


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_quantization_error_is_at_most_half_a_step(bits):
    x = _kv()
    q, scale = quantize_symmetric(x, bits, group_size=32)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() <= qmax
    assert scale.dtype == torch.float16 and scale.shape == (37, 3, 2)
    err = (dequantize_symmetric(q, scale, 32) - x).abs().unflatten(-1, (2, 32))
    assert (err <= scale.float()[..., None] / 2 + 1e-6 * x.abs().max()).all()
    assert (dequantize_symmetric(q, scale, 32)[0] == 0).all()


def test_int4_pack_round_trip():
    q = torch.randint(-8, 8, (5, 2, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 2, 32)
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0, 0] == (int(q[0, 0, 0]) + 8) | ((int(q[0, 0, 1]) + 8) << 4)  # element 0 is the low nibble


def test_hadamard_is_orthonormal_and_its_own_inverse():
    h = hadamard_matrix(64)
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-6, rtol=0)
    torch.testing.assert_close(h, h.T)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(48)


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4"])
@pytest.mark.parametrize("hadamard", [False, True])
def test_write_then_read_through_shuffled_slots(fmt, hadamard):
    cache = KVCache.create(fmt, num_layers=2, num_blocks=6, block_size=16, num_kv_heads=3, head_dim=64,
                           device="cpu", hadamard=hadamard)
    k, v = _kv(seed=1), _kv(seed=2)
    slots = torch.randperm(6 * 16)[:37]
    cache.write(1, k, v, slots)
    k_back, v_back = cache.read(1, slots)
    if hadamard:  # stored rotated: rotating back recovers the input
        k_back, v_back = cache.rotate(k_back), cache.rotate(v_back)
    for x, back in ((k, k_back), (v, v_back)):
        if fmt in ("fp32", "fp16"):  # rounding of the stored dtype, relative to each token's size
            size = x.abs().amax(-1, keepdim=True)
            assert ((back - x).abs() <= (1e-3 if fmt == "fp16" else 1e-6) * size).all()
        else:  # per element within half a step of its group (measured in the stored basis)
            stored = cache.rotate(x) if hadamard else x
            q, scale = quantize_symmetric(stored, 8 if fmt == "int8" else 4, 32)
            step = scale.float().repeat_interleave(32, -1)
            raw = cache.rotate(back) if hadamard else back
            assert ((raw - stored).abs() <= step / 2 + 1e-5).all()
    assert (cache.read(0, slots)[0] == 0).all()  # other layers untouched


def test_hadamard_spreads_an_outlier_channel():
    """With two channels 8x the others, rotation more than halves the int4 relative error."""
    x = torch.randn(64, 1, 64, generator=torch.Generator().manual_seed(0))
    x[:, :, [7, 40]] *= 8
    errs = {}
    for hadamard in (False, True):
        cache = KVCache.create("int4", 1, 4, 16, 1, 64, "cpu", hadamard=hadamard)
        slots = torch.arange(64)
        cache.write(0, x, x, slots)
        back = cache.rotate(cache.read(0, slots)[0])
        errs[hadamard] = (back - x).pow(2).sum() / x.pow(2).sum()
    assert errs[True] < 0.5 * errs[False]


def test_classes_bytes_and_budget():
    args = (4, 10, 16, 8, 128, "cpu")
    fp16, int8, int4 = (KVCache.create(f, *args) for f in ("fp16", "int8", "int4"))
    assert type(fp16) is FP16KVCache and type(int8) is Int8KVCache and type(int4) is Int4KVCache
    assert fp16.bytes_per_token() == 2 * 4 * 8 * 128 * 2
    assert int8.bytes_per_token() == 2 * 4 * 8 * (128 + 4 * 2)
    assert int4.bytes_per_token() == 2 * 4 * 8 * (64 + 4 * 2)
    assert int4.k.shape == (4, 11, 16, 8, 64) and int4.k_scale.shape == (4, 11, 16, 8, 4)  # + null block
    for cache in (fp16, int8, int4):
        n = blocks_for_budget(cache.bytes_per_token() * 16 * 100, cache.fmt, 4, 16, 8, 128)
        assert n == 99  # one block's worth is the null block
    with pytest.raises(ValueError, match="unknown KV cache format"):
        KVCache.create("fp8", *args)
    with pytest.raises(ValueError, match="group_size"):
        KVCache.create("int8", 4, 10, 16, 8, 48, "cpu")
