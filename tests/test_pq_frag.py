"""The fragment-lookup tensor-core kernel (cuda/frag.cu, host side kernels/frag.py) against the PyTorch reference.

The kernel itself needs a GPU (the CUDA tests skip without one; bench/gpu_suite.sh runs them on the
lent H100); on CPU the layer-support rules, the shared-memory sizes and an NVRTC compile are checked.
Tolerance: relative Frobenius error 4e-3 against the fp32 reference on the same fp16 codebook (fp16
split-K partial sums; measured ~1e-4 for the tensor-core kernels).
"""

from __future__ import annotations

import pytest
import torch
from nvrtc_check import ptxas_usage, toolchain_or_none

from athena_runtime.kernels import frag
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.pq_reference import pq_matmul_reference
from athena_runtime.kernels.tuning import Tuning
from tests.test_pq_kernels import make_layer, rel_err

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = 4e-3
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_supported_layers():
    f16 = torch.float16
    assert frag.supports(PQGeometry(4096, 4096, 2, 64, 4096), 64, f16) is None
    assert frag.row_tile(PQGeometry(11008, 4096, 2, 64, 4096)) == 4
    assert frag.row_tile(PQGeometry(1000, 1000, 2, 64, 128)) == 2  # 256-row tiles would straddle blocks
    assert frag.row_tile(PQGeometry(1000, 1000, 2, 64, 100)) is None
    assert frag.row_tile(PQGeometry(100, 1000, 2, 64, 100)) == 4  # one block: any tile
    assert frag.supports(PQGeometry(4096, 4096, 2, 64, 4096), 65, f16)
    assert frag.supports(PQGeometry(4096, 4096, 2, 64, 4096), 8, torch.float32)
    assert frag.supports(PQGeometry(4096, 4096, 4, 64, 4096), 8, f16)  # d = 4
    assert frag.supports(PQGeometry(4096, 4096, 2, 256, 4096), 8, f16)  # b = 8 not instantiated
    assert frag.supports(PQGeometry(4096, 4098, 2, 64, 4096), 8, f16)  # M % 8: 16-byte x rows


def test_shared_memory_sizes():
    assert frag.smem_bytes(64, 2, 3) <= 99 * 1024  # fits an Ada (sm_89) CTA
    assert frag.smem_bytes(16, 4, 3) <= frag.smem_bytes(32, 4, 3) <= 99 * 1024
    assert 99 * 1024 < frag.smem_bytes(64, 4, 3) <= 113 * 1024  # two per H100 SM, not on Ada


@pytest.mark.skipif(toolchain_or_none() is None, reason="needs the nvidia-cuda-nvrtc and -runtime wheels")
@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
def test_launched_instances_compile_without_spills(tmp_path, arch):
    """NVRTC on the instances the runtime launches (Ada's 99 KB per CTA: 128-row tiles at 64 tokens, whose 256-row
    instance spills 32 bytes there): two CTAs of 256 threads per SM (<= 128 registers), no spills."""
    smem = 99 * 1024 if arch == "sm_89" else 227 * 1024
    geo = PQGeometry(4096, 4096, 2, 64, 4096)
    names = [frag.kernel_name(t, frag.choose_nr(geo, t, 3, Tuning(smem_per_cta=smem)), 6, 3) for t in frag.T_PADS]
    regs, spills, report = ptxas_usage("frag.cu", names, arch, tmp_path)
    assert len(regs) == len(names) and max(regs) <= 128
    assert all(sp == ("0", "0") for sp in spills), report[-3000:]


def test_rejects_cpu_input():
    geo, qw, cb, A, B, b, _, _ = make_layer(300, 1000, 2, 64, 128)
    with pytest.raises(ValueError, match="CUDA device"):
        frag.frag_matmul(torch.randn(4, 1000).half(), qw.cpu(), cb.cpu(), geo)


@GPU
@pytest.mark.parametrize(
    "N,M,k,rank,bias",
    [(1000, 1000, 512, 8, True), (300, 1000, 128, 4, False), (4096, 4096, 4096, 48, False), (257, 1032, 4096, 5, True)],
)
@pytest.mark.parametrize("T", [1, 3, 16, 17, 40, 64])
def test_frag_kernel_matches_reference(N, M, k, rank, bias, T):
    geo, qw, cb, A, B, b, _, _ = make_layer(N, M, 2, 64, k, rank, bias, seed=N + T)
    x = torch.randn(T, M, device=DEV).half()
    ref = pq_matmul_reference(x, qw, cb, geo, A, B, b)
    for split in (None, 1, 3):
        y = frag.frag_matmul(x, qw, cb, geo, A, B, b, split=split)
        assert y.shape == (T, N) and rel_err(y, ref) < TOL, (split, rel_err(y, ref))


@GPU
@pytest.mark.parametrize("nr,T", [(2, 64), (4, 16), (2, 9), (4, 5)])
def test_frag_kernel_variants(nr, T):
    geo, qw, cb, A, B, b, _, _ = make_layer(1000, 2048, 2, 64, 512, 8, True, seed=7)
    x = torch.randn(T, 2048, device=DEV).half()
    y = frag.frag_matmul(x, qw, cb, geo, A, B, b, nr=nr)
    assert rel_err(y, pq_matmul_reference(x, qw, cb, geo, A, B, b)) < TOL


@GPU
@pytest.mark.parametrize("rank", [40, 12])
def test_frag_kernel_lowrank_in_kernel_and_by_cublas(rank):
    """rank 40 (a multiple of 8, <= 8 per row tile) is summed inside the kernel; 12 is not a multiple of 8
    and 9 x 8 > N / 64 tiles would be too many: both go through u = x Bᵀ by cuBLAS, same result."""
    geo, qw, cb, A, B, b, _, _ = make_layer(600, 1024, 2, 64, 4096, rank, True, seed=rank)
    for T in (2, 24, 64):
        x = torch.randn(T, 1024, device=DEV).half()
        y = frag.frag_matmul(x, qw, cb, geo, A, B, b, nr=2)
        assert rel_err(y, pq_matmul_reference(x, qw, cb, geo, A, B, b)) < TOL
    assert frag.in_kernel_lowrank(torch.zeros(40, 1024, device=DEV).half(), 5)
    assert not frag.in_kernel_lowrank(torch.zeros(12, 1024, device=DEV).half(), 5)
    assert not frag.in_kernel_lowrank(torch.zeros(48, 1024, device=DEV).half(), 5)


@GPU
def test_frag_kernel_unaligned_x_view():
    geo, qw, cb, _, _, _, _, _ = make_layer(512, 1024, 2, 64, 4096)
    flat = torch.randn(9 * 1024 + 1, device=DEV).half()
    x = flat[1:].view(9, 1024)  # contiguous, but 2 bytes off a 16-byte boundary: copied first
    assert x.data_ptr() % 16
    y = frag.frag_matmul(x, qw, cb, geo)
    assert rel_err(y, pq_matmul_reference(x.contiguous(), qw, cb, geo)) < TOL
