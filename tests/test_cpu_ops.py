"""The CPU fast path's compiled decoder ops (athena_runtime/cpu/ops.c, through decoder.py / attention.py) against
their PyTorch references on odd shapes. Tolerances: float32 math in a different order (1e-5 relative); the
float16 cache rounds K/V exactly as torch's .half() does (compared bit for bit)."""

import pytest
import torch
import torch.nn.functional as F

from athena_runtime.batch import AttentionMetadata
from athena_runtime.cpu.attention import CPUPagedAttention
from athena_runtime.cpu.decoder import CPUMLP, CPURMSNorm, plain_cache
from athena_runtime.cpu.linear import KERNELS
from athena_runtime.cpu.specialize import specialize
from athena_runtime.kernels.fused_ops import add_rmsnorm_reference, rope_reference
from athena_runtime.kernels.paged_attention import paged_attention_reference
from athena_runtime.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not KERNELS.available()[0], reason="no C compiler for the CPU kernels")


@pytest.fixture(scope="module")
def ops():
    return KERNELS.load()


@pytest.mark.parametrize("T,H", [(1, 1), (3, 7), (2, 576), (5, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_add(ops, T, H, with_residual):
    g = torch.Generator().manual_seed(T * H)
    x, res, w = torch.randn(T, H, generator=g) * 5, torch.randn(T, H, generator=g), torch.randn(H, generator=g)
    res = res if with_residual else None
    y, r = torch.empty(T, H), torch.empty(T, H)
    ops.rmsnorm_add(
        x.data_ptr(), None if res is None else res.data_ptr(), w.data_ptr(), 1e-5, y.data_ptr(), r.data_ptr(), T, H
    )
    want_y, want_r = add_rmsnorm_reference(x, res, w, 1e-5)
    torch.testing.assert_close(r, want_r, rtol=0, atol=0)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)


def test_rmsnorm_module_falls_back_for_unit_offset():
    from athena_runtime.model import RMSNorm

    norm = RMSNorm(6, 1e-6, unit_offset=True)
    norm.weight = torch.nn.Parameter(torch.randn(6), requires_grad=False)
    want = norm(torch.ones(2, 6))[0]
    specialize(norm, KERNELS.load())
    assert isinstance(norm, CPURMSNorm)
    torch.testing.assert_close(norm(torch.ones(2, 6))[0], want)  # Gemma's (1 + w): PyTorch's forward


@pytest.mark.parametrize("T,heads,D", [(1, 1, 2), (3, 5, 6), (2, 12, 64)])
def test_rope_in_place_on_strided_rows(ops, T, heads, D):
    g = torch.Generator().manual_seed(D)
    buf = torch.randn(T, heads * D + 7, generator=g)  # 7 extra columns: rows are strided, untouched after
    pos = torch.arange(T, dtype=torch.float32)[:, None] * 3 + 1
    freqs = pos / 10000 ** (torch.arange(0, D, 2) / D)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().contiguous(), emb.sin().contiguous()
    x = buf[:, : heads * D].view(T, heads, D)
    want, tail = rope_reference(x.clone(), cos, sin), buf[:, heads * D :].clone()
    ops.rope_(buf.data_ptr(), T, buf.stride(0), heads, D, cos.data_ptr(), sin.data_ptr())
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(buf[:, heads * D :], tail)


@pytest.mark.parametrize("T,Fdim", [(1, 1), (3, 13), (2, 1536)])
def test_silu_mul(ops, T, Fdim):
    y = torch.randn(T, 2 * Fdim + 3) * 4  # gate at 0, up at Fdim + 3
    out = torch.empty(T, Fdim)
    ops.silu_mul(y.data_ptr(), T, y.stride(0), Fdim, Fdim + 3, out.data_ptr())
    torch.testing.assert_close(out, F.silu(y[:, :Fdim]) * y[:, Fdim + 3 : 2 * Fdim + 3], rtol=1e-5, atol=1e-6)


def test_mlp_module_falls_back_for_gelu():
    """Gemma's GELU-gated MLP: not the compiled SiLU kernel, PyTorch's forward (built by hand: MLP needs a config)."""
    mlp = CPUMLP.__new__(CPUMLP)
    torch.nn.Module.__init__(mlp)
    mlp.act, mlp.gate_up_proj = "gelu_tanh", None
    mlp.gate_proj = torch.nn.Linear(4, 3, bias=False)
    mlp.up_proj = torch.nn.Linear(4, 3, bias=False)
    mlp.down_proj = torch.nn.Linear(3, 4, bias=False)
    x = torch.randn(2, 4)
    want = mlp.down_proj(F.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), want)


def _cache(fmt, Hkv=3, D=10, blocks=12, bs=4):
    return KVCache.create(
        fmt, num_layers=2, num_blocks=blocks, block_size=bs, num_kv_heads=Hkv, head_dim=D, device="cpu"
    )


@pytest.mark.parametrize("fmt", ["fp32", "fp16"])
def test_kv_write_equals_the_reference_write(ops, fmt):
    a, b = _cache(fmt), _cache(fmt)
    T, Hkv, D = 5, 3, 10
    kv = torch.randn(T, 2 * Hkv * D + 1) * 3
    k, v = kv[:, : Hkv * D].view(T, Hkv, D), kv[:, Hkv * D : 2 * Hkv * D].view(T, Hkv, D)
    slots = torch.tensor([0, 7, 8, 30, 45], dtype=torch.int64)
    a.write_reference(1, k, v, slots, torch.arange(T))
    assert plain_cache(b)
    ops.kv_write(
        k.data_ptr(),
        v.data_ptr(),
        T,
        kv.stride(0),
        slots.data_ptr(),
        b.k[1].data_ptr(),
        b.v[1].data_ptr(),
        Hkv * D,
        int(fmt == "fp16"),
    )
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)  # float16: same rounding as .half(), bit for bit


@pytest.mark.parametrize("fmt", ["fp32", "fp16"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("H,Hkv,D", [(3, 3, 10), (6, 2, 16), (4, 1, 9)])
def test_decode_attention_equals_the_reference(fmt, window, H, Hkv, D):
    """Sequences of lengths 1, 6 and 11 (blocks of 4, tables out of order), one token each."""
    cache = _cache(fmt, Hkv, D)
    g = torch.Generator().manual_seed(H * 100 + D)
    cache.k[1].copy_(torch.randn(cache.k[1].shape, generator=g))
    cache.v[1].copy_(torch.randn(cache.v[1].shape, generator=g))
    lens = [1, 6, 11]
    tables = torch.tensor([[5, 12, 12], [3, 0, 12], [9, 1, 7]], dtype=torch.int32)  # 12: the null block
    attn = AttentionMetadata(
        kv_cache=cache,
        slot_mapping=torch.zeros(3, dtype=torch.int64),
        positions=torch.tensor([x - 1 for x in lens]),
        block_tables=tables,
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.arange(4, dtype=torch.int32),
        is_decode=True,
    )
    q = torch.randn(3, H * D + 5, generator=g)[:, : H * D].view(3, H, D)  # strided rows, as from the q/k/v output
    got = CPUPagedAttention(KERNELS.load())(q, cache, 1, attn, 0.3, window)
    want = paged_attention_reference(q.contiguous(), cache, 1, tables, attn.seq_lens, attn.query_start_loc, 0.3, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
