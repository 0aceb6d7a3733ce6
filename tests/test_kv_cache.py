"""The paged KV cache: quantization error bounds, the stored key basis, slot writes, byte accounting."""

import pytest
import torch

from athena_runtime.kv_cache import (
    FP16KVCache,
    Int4KVCache,
    Int8KVCache,
    KeyBasis,
    KVCache,
    blocks_for_budget,
    dequantize_asymmetric,
    dequantize_symmetric,
    hadamard_matrix,
    pack_nibbles,
    quantize_asymmetric,
    quantize_symmetric,
    unpack_nibbles,
)
from athena_runtime.kv_quant_params import CLIP_RATIOS

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`


def _kv(T=37, heads=3, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, heads, dim, generator=gen) * torch.logspace(-3, 1, T)[:, None, None]  # wide range
    x[0] = 0.0  # an all-zero token
    x[1, :, 5] = 300.0  # an outlier channel
    x[2] += 7.0  # an offset: every value of the token positive
    return x


def _basis(layers=2, heads=3, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return KeyBasis(
        offset=torch.randn(layers, heads, dim, generator=gen) * 3,
        scale=torch.rand(layers, heads, dim, generator=gen) + 0.5,
        sink=torch.randn(layers, heads, dim, generator=gen),
    )


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


@pytest.mark.parametrize("group_size", [64, 32, 16])
def test_asymmetric_quantization_without_clipping_is_within_half_a_step(group_size):
    x = _kv()
    n, scale, zero = quantize_asymmetric(x, 4, group_size, clip_ratios=(1.0,))
    groups = 64 // group_size
    assert n.dtype == torch.uint8 and n.max() <= 15 and n.shape == x.shape
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == zero.shape == (37, 3, groups)
    back = dequantize_asymmetric(n, scale, zero, group_size)
    err = (back - x).abs().unflatten(-1, (groups, group_size))
    xg = x.unflatten(-1, (groups, group_size))
    zero_rounding = 2.0**-11 * xg.amin(-1).abs()  # z is the group minimum rounded to float16
    assert (err <= (scale.float() / 2 + zero_rounding)[..., None] + 1e-6).all()
    assert (back[0] == 0).all()  # an all-zero token comes back exactly
    assert (back[2] > 0).all()  # the offset token keeps its sign: 16 levels over [min, max], not [-max, max]


def test_asymmetric_clip_search_never_loses_to_the_full_range():
    x = torch.randn(200, 4, 64, generator=torch.Generator().manual_seed(1))  # Gaussian, as after rotation
    sq = {}
    for name, ratios in (("full", (1.0,)), ("search", CLIP_RATIOS)):
        n, scale, zero = quantize_asymmetric(x, 4, 64, clip_ratios=ratios)
        sq[name] = (dequantize_asymmetric(n, scale, zero, 64) - x).square().sum(-1)  # [200, 4] per group
    assert (sq["search"] <= sq["full"] + 1e-6).all()
    assert sq["search"].sum() < 0.95 * sq["full"].sum()  # measured 0.92: the tails cost less than a wide step


def test_nibble_pack_round_trip():
    n = torch.randint(0, 16, (5, 2, 64), dtype=torch.uint8)
    packed = pack_nibbles(n)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 2, 32)
    assert torch.equal(unpack_nibbles(packed), n)
    assert packed[0, 0, 0] == int(n[0, 0, 0]) | (int(n[0, 0, 1]) << 4)  # element 0 is the low nibble


def test_hadamard_is_orthonormal_and_its_own_inverse():
    h = hadamard_matrix(64)
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-6, rtol=0)
    torch.testing.assert_close(h, h.T)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(48)


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4"])
@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("calibrated", [False, True])
def test_write_then_read_through_shuffled_slots(fmt, hadamard, calibrated):
    cache = KVCache.create(
        fmt, num_layers=2, num_blocks=6, block_size=16, num_kv_heads=3, head_dim=64, device="cpu", hadamard=hadamard
    )
    assert cache.hadamard == (hadamard or fmt == "int4")  # int4 always rotates
    if calibrated:
        cache.set_key_basis(_basis())
    k, v = _kv(seed=1), _kv(seed=2)
    slots = torch.randperm(6 * 16)[:37]
    positions = torch.arange(37) + 3
    positions[4] = 0  # one token at position 0: stored relative to m + δ
    cache.write(1, k, v, slots, positions)
    k_back, v_back = cache.read(1, slots)
    # read returns the stored basis: k̃ = ((k - m - [p = 0]·δ) ⊙ d)·H, ṽ = v·H, quantized
    stored = {"k": cache.stored_key(1, k, positions).float(), "v": cache.rotate(v).float()}
    for name, back in (("k", k_back), ("v", v_back)):
        x = stored[name]
        if fmt in ("fp32", "fp16"):  # rounding of the stored dtype, relative to each token's size
            size = x.abs().amax(-1, keepdim=True)
            assert ((back - x).abs() <= (1e-3 if fmt == "fp16" else 1e-6) * size).all()
        elif fmt == "int8":  # within half a step of its group
            _, scale = quantize_symmetric(x, 8, 32)
            assert ((back - x).abs() <= scale.float().repeat_interleave(32, -1) / 2 + 1e-5).all()
        else:  # exactly the asymmetric quantizer's output, no worse than the full-range error bound
            torch.testing.assert_close(back, dequantize_asymmetric(*quantize_asymmetric(x, 4, 64), 64))
            n, scale, zero = quantize_asymmetric(x, 4, 64, clip_ratios=(1.0,))
            bound = (dequantize_asymmetric(n, scale, zero, 64) - x).square().sum(-1)
            assert ((back - x).square().sum(-1) <= bound + 1e-5).all()
    if calibrated:  # with positions, the key at position 0 gets the sink key back
        k_pos, _ = cache.read(1, slots, positions)
        torch.testing.assert_close(k_pos[4], k_back[4] + cache.sink_key[1])
        torch.testing.assert_close(k_pos[5:], k_back[5:])
    assert (cache.read(0, slots)[0] == 0).all()  # other layers untouched


def test_key_basis_keeps_scores_up_to_a_constant_per_query():
    """q̃·k̃ (+ the sink key at position 0) = q·k - q·m for every key: the transform is exact."""
    cache = KVCache.create("fp32", 2, 4, 16, 3, 64, "cpu", hadamard=True)
    cache.set_key_basis(_basis())
    k, q = _kv(seed=3)[:20], torch.randn(5, 6, 64)  # 2 query heads per KV head
    positions = torch.arange(20)
    slots = torch.arange(20)
    cache.write(1, k, k, slots, positions)
    k_tilde, _ = cache.read(1, slots, positions)  # [20, 3, D]
    q_tilde = cache.query(1, q).unflatten(1, (3, 2))  # [5, 3, 2, D]
    got = torch.einsum("nhgd,lhd->nhgl", q_tilde, k_tilde)
    want = torch.einsum("nhgd,lhd->nhgl", q.unflatten(1, (3, 2)), k)
    diff = got - want  # = -q·m: the same for every key l
    torch.testing.assert_close(diff, diff[..., :1].expand_as(diff), atol=1e-3, rtol=0)
    torch.testing.assert_close(cache.output(cache.rotate(q)), q, atol=1e-5, rtol=0)  # o = õ·H undoes ṽ = v·H


def test_key_basis_shrinks_int4_score_error_on_offset_keys_with_a_sink():
    """Keys as Llama's: a large per-channel offset, a few heavy channels, a distinct first key."""
    gen = torch.Generator().manual_seed(0)
    T, D = 256, 64
    offset = torch.zeros(D)
    offset[[10, 11, 40]] = torch.tensor([12.0, -9.0, 7.0])
    k = offset + torch.randn(T, 1, D, generator=gen) * torch.linspace(0.3, 2.0, D)
    k[0] = offset - 3 * offset.sign() + torch.randn(D, generator=gen) * 0.3  # the sink
    q = torch.randn(64, 1, D, generator=gen) * 2
    positions, slots = torch.arange(T), torch.arange(T)

    def score_error(basis):
        cache = KVCache.create("int4", 1, T // 16, 16, 1, D, "cpu")
        if basis is not None:
            cache.set_key_basis(basis)
        cache.write(0, k, k, slots, positions)
        k_tilde, _ = cache.read(0, slots, positions)
        s = torch.einsum("nhd,lhd->nl", cache.query(0, q), k_tilde)
        exact = torch.einsum("nhd,lhd->nl", q, k)
        err = (s - s.mean(-1, keepdim=True)) - (exact - exact.mean(-1, keepdim=True))  # up to a shift per query
        return err.square().mean() / exact.var(-1).mean()

    m = k[1:].mean(0, keepdim=True)  # [1, 1, D]
    var_k, q2 = k[1:].var(0), q.square().mean(0)
    d = (q2 / var_k).pow(0.25)
    basis = KeyBasis(offset=m, scale=(d / d.square().mean().sqrt())[None], sink=k[:1] - m)
    assert score_error(basis) < 0.5 * score_error(None)


def test_set_key_basis_checks_shapes_and_scale():
    cache = KVCache.create("int4", 2, 4, 16, 3, 64, "cpu")
    with pytest.raises(ValueError, match="shape"):
        cache.set_key_basis(_basis(layers=1))
    b = _basis()
    with pytest.raises(ValueError, match="> 0"):
        cache.set_key_basis(KeyBasis(b.offset, -b.scale, b.sink))


def test_classes_bytes_and_budget():
    args = (4, 10, 16, 8, 128, "cpu")
    fp16, int8, int4 = (KVCache.create(f, *args) for f in ("fp16", "int8", "int4"))
    assert type(fp16) is FP16KVCache and type(int8) is Int8KVCache and type(int4) is Int4KVCache
    assert (int8.group_size, int4.group_size) == (32, 64)
    assert fp16.bytes_per_token() == 2 * 4 * 8 * 128 * 2
    assert int8.bytes_per_token() == 2 * 4 * 8 * (128 + 4 * 2)  # int8 + a float16 scale per 32
    assert int4.bytes_per_token() == 2 * 4 * 8 * (64 + 2 * 4)  # nibbles + float16 scale and zero per 64
    assert fp16.bytes_per_token() / int4.bytes_per_token() >= 3.5  # 0.5625 bytes per element
    assert int4.k.shape == (4, 11, 16, 8, 64) and int4.k_scale.shape == int4.k_zero.shape == (4, 11, 16, 8, 2)
    assert int8.k_zero is None and fp16.k_scale is None
    for cache in (fp16, int8, int4):
        n = blocks_for_budget(cache.bytes_per_token() * 16 * 100, cache.fmt, 4, 16, 8, 128)
        assert n == 99  # one block's worth is the null block
    with pytest.raises(ValueError, match="unknown KV cache format"):
        KVCache.create("fp8", *args)
    with pytest.raises(ValueError, match="group_size"):
        KVCache.create("int8", 4, 10, 16, 8, 48, "cpu", group_size=32)
    with pytest.raises(ValueError, match="power-of-two"):
        KVCache.create("int4", 4, 10, 16, 8, 96, "cpu", group_size=32)  # int4 rotates: needs 2^n
