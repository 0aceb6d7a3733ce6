"""The CUDA dequantize with the low-rank term folded in (cuda/fold.cu, its host side `kernels/dequant.py`).

On CPU: the PyTorch reference (the spec) and argument checks, the kernel source run by the CPU emulation
of `cuda_emulation.py` (mma.sync emulated too; where g++ >= 11 is installed) against the reference on odd
shapes, and (where the NVRTC wheel is installed) an NVRTC compile for sm_89 and sm_90 without spills. With a GPU:
the kernel
against the reference on odd shapes and every launch shape, and the prefill matmul in "fold" mode.

Tolerance of the folded weight: each value is one fp16 rounding of an fp32 sum whose order and rounding
differ from PyTorch's (tensor cores add the rank products in their own order, truncating): at most 1 fp16
ulp of the value, plus 2^-18 absolute where the codebook entry and the low-rank term nearly cancel
(|Δ| <= 2^-10 |ref| + 2^-18, operands of magnitude ~1); every value outside the written range untouched
(NaN guard).
"""

from __future__ import annotations

import ctypes

import cuda_emulation
import pytest
import torch
from nvrtc_check import ptxas_usage, toolchain_or_none
from pq_dequant_reference import dequantize_fold_t_reference

from athena_runtime.kernels import dequant as fold
from athena_runtime.kernels import layout
from athena_runtime.kernels.dequant_matmul import default_lowrank_mode
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.tuning import Tuning

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs CUDA")


def make_layer(N, M, d, n, k, rank, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    geo = PQGeometry(N, M, d, n, k)
    I = torch.randint(0, n, (N, geo.G), generator=g)
    C = (torch.randn(geo.Nb, geo.G, n, d, generator=g) * 0.5).half()
    A = (torch.randn(N, rank, generator=g) * 0.1).half().to(device)
    B = (torch.randn(rank, M, generator=g) * 0.1).half().to(device)
    return geo, layout.pack_words(I, geo).to(device), layout.pad_codebook(C, geo).to(device), A, B


def assert_within_ulp(out, ref):
    assert not torch.isnan(out).any(), "NaN (a value not written)"
    diff = (out.float() - ref.float()).abs()
    bound = ref.float().abs() * 2.0**-10 + 2.0**-18
    bad = diff > bound
    assert not bad.any(), (
        f"{int(bad.sum())} values beyond 1 ulp + 2^-18, e.g. out {out[bad][:4].tolist()} ref {ref[bad][:4].tolist()}"
    )


# ----------------------------------------------------------------------------------- CPU: the spec
def test_reference_is_dequantize_plus_lowrank_rounded_once():
    geo, qw, cb, A, B = make_layer(37, 29, 3, 16, 20, 16, device="cpu")
    W = layout.dequantize_reference(qw, cb, geo).float() + A.float() @ B.float()
    Wt = dequantize_fold_t_reference(qw, cb, geo, A, B)
    assert Wt.dtype == torch.float16 and torch.equal(Wt, W.t().half())
    big = torch.full((29, 45), float("nan"), dtype=torch.float16)
    dequantize_fold_t_reference(qw, cb, geo, A, B, out=big[:, :37])
    assert torch.equal(big[:, :37], Wt) and torch.isnan(big[:, 37:]).all()


@pytest.mark.parametrize(
    "change,match",
    [
        ("no_b", "low-rank factors"),
        ("a_rows", "low-rank factors"),
        ("ranks", "low-rank factors"),
        ("out", "out must be"),
        ("qweight", "qweight must be"),
    ],
)
def test_argument_checks(change, match):
    geo, qw, cb, A, B = make_layer(40, 24, 2, 64, 40, 16, device="cpu")
    args = dict(qweight=qw, codebook=cb, geo=geo, lowrank_a=A, lowrank_b=B)
    if change == "no_b":
        args["lowrank_b"] = None
    elif change == "a_rows":
        args["lowrank_a"] = A[:-1]
    elif change == "ranks":
        args["lowrank_b"] = B[:-1]
    elif change == "qweight":
        args["qweight"] = qw[:, :-4]
    kw = {"out": torch.empty(24, 41, dtype=torch.float16)} if change == "out" else {}
    with pytest.raises(ValueError, match=match):
        dequantize_fold_t_reference(**args, **kw)
    with pytest.raises(ValueError, match=match):
        fold.dequantize_fold_t(**args, **kw)


def test_cuda_wrapper_refuses_cpu_tensors_and_unserved_ranks():
    geo, qw, cb, A, B = make_layer(40, 24, 2, 64, 40, 16, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        fold.dequantize_fold_t(qw, cb, geo, A, B)
    assert fold.fold_supports(geo, 16) is None and fold.fold_supports(geo, 48) is None
    assert fold.fold_supports(geo, 8)  # not a multiple of 16
    assert fold.fold_supports(geo, 64)  # B's fragments would take 80 registers
    assert fold.fold_supports(geo, 16, torch.float32)
    assert fold.fold_supports(PQGeometry(40, 24, 4, 64, 40), 48)  # B's fragments: 5 slots x 2 m-tiles x 3 k-steps


def test_launch_rule_fills_the_last_wave():
    H100 = Tuning(sms=132)
    assert (
        fold.choose_fold_rows(PQGeometry(4096, 4096, 2, 64, 4096), H100) == 1024
    )  # 208 CTAs: 0.79 wave (512: 1.58 of 2)
    assert fold.choose_fold_rows(PQGeometry(11008, 4096, 2, 64, 4096), H100) == 512  # 1248 CTAs: 4.7 of 5 waves
    assert fold.choose_fold_rows(PQGeometry(4096, 11008, 2, 64, 4096), H100) == 512
    assert fold.choose_fold_rows(PQGeometry(14336, 4096, 2, 64, 4096), H100) == 512  # 6.3 of 7 waves (1024: 3.2 of 4)
    assert fold.choose_fold_rows(PQGeometry(96, 64, 2, 64, 96), H100) == 2048  # one CTA per slab whatever the rows


def test_cuda_prefill_folds_the_low_rank_term_where_the_kernel_serves_the_rank():
    wide, tall = PQGeometry(4096, 11008, 2, 64, 4096), PQGeometry(11008, 4096, 2, 64, 4096)  # M > N, M < N
    assert default_lowrank_mode(wide, "cuda", 48) == "fold" and default_lowrank_mode(tall, "cuda", 48) == "fold"
    assert default_lowrank_mode(wide, "cuda", 8) == "addmm"  # not a multiple of 16: a second product (M >= N)
    assert default_lowrank_mode(tall, "cuda", 64) == "rows"  # B's fragments too big: extra rows (M < N)
    assert default_lowrank_mode(tall, "cuda") == "rows"  # no rank given
    assert default_lowrank_mode(wide, "triton", 8) == "fold"


# ----------------------------------------------------------------------------------- CPU: the kernel emulated
VARIANTS = [
    (b, d, ks)
    for b, d in fold.RECIPES
    for ks in range(1, fold.FOLD_MAX_RANK // 16 + 1)
    if fold.fold_frag_regs(b, d, ks) <= fold.FOLD_FRAG_REGS
]


def _emulated_launcher() -> str:
    disp = "\n".join(
        f"    if (bits == {b} && D == {d} && rank == {16 * ks}) {{ launch(grid, THREADS, [&] {{ "
        f"fold_kernel<{b}, {d}, {ks}>(qweight, N_pad, codebook, G_pad, N, M, GW, k_rows, chunks, "
        "rows_per_chunk, lr_a, stride_an, lr_b, stride_be, rank, out, stride_out); }); return 0; }"
        for b, d, ks in VARIANTS
    )
    return (
        r"""
#include "fold.cu"
namespace athena { alignas(16) uint16_t smem[64 * 1024]; }  // 128 KB
using namespace athena;
extern "C" int run_fold(const int* qweight, int N_pad, int GW, const uint16_t* codebook, int G_pad, int D, int bits,
                        int N, int M, int k_rows, int rows_per_chunk, const uint16_t* lr_a, int stride_an,
                        const uint16_t* lr_b, int stride_be, int rank, uint16_t* out, long long stride_out) {
    const int k_eff = k_rows < N ? k_rows : N, chunks = (k_eff + rows_per_chunk - 1) / rows_per_chunk;
    const dim3 grid{(unsigned)(chunks * ((N + k_rows - 1) / k_rows)), (unsigned)(GW / SLAB_W), 1};
"""
        + disp
        + "\n    return 1;\n}\n"
    )


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    lib = cuda_emulation.build(_emulated_launcher(), tmp_path_factory.mktemp("pq_cuda_fold_emu"))
    P, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.run_fold.argtypes = [P, i32, i32, P, i32, i32, i32, i32, i32, i32, i32, P, i32, P, i32, i32, P, i64]
    return lib


def _emulate(lib, qw, cb, geo, A, B, out, rows):
    rc = lib.run_fold(
        qw.data_ptr(),
        qw.shape[1],
        qw.shape[0],
        cb.data_ptr(),
        cb.shape[1],
        geo.d,
        geo.bits,
        geo.N,
        geo.M,
        geo.k,
        rows,
        A.data_ptr(),
        A.stride(0),
        B.data_ptr(),
        B.stride(0),
        A.shape[1],
        out.data_ptr(),
        out.stride(0),
    )
    assert rc == 0, "no variant"


@pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs g++ >= 11 (C++20 <barrier>)")
@pytest.mark.parametrize(
    "N,M,d,n,k,rank,rows",
    [
        (203, 83, 2, 64, 50, 16, 24),  # k % 8 != 0: tiles straddle chunks and blocks; a slot straddles M
        (130, 96, 2, 64, 130, 48, 64),  # the recipe's rank (3 k-steps); several rounds of the 8 warps
        (77, 61, 3, 64, 77, 16, 512),  # d = 3: two m-tiles, the second partly padding; odd N
        (64, 40, 1, 256, 64, 16, 512),  # d = 1: half an m-tile; b = 8
        (45, 70, 4, 64, 20, 16, 16),  # d = 4: two whole m-tiles; three codebook blocks
        (96, 50, 2, 64, 96, 48, 512),  # the recipe's largest rank (B's fragments in 60 registers)
    ],
)
def test_kernel_source_emulated_on_cpu(emulated, N, M, d, n, k, rank, rows):
    geo, qw, cb, A, B = make_layer(N, M, d, n, k, rank, device="cpu")
    assert (
        fold.fold_supports(geo, rank) is None and fold.fold_smem_bytes(geo.bits, d, rank) <= 128 * 1024
    )  # the emulation's buffer
    ref = dequantize_fold_t_reference(qw, cb, geo, A, B)
    for pad in (0, 8, 3):  # row stride N, wider aligned, wider unaligned (every store element-wise)
        guard = torch.full((M + 2, N + pad), float("nan"), dtype=torch.float16)
        _emulate(emulated, qw, cb, geo, A, B, guard[:M, :N], rows)
        assert_within_ulp(guard[:M, :N], ref)
        assert torch.isnan(guard[M:]).all() and torch.isnan(guard[:, N:]).all()


@pytest.mark.skipif(toolchain_or_none() is None, reason="needs the nvidia-cuda-nvrtc and -runtime wheels")
@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
def test_kernels_compile_without_spills(tmp_path, arch):
    """NVRTC (the runtime's compiler) with ptxas' report on the default recipe's kernels and the extreme recipes:
    <= 128 registers (two CTAs of 256 threads per SM) and no spills."""
    names = [
        f"athena::fold_kernel<{b}, {d}, {ks}>"
        for b, d, ks in VARIANTS
        if (b, d) == (6, 2) or (b, d, ks) in ((4, 4, 1), (8, 1, 4), (4, 1, 4))
    ]
    regs, spills, report = ptxas_usage("fold.cu", names, arch, tmp_path)
    assert len(regs) == len(names) and max(regs) <= 128
    assert all(s == ("0", "0") for s in spills), report[-3000:]


# ----------------------------------------------------------------------------------- GPU
GPU_CASES = [  # N, M, d, n, k, rank
    (1000, 2050, 2, 64, 512, 48),
    (203, 83, 2, 64, 50, 16),
    (300, 301, 3, 64, 100, 16),
    (257, 1030, 4, 64, 128, 16),
    (517, 999, 1, 256, 300, 48),
    (4096, 4096, 2, 64, 4096, 48),
]


@needs_gpu
@pytest.mark.parametrize("N,M,d,n,k,rank", GPU_CASES)
def test_cuda_fold_matches_reference(N, M, d, n, k, rank):
    geo, qw, cb, A, B = make_layer(N, M, d, n, k, rank)
    ref = dequantize_fold_t_reference(qw, cb, geo, A, B)
    for rows in (None, 8, 512, 1024, 2048):
        assert_within_ulp(fold.dequantize_fold_t(qw, cb, geo, A, B, rows_per_chunk=rows), ref)
    for pad in (8, 3):  # a wider row stride (aligned, then unaligned): columns >= N and rows >= M untouched
        big = torch.full((M + 2, N + pad), float("nan"), dtype=torch.float16, device=DEV)
        fold.dequantize_fold_t(qw, cb, geo, A, B, out=big[:M, :N])
        assert_within_ulp(big[:M, :N], ref)
        assert torch.isnan(big[:, N:]).all() and torch.isnan(big[M:]).all()
