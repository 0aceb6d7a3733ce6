"""The CUDA lookup-table kernel (athena_runtime/kernels/cuda/lut.cu) run on the CPU by `cuda_emulation.py`:
table CTAs, u CTAs and the one-token fused epilogue (its counters included) against the PyTorch reference,
on small odd shapes. The emulator runs the u CTAs, then the table CTAs, then the epilogue CTAs (each group
shuffled): the order that lets the epilogue CTAs' waits end on a CPU. It checks indexing, bounds and the
counters' reset, not timing or memory ordering (the GPU tests do).

Tolerance: 4e-3 relative Frobenius error against the fp32 reference (fp16 tables and partial sums).
"""

from __future__ import annotations

import ctypes

import cuda_emulation
import pytest
import torch

from athena_runtime.kernels import lut
from athena_runtime.kernels.layout import PQGeometry, pack_words, pad_codebook, row_chunks
from athena_runtime.kernels.pq_reference import pq_matmul_reference as pq_gemv_reference

pytestmark = pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs g++ >= 12 (C++20, _Float16)")

TOL = 4e-3
VARIANTS = [(1, 6, 4), (1, 6, 8), (1, 4, 32), (4, 6, 8), (8, 6, 2)]  # (T, bits, slab_w) emulated: one token at b = 6
# (4-word slabs, the runtime's launch, unless a test asks for 8) and 4, few tokens at b = 6


def _source() -> str:
    disp = "\n".join(
        f"    if (T == {t} && bits == {b} && slab_w == {s}) {{ launch(grid, {lut.THREADS}, [&] {{ "
        f"lut_kernel<{t}, {b}, {s}>((const __half*)x, stride_xt, t_valid, M, qweight, "
        "N_pad, (const __half*)codebook, G_pad, D, N, GW, k_rows, chunks, rows_per_chunk, n_row_progs, "
        "(__half*)partial, "
        "(const __half*)lr_b, stride_br, rank, m_vec, u, ep); }, phases); return 0; }"
        for t, b, s in VARIANTS
    )
    return (
        r"""
#include "lut.cu"
namespace athena { alignas(16) unsigned char smem_raw[64 * 1024]; }
using namespace athena;
extern "C" int run_lut(const uint16_t* x, int stride_xt, int t_valid, int M, const int* qweight, int N_pad,
                       const uint16_t* codebook, int G_pad, int D, int N, int GW, int k_rows, int chunks,
                       int rows_per_chunk, int n_row_progs, uint16_t* partial, const uint16_t* lr_b, int stride_br,
                       int rank, int m_vec, float* u, int T, int bits, int slab_w,
                       int* sync, uint16_t* y, const uint16_t* lr_a, int stride_an, const uint16_t* bias,
                       int n_out, int up_off, int glu, int tile) {
    EpiArgs ep{};
    if (y != nullptr)
        ep = EpiArgs{sync, (__half*)y, n_out, (const __half*)lr_a, stride_an, (const __half*)bias, n_out, up_off, glu,
                     (n_out + tile - 1) / tile, tile, 0};
    const unsigned n_table = (unsigned)(n_row_progs * (GW / slab_w));
    const dim3 grid{(unsigned)rank + n_table + (unsigned)ep.n_epi, 1, 1};
    const std::vector<unsigned> phases{(unsigned)rank, (unsigned)rank + n_table};
"""
        + disp
        + r"""
    return 1;
}
"""
    )


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    lib = cuda_emulation.build(_source(), tmp_path_factory.mktemp("pq_cuda_lut_emu"))
    P, i32 = ctypes.c_void_p, ctypes.c_int
    lib.run_lut.argtypes = [
        P,
        i32,
        i32,
        i32,
        P,
        i32,
        P,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        P,
        P,
        i32,
        i32,
        i32,
        P,
        i32,
        i32,
        i32,
        P,
        P,
        P,
        i32,
        P,
        i32,
        i32,
        i32,
        i32,
    ]
    return lib


def _layer(N, M, n, k, rank, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    geo = PQGeometry(N, M, 2, n, k)
    I = torch.randint(0, n, (N, geo.G), generator=g)
    C = (torch.randn(geo.Nb, geo.G, n, 2, generator=g) * 0.5).half()
    A = (torch.randn(N, rank, generator=g) * 0.1).half() if rank else None
    B = (torch.randn(rank, M, generator=g) * 0.1).half() if rank else None
    b = torch.randn(N, generator=g).half() if bias else None
    return geo, pack_words(I, geo), pad_codebook(C, geo), A, B, b


def _run(lib, x, geo, qw, cb, A, B, b, rows, *, fused, glu=None, tile=64, sync=None, slab_w=None):
    """What pq_gemv_cuda hands the kernel; returns (y or None, partial, u, sync)."""
    t_inst = next(t for t in lut.TOKENS if t >= x.shape[0])
    slab_w = slab_w or next(s for t, b, s in VARIANTS if (t, b) == (t_inst, geo.bits))
    chunks, n_row = row_chunks(geo, rows)
    rank = 0 if A is None else A.shape[1]
    partial = torch.full((geo.GW // slab_w, t_inst, geo.N_pad), float("nan")).half()
    u = torch.full((1, t_inst, max(rank, 1)), float("nan"))
    sync = torch.zeros(2 + n_row, dtype=torch.int32) if sync is None else sync
    n_out = glu[1] if glu else geo.N
    y = torch.full((1, n_out), float("nan")).half() if fused else None
    m_vec = geo.M // 8 * 8 if rank and geo.M % 8 == 0 else 0
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    rc = lib.run_lut(
        ptr(x),
        x.stride(0),
        x.shape[0],
        geo.M,
        ptr(qw),
        geo.N_pad,
        ptr(cb),
        geo.G_pad,
        geo.d,
        geo.N,
        geo.GW,
        geo.k,
        chunks,
        rows,
        n_row,
        ptr(partial),
        ptr(B),
        B.stride(0) if rank else 0,
        rank,
        m_vec,
        ptr(u),
        t_inst,
        geo.bits,
        slab_w,
        ptr(sync),
        ptr(y),
        ptr(A),
        A.stride(0) if rank else 0,
        ptr(b),
        n_out,
        glu[0] if glu else 0,
        1 if glu else 0,
        tile,
    )
    assert rc == 0, "no emulated variant"
    return y, partial, u, sync


def rel_err(y, ref):
    assert not torch.isnan(y.float()).any(), "NaN: an output element was not written"
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize(
    "N,M,n,k,rank,bias,rows,tile",
    [
        (300, 130, 64, 100, 8, True, 1024, 64),  # 3 codebook blocks, scalar u loads (M % 8 != 0), bias
        (4100, 72, 64, 4096, 8, False, 4096, 64),  # four passes per CTA, a second block of 4 rows
        (
            1100,
            136,
            64,
            4096,
            16,
            False,
            2048,
            128,
        ),  # two passes per CTA (the one-token double buffer), 16-byte u loads
        (257, 80, 16, 128, 0, True, 1024, 32),  # b = 4, no low-rank term, a part row quad at the end
        (203, 136, 64, 52, 24, True, 1024, 8),  # one-lane groups (8-row tiles), 4 blocks of 52 rows
        (130, 96, 64, 4096, 8, False, 1024, 256),  # one warp-wide group per warp, a tile longer than the layer
    ],
)
def test_fused_epilogue_emulated(lib, N, M, n, k, rank, bias, rows, tile):
    geo, qw, cb, A, B, b = _layer(N, M, n, k, rank, bias)
    x = torch.randn(1, M).half()
    ref = pq_gemv_reference(x, qw, cb, geo, A, B, b)
    y, _, _, sync = _run(lib, x, geo, qw, cb, A, B, b, rows, fused=True, tile=tile)
    assert rel_err(y, ref) < TOL
    assert not sync.any(), "the counters must be left zero for the next call"
    y2, _, _, _ = _run(lib, x, geo, qw, cb, A, B, b, rows, fused=True, tile=tile, sync=sync)
    assert torch.equal(y, y2)


def test_eight_word_slabs_emulated(lib):
    """The 8-word one-token variant (slab_w=8), fused, two passes per CTA."""
    geo, qw, cb, A, B, b = _layer(1100, 136, 64, 4096, 16, True, seed=5)
    x = torch.randn(1, 136).half()
    y, _, _, sync = _run(lib, x, geo, qw, cb, A, B, b, 2048, fused=True, slab_w=8)
    assert rel_err(y, pq_gemv_reference(x, qw, cb, geo, A, B, b)) < TOL
    assert not sync.any()


def test_partial_sums_emulated(lib):
    """Without the fused epilogue: the split-K partials and u, finished here as splitk_epilogue does."""
    geo, qw, cb, A, B, b = _layer(300, 130, 64, 100, 8, True, seed=1)
    x = torch.randn(1, 130).half()
    _, partial, u, sync = _run(lib, x, geo, qw, cb, A, B, b, 1024, fused=False)
    y = partial.float().sum(0)[:, : geo.N] + u[0] @ A.float().t() + b.float()
    assert rel_err(y, pq_gemv_reference(x, qw, cb, geo, A, B, b)) < TOL
    assert not sync.any()


def test_glu_emulated(lib):
    """silu(gate) · up from the fused epilogue (gate rows [0, F), up rows [up, up + F))."""
    F, up = 40, 48
    geo, qw, cb, A, B, b = _layer(up + F + 5, 96, 64, 64, 8, True, seed=2)
    x = torch.randn(1, 96).half()
    z = pq_gemv_reference(x, qw, cb, geo, A, B, b).float()
    y, _, _, sync = _run(lib, x, geo, qw, cb, A, B, b, 1024, fused=True, glu=(up, F))
    assert rel_err(y, torch.nn.functional.silu(z[:, :F]) * z[:, up : up + F]) < TOL
    assert not sync.any()


@pytest.mark.parametrize("T", [3, 8])
def test_few_tokens_emulated(lib, T):
    """Few tokens: table per token, partial sums and u for every token (rows past T are zero)."""
    geo, qw, cb, A, B, b = _layer(300, 130, 64, 100, 8, True, seed=T)
    x = torch.randn(T, 130).half()
    _, partial, u, sync = _run(lib, x, geo, qw, cb, A, B, b, 1024, fused=False)
    y = partial.float().sum(0)[:T, : geo.N] + u[0, :T] @ A.float().t() + b.float()
    assert rel_err(y, pq_gemv_reference(x, qw, cb, geo, A, B, b)) < TOL
    assert not u[0, T:].any() and not sync.any()
