"""PQ kernels against their PyTorch reference (the spec), on odd shapes.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py); the CUDA kernels and
the GPU timings are checked on a GPU by bench/kernels.py, and here only when CUDA is present.

Tolerances (relative Frobenius error against the fp32 reference on the same fp16 codebook):
    fp16 x  : 4e-3  (fp16 table entries / fp16 output rounding; measured ~5e-4)
    fp32 x  : 1e-5  (fp32 table, fp32 accumulate; the interpreter's dot is exact fp32)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from athena_runtime.format.bits import unpack_bits
from athena_runtime.kernels import layout
from athena_runtime.kernels.dequant_matmul import (
    dequant_matmul as pq_dequant_matmul,
)
from athena_runtime.kernels.dequant_matmul import (
    triton_dequantize_t as pq_dequantize_t,
)
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.pq_reference import pq_matmul_reference as pq_gemv_reference
from athena_runtime.kernels.splitk import splitk_epilogue
from athena_runtime.kernels.triton_lut import triton_lut_matmul as pq_gemv

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

pq_gemm_reference = pq_gemv_reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32 on a GPU goes through tf32 tensor-core dots (low-rank share, prefill): ~1e-3
TOL = {torch.float16: 4e-3, torch.float32: 1e-5 if DEV.type == "cpu" else 3e-3}


def pack_format(values: torch.Tensor, bits: int) -> torch.Tensor:
    """FORMAT.md bit stream, written independently of the code under test (numpy packbits)."""
    v = values.numpy().astype(np.int64)
    R, C = v.shape
    bit_matrix = ((v[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(R, C * bits)
    return torch.from_numpy(np.packbits(bit_matrix, axis=1, bitorder="little"))


def make_layer(N, M, d, n, k, rank=0, bias=False, seed=0):
    """Random layer in kernel layout (+ the raw I and C for spec checks)."""
    g = torch.Generator().manual_seed(seed)
    geo = PQGeometry(N, M, d, n, k)
    I = torch.randint(0, n, (N, geo.G), generator=g)
    C = (torch.randn(geo.Nb, geo.G, n, d, generator=g) * 0.5).half()
    A = (torch.randn(N, rank, generator=g) * 0.1).half() if rank else None
    B = (torch.randn(rank, M, generator=g) * 0.1).half() if rank else None
    b = torch.randn(N, generator=g).half() if bias else None
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return geo, layout.pack_words(I, geo).to(DEV), layout.pad_codebook(C, geo).to(DEV), to(A), to(B), to(b), I, C


def rel_err(y, ref):
    assert not torch.isnan(y).any(), "NaN in kernel output"
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("bits,count", [(1, 13), (3, 7), (6, 11), (7, 9), (8, 5), (11, 6), (16, 3)])
def test_unpack_bits_reads_format_stream(bits, count):
    vals = torch.randint(0, 1 << bits, (5, count), generator=torch.Generator().manual_seed(bits))
    packed = pack_format(vals, bits)
    assert packed.shape == (5, -(-count * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, count), vals.long())


def test_unpack_bits_rejects_wrong_width():
    with pytest.raises(ValueError, match="need 4 bytes per row, got 3"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 6, 5)


@pytest.mark.parametrize("N,M,d,n,k", [(37, 29, 3, 16, 20), (130, 50, 2, 64, 64), (200, 130, 2, 64, 64)])
def test_dequantize_kernel_is_exact(N, M, d, n, k):
    geo, qw, cb, A, B, b, _, _ = make_layer(N, M, d, n, k, 2, True)
    ref = layout.dequantize_reference(qw, cb, geo).t().contiguous()
    for bn, bw in ((128, 16), (128, 32), (64, 32)):
        assert torch.equal(pq_dequantize_t(qw, cb, geo, block_n=bn, block_w=bw), ref)
    out = torch.full((M + 3, N), float("nan"), dtype=torch.float16, device=DEV)
    pq_dequantize_t(qw, cb, geo, out=out[:M])  # into the top rows of a taller buffer
    assert torch.equal(out[:M], ref) and torch.isnan(out[M:]).all()
    with pytest.raises(ValueError, match="out must be"):
        pq_dequantize_t(qw, cb, geo, out=out[:M].t())


@pytest.mark.parametrize("rank,bias,T", [(0, False, 5), (3, True, 5), (16, False, 40)])
def test_dequant_matmul_with_lowrank_modes(rank, bias, T):
    """x (Ŵ + A B)ᵀ, [x | x Bᵀ] · [Ŵᵀ ; Aᵀ], x Ŵᵀ + u Aᵀ (+ bias) each equal the spec, fp32 and fp16."""
    geo, qw, cb, A, B, b, _, _ = make_layer(130, 50, 2, 64, 64, rank, bias)
    x = torch.randn(T, 50, generator=torch.Generator().manual_seed(4)).to(DEV)
    ref = pq_gemm_reference(x, qw, cb.float(), geo, A, B, b)
    for mode in ("fold", "rows", "addmm"):
        y = pq_dequant_matmul(
            x,
            qw,
            cb.float(),
            geo,
            None if A is None else A.float(),
            None if B is None else B.float(),
            None if b is None else b.float(),
            lowrank_mode=mode,
        )
        assert rel_err(y, ref) < TOL[torch.float32]
        y16 = pq_dequant_matmul(x.half(), qw, cb, geo, A, B, b, lowrank_mode=mode)
        assert y16.dtype == torch.float16 and rel_err(y16, ref) < TOL[torch.float16]


def test_kernels_check_operands():
    geo, qw, cb, A, B, b, _, _ = make_layer(20, 24, 2, 16, 20, 2, True)
    x = torch.randn(2, 24).half().to(DEV)
    with pytest.raises(ValueError, match="x must be"):
        pq_gemv(x[:, :10], qw, cb, geo)
    with pytest.raises(ValueError, match="codebook must be"):
        pq_gemv(x, qw, cb.transpose(2, 3).contiguous(), geo)
    with pytest.raises(ValueError, match="come together"):
        pq_dequant_matmul(x, qw, cb, geo, A, None)
    with pytest.raises(ValueError, match="slab_w"):
        pq_gemv(x, qw, cb, geo, slab_w=6)
    from pq_dequant_reference import dequantize_t_reference

    with pytest.raises(ValueError, match="qweight must be int32"):  # the layer checks shared with the dequantize
        dequantize_t_reference(qw.long(), cb.half(), geo)


def test_cuda_wrappers_refuse_what_they_do_not_serve():
    """The CUDA kernel wrappers' shared precondition: fp16 CUDA operands; and each says why it does not serve."""
    from athena_runtime.kernels import lut
    from athena_runtime.kernels.pq_reference import check_operands

    geo, qw, cb, _, _, _, _, _ = make_layer(20, 24, 2, 16, 20)
    with pytest.raises(ValueError, match="CUDA device"):
        check_operands(torch.randn(2, 24).half(), qw.cpu(), cb.cpu().half(), geo, None, None, None, cuda_fp16=True)
    if DEV.type == "cuda":
        with pytest.raises(ValueError, match="fp16"):
            check_operands(torch.randn(2, 24, device=DEV), qw, cb.half(), geo, None, None, None, cuda_fp16=True)
    assert lut.supports(geo, 9, torch.float16) == "more than 8 tokens"
    assert "fp16" in lut.supports(geo, 1, torch.float32)
    assert "recipe" in lut.supports(PQGeometry(20, 24, 5, 16, 20), 1, torch.float16)
    assert lut.supports(geo, 8, torch.float16) is None


@pytest.mark.parametrize(
    "N,M,rows", [(4096, 4096, 2048), (11008, 4096, 4096), (4096, 11008, 4096), (14336, 4096, 4096), (1024, 1024, 1024)]
)
def test_one_token_launch_fills_the_gpu(N, M, rows):
    """4096-row chunks unless they give fewer than 1.5 table CTAs per SM (H100: 132 SMs), then 2048, then 1024."""
    from athena_runtime.kernels import lut
    from athena_runtime.kernels.tuning import Tuning

    assert lut.choose_launch(PQGeometry(N, M, 2, 64, 4096), 1, Tuning(sms=132)) == (4, rows)


# ----------------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("M", [2050, 2048])  # u = x Bᵀ with scalar loads (odd M) and with 16-byte loads
def test_cuda_lut_kernel_matches_reference(T, M):
    from athena_runtime.kernels.lut import lut_matmul as pq_gemv_cuda

    pq_gemv_cuda_reference = pq_gemv_reference
    geo, qw, cb, A, B, b, _, _ = make_layer(1000, M, 2, 64, 512, 8, True)
    args = [qw, cb, A, B, b]
    x = torch.randn(T, M, device=DEV).half()
    y = pq_gemv_cuda(x, args[0], args[1], geo, *args[2:])
    ref = pq_gemv_cuda_reference(x, args[0], args[1], geo, *args[2:])
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "N,M,k,rank,bias,tile",
    [
        (1000, 2050, 512, 8, True, 128),  # two codebook blocks (k < N), 16-byte u loads off, bias
        (1001, 2048, 4096, 16, False, 64),  # N odd (a part quad at the end), one block
        (4100, 1030, 1024, 0, True, 256),  # no low-rank term, 5 blocks (the last one 4 rows)
        (300, 130, 100, 8, False, 128),  # k % 4 == 0 with short blocks
    ],
)
def test_cuda_lut_fused_epilogue_matches_reference(N, M, k, rank, bias, tile):
    """One token, the epilogue CTAs in the lookup launch: y against the reference and against the
    unfused launch; calls alternating between two layers and a CUDA-graph replay on new input show the
    counters are left zero after every call."""
    from athena_runtime.kernels.lut import lut_matmul as pq_gemv_cuda

    pq_gemv_cuda_reference = pq_gemv_reference
    geo, qw, cb, A, B, b, _, _ = make_layer(N, M, 2, 64, k, rank, bias)
    geo2, qw2, cb2, A2, B2, b2, _, _ = make_layer(700, M, 2, 64, 256, 16, True, seed=1)
    for _ in range(3):
        for g_, args in ((geo, (qw, cb, A, B, b)), (geo2, (qw2, cb2, A2, B2, b2))):
            x = torch.randn(1, M, device=DEV).half()
            y = pq_gemv_cuda(x, *args[:2], g_, *args[2:], fused_epilogue=True, epi_tile=tile)
            assert rel_err(y, pq_gemv_cuda_reference(x, *args[:2], g_, *args[2:])) < TOL[torch.float16]
            y2 = pq_gemv_cuda(x, *args[:2], g_, *args[2:], fused_epilogue=False)
            assert rel_err(y, y2) < 1e-3
    x = torch.randn(1, M, device=DEV).half()
    pq_gemv_cuda(x, qw, cb, geo, A, B, b, epi_tile=tile)  # warm: the counters exist before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = pq_gemv_cuda(x, qw, cb, geo, A, B, b, epi_tile=tile)
    for _ in range(3):
        x.copy_(torch.randn(1, M, device=DEV).half())
        graph.replay()
        assert rel_err(y, pq_gemv_cuda_reference(x, qw, cb, geo, A, B, b)) < TOL[torch.float16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lut_capture_before_counters_exist(monkeypatch):
    """A CUDA graph captured before any eager call made the counters: the second launch, still correct."""
    from athena_runtime.kernels import lut

    geo, qw, cb, A, B, b, _, _ = make_layer(1000, 2050, 2, 64, 512, 16, True)
    x = torch.randn(1, 2050, device=DEV).half()
    lut.lut_matmul(x, qw, cb, geo, A, B, b, fused_epilogue=False)  # compiles / loads the kernel
    monkeypatch.setattr(lut, "_sync", {})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lut.lut_matmul(x, qw, cb, geo, A, B, b)
    assert lut._sync == {}
    x.copy_(torch.randn(1, 2050, device=DEV).half())
    graph.replay()
    assert rel_err(y, pq_gemv_reference(x, qw, cb, geo, A, B, b)) < TOL[torch.float16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("F,up_off,rank", [(500, 504, 8), (333, 336, 0)])
def test_cuda_lut_fused_epilogue_glu(F, up_off, rank):
    """glu in the fused epilogue: silu(gate) · up of the same layer's unfused output (rounding only)."""
    from athena_runtime.kernels.fused_ops import silu_mul_reference
    from athena_runtime.kernels.lut import lut_matmul as pq_gemv_cuda

    N = up_off + F + 5
    geo, qw, cb, A, B, b, _, _ = make_layer(N, 1030, 2, 64, 512, rank, True)
    x = torch.randn(1, 1030, device=DEV).half()
    z = pq_gemv_cuda(x, qw, cb, geo, A, B, b, fused_epilogue=False)
    y = pq_gemv_cuda(x, qw, cb, geo, A, B, b, glu=(up_off, F), fused_epilogue=True)
    assert y.shape == (1, F)
    assert rel_err(y, silu_mul_reference(z[:, :F].float(), z[:, up_off : up_off + F].float())) < 2e-3


def test_fused_epilogue_reasons(monkeypatch):
    """When the split-K epilogue stays a second launch (logged by lut.LutPlan)."""
    from athena_runtime.kernels import lut
    from athena_runtime.kernels.tuning import Tuning

    monkeypatch.setattr(lut, "sync_buffer", lambda device: torch.zeros(4))
    geo, cpu = PQGeometry(4096, 4096, 2, 64, 4096), torch.device("cpu")
    A = torch.zeros(4096, 16, dtype=torch.float16)

    def reason(*args):
        return lut.fused_epilogue_reason(*args, Tuning())

    assert "token" in reason(geo, 2, 2048, A, None, cpu)
    assert "row programs" in reason(PQGeometry(4096 * 4096, 8, 2, 64, 4096), 1, 4, A, None, cpu)
    assert "multiple of 8" in reason(geo, 1, 2048, A, (2052, 2000), cpu)
    assert "neither gate nor up" in reason(geo, 1, 1024, A, (2048, 1000), cpu)  # rows 1024-2047: no CTA waits
    assert reason(geo, 1, 1024, A, (2048, 1100), cpu) is None
    assert reason(geo, 1, 2048, A, None, cpu) is None
    assert "rank divisible by 8" in reason(geo, 1, 2048, torch.zeros(4096, 12, dtype=torch.float16), None, cpu)
    assert "shared memory" in reason(geo, 1, 2048, torch.zeros(8, 12288, dtype=torch.float16), (2048, 2048), cpu)


def test_prog_rows_match_row_chunks():
    from athena_runtime.kernels.lut import prog_rows

    assert prog_rows(PQGeometry(4100, 64, 2, 64, 1024), 2048) == [
        (0, 1024),
        (1024, 2048),
        (2048, 3072),
        (3072, 4096),
        (4096, 4100),
    ]
    assert prog_rows(PQGeometry(4100, 64, 2, 64, 1024), 512)[-3:] == [(3584, 4096), (4096, 4100), (4608, 4100)]


@pytest.mark.parametrize(
    "S,S_U,T,N,rank,dtype",
    [
        (150, 3, 1, 70, 5, torch.float16),
        (300, 1, 1, 40, 3, torch.float16),
        (7, 1, 2, 300, 0, torch.float32),
        (40, 1, 6, 130, 9, torch.float16),
    ],
)
def test_splitk_epilogue_sums_every_slab(S, S_U, T, N, rank, dtype):
    """Σ_s partial + (Σ_s u_part) Aᵀ + bias, for more slabs than one load holds (S > 64), fp16 or fp32
    partials, the per-token and the token-tile kernels."""
    g = torch.Generator().manual_seed(S)
    n_pad = -(-N // 128) * 128
    partial = torch.randn(S, T, n_pad, generator=g).to(dtype).to(DEV)
    u_part = torch.randn(S_U, T, max(rank, 1), generator=g).to(DEV) if rank else None
    A = (torch.randn(N, rank, generator=g) * 0.1).half().to(DEV) if rank else None
    bias = torch.randn(N, generator=g).half().to(DEV)
    y = splitk_epilogue(partial, u_part, A, bias, T, N, torch.float16)
    ref = partial.float().sum(0)[:, :N] + bias.float()
    if rank:
        ref = ref + u_part.sum(0) @ A.float().t()
    assert y.shape == (T, N) and not torch.isnan(y).any()
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("S,T,F,up_off,rank", [(70, 1, 50, 64, 5), (9, 3, 100, 100, 0), (12, 20, 33, 40, 9)])
def test_splitk_epilogue_glu_matches_unfused(S, T, F, up_off, rank):
    """glu=(up_offset, F): silu(gate) · up straight from the epilogue, bit for bit what the unfused
    epilogue followed by fused_ops.silu_mul gives (per-token kernel for T <= 4, token tiles above)."""
    from athena_runtime.kernels.fused_ops import silu_mul

    g = torch.Generator().manual_seed(S + T)
    N = up_off + F + 7  # rows past the up part are not read
    n_pad = -(-N // 128) * 128
    partial = torch.randn(S, T, n_pad, generator=g).half().to(DEV)
    u_part = torch.randn(2, T, max(rank, 1), generator=g).to(DEV) if rank else None
    A = (torch.randn(N, rank, generator=g) * 0.1).half().to(DEV) if rank else None
    bias = torch.randn(N, generator=g).half().to(DEV)
    z = splitk_epilogue(partial, u_part, A, bias, T, N, torch.float16)
    y = splitk_epilogue(partial, u_part, A, bias, T, N, torch.float16, glu=(up_off, F))
    ref = silu_mul(z[:, :F], z[:, up_off : up_off + F], use_triton=True)
    assert y.shape == (T, F)
    if T > 4 and rank:  # the tile kernel's tl.dot runs its two low-rank products separately: rounding only
        assert rel_err(y, ref) < TOL[torch.float16]
    else:
        assert torch.equal(y, ref)
    with pytest.raises(ValueError, match="must fit"):
        splitk_epilogue(partial, None, None, None, T, N, torch.float16, glu=(up_off, N))
