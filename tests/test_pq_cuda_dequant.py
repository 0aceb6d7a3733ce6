"""The CUDA dequantize (cuda/dequant.cu, host side `kernels/dequant.py`) and the dequantize-then-cuBLAS path.

On CPU: the PyTorch references (the spec), argument checks, the launch-shape rule, the "rows"
low-rank assembly of `pq_dequant_matmul` with the kernels replaced by their references, the kernel
source itself run by the CPU emulation of `cuda_emulation.py` (where g++ >= 11 is installed) bit for
bit against the reference, and (where the NVRTC wheel is installed) an NVRTC compile for sm_89 and sm_90
without register spills. With a GPU:
the kernel against the reference, bit for bit (a pure gather), on odd shapes, and the matmul against
the fp32 reference.

Tolerance of the matmul (relative Frobenius error against the fp32 reference): 4e-3, as for the
other fp16 kernels (fp16 Ŵ, u = x Bᵀ and output rounding; cuBLAS accumulates in fp32).
"""

from __future__ import annotations

import ctypes

import cuda_emulation
import pytest
import torch
from nvrtc_check import ptxas_usage, toolchain_or_none
from pq_dequant_reference import copy_pad_cols_reference, dequantize_fold_t_reference, dequantize_t_reference

from athena_runtime.kernels import dequant as cdq
from athena_runtime.kernels import layout
from athena_runtime.kernels.dequant_matmul import default_lowrank_mode
from athena_runtime.kernels.dequant_matmul import dequant_matmul as pq_dequant_matmul
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.pq_reference import pq_matmul_reference as pq_gemm_reference
from athena_runtime.kernels.tuning import Tuning

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
TOL16 = 4e-3
needs_gpu = pytest.mark.skipif(not GPU, reason="needs CUDA")


def make_layer(N, M, d, n, k, rank=0, bias=False, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    geo = PQGeometry(N, M, d, n, k)
    I = torch.randint(0, n, (N, geo.G), generator=g)
    C = (torch.randn(geo.Nb, geo.G, n, d, generator=g) * 0.5).half()
    A = (torch.randn(N, rank, generator=g) * 0.1).half().to(device) if rank else None
    B = (torch.randn(rank, M, generator=g) * 0.1).half().to(device) if rank else None
    b = torch.randn(N, generator=g).half().to(device) if bias else None
    return geo, layout.pack_words(I, geo).to(device), layout.pad_codebook(C, geo).to(device), A, B, b


def rel_err(y, ref):
    assert not torch.isnan(y).any(), "NaN in output"
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------- CPU: the spec
def test_reference_writes_top_rows_and_stacked_factor():
    geo, qw, cb, A, _, _ = make_layer(37, 29, 3, 16, 20, rank=5, device="cpu")
    Wt = layout.dequantize_reference(qw, cb, geo).t().contiguous()
    assert torch.equal(dequantize_t_reference(qw, cb, geo), Wt)
    big = torch.full((29 + 3, 37), float("nan"), dtype=torch.float16)
    dequantize_t_reference(qw, cb, geo, out=big[:29])
    assert torch.equal(big[:29], Wt) and torch.isnan(big[29:]).all()
    big = torch.full((29 + 8, 37), float("nan"), dtype=torch.float16)  # [Ŵᵀ; Aᵀ; 0]
    dequantize_t_reference(qw, cb, geo, out=big, stacked_a=A)
    assert torch.equal(big[:29], Wt) and torch.equal(big[29:34], A.t()) and (big[34:] == 0).all()


def test_copy_pad_cols_reference_leaves_the_middle():
    x = torch.randn(3, 5).half()
    xu = torch.full((3, 10), 7.0, dtype=torch.float16)
    copy_pad_cols_reference(x, xu, 8)
    assert torch.equal(xu[:, :5], x) and (xu[:, 5:8] == 7).all() and (xu[:, 8:] == 0).all()
    with pytest.raises(ValueError, match="copy_pad_cols"):
        copy_pad_cols_reference(x, xu, 4)  # zero_from < M


@pytest.mark.parametrize(
    "change,match",
    [
        ("qweight", "qweight must be"),
        ("codebook", "codebook must be"),
        ("cb_dtype", "fp16"),
        ("dtype", "fp16"),
        ("out_cols", "out must be"),
        ("out_rows", "out must be"),
        ("out_strided", "out must be"),
        ("stacked_short", "out must be"),
        ("stacked_n", "stacked_a must be"),
    ],
)
def test_argument_checks(change, match):
    geo, qw, cb, A, _, _ = make_layer(40, 24, 2, 64, 40, rank=3, device="cpu")
    kw = dict(dtype=torch.float16, out=None, stacked_a=None)
    if change == "qweight":
        qw = qw[:, :-4]
    elif change == "codebook":
        cb = cb.transpose(2, 3).contiguous()
    elif change == "cb_dtype":
        cb = cb.float()
    elif change == "dtype":
        kw["dtype"] = torch.float32
    elif change == "out_cols":
        kw["out"] = torch.empty(24, 41, dtype=torch.float16)
    elif change == "out_rows":
        kw["out"] = torch.empty(25, 40, dtype=torch.float16)  # taller only with stacked_a
    elif change == "out_strided":
        kw["out"] = torch.empty(40, 24, dtype=torch.float16).t()
    elif change == "stacked_short":
        kw.update(out=torch.empty(26, 40, dtype=torch.float16), stacked_a=A)  # needs >= 24 + 3 rows
    elif change == "stacked_n":
        kw["stacked_a"] = A[:-1]
    dtype = kw.pop("dtype")
    for fn in (dequantize_t_reference, cdq.dequantize_t):
        with pytest.raises(ValueError, match=match):
            fn(qw, cb, geo, dtype, **kw)


def test_cuda_wrapper_refuses_cpu_tensors():
    geo, qw, cb, _, _, _ = make_layer(40, 24, 2, 64, 40, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        cdq.dequantize_t(qw, cb, geo)
    with pytest.raises(ValueError, match="needs CUDA"):
        cdq.copy_pad_cols(torch.zeros(2, 3).half(), torch.zeros(2, 8).half(), 4)


def test_variants_cover_the_recipes_within_shared_memory():
    for bits in (4, 6, 8):
        for d in (1, 2, 3, 4):
            assert cdq.supports(PQGeometry(64, 64, d, 1 << bits, 64)) is None
            assert all(cdq.smem_bytes(bits, d, s) <= cdq.SMEM_LIMIT for s in cdq.slab_widths(bits, d))
    assert cdq.supports(PQGeometry(64, 64, 2, 32, 64))  # b = 5: not instantiated (Triton serves it)
    assert cdq.supports(PQGeometry(64, 64, 2, 64, 64), torch.float32)
    assert cdq.slab_widths(*cdq.MAIN_RECIPE) == cdq.MAIN_SLABS


@pytest.mark.parametrize("N,M", [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)])
def test_launch_rule_fills_the_gpu_in_one_wave(N, M):
    geo = PQGeometry(N, M, 2, 64, 4096)
    for sms in (128, 132):  # RTX 4090, H100 SXM
        slab, rows = cdq.choose_launch(geo, Tuning(sms=sms))
        assert geo.GW % slab == 0 and rows % 4 == 0
        assert sms <= cdq.n_ctas(geo, slab, rows) <= cdq.MIN_BLOCKS * sms


def test_launch_rule_small_layer():
    geo = PQGeometry(300, 301, 3, 16, 100)
    slab, rows = cdq.choose_launch(geo, Tuning(sms=132))
    assert slab in cdq.slab_widths(geo.bits, geo.d) and rows == 1024


@pytest.mark.parametrize("mode", ["fold", "rows", "addmm"])
@pytest.mark.parametrize("N,M,rank,bias", [(130, 50, 16, True), (45, 70, 3, False), (64, 200, 8, True)])
def test_dequant_matmul_cuda_modes_with_reference_kernels(monkeypatch, mode, N, M, rank, bias):
    """The low-rank assembly of the CUDA path ((Ŵ + A B)ᵀ, [x | u | 0] · [Ŵᵀ; Aᵀ; 0], or y += u Aᵀ),
    with the kernels replaced by their PyTorch references so that it runs on CPU."""
    monkeypatch.setattr(cdq, "dequantize_t", dequantize_t_reference)
    monkeypatch.setattr(cdq, "dequantize_fold_t", dequantize_fold_t_reference)
    monkeypatch.setattr(cdq, "copy_pad_cols", copy_pad_cols_reference)
    geo, qw, cb, A, B, b = make_layer(N, M, 2, 64, 64, rank, bias, device=DEV)
    x = torch.randn(9, M, generator=torch.Generator().manual_seed(1)).half().to(DEV)
    if mode == "fold" and cdq.fold_supports(geo, rank) is not None:  # ranks 3, 8: no folding kernel, never "fold"
        assert default_lowrank_mode(geo, "cuda", rank) != "fold"
        return
    y = pq_dequant_matmul(x, qw, cb, geo, A, B, b, dequant="cuda", lowrank_mode=mode)
    assert y.shape == (9, N) and y.dtype == torch.float16
    assert rel_err(y, pq_gemm_reference(x, qw, cb, geo, A, B, b)) < TOL16


def test_dequant_matmul_refuses_unknown_modes():
    geo, qw, cb, A, B, _ = make_layer(40, 24, 2, 64, 40, rank=2)
    x = torch.randn(3, 24).half().to(DEV)
    with pytest.raises(ValueError, match="lowrank_mode must be"):
        pq_dequant_matmul(x, qw, cb, geo, A, B, dequant="cuda", lowrank_mode="sideways")
    with pytest.raises(ValueError, match="dequant must be"):
        pq_dequant_matmul(x, qw, cb, geo, dequant="cutlass")


VARIANTS = [(b, d, s) for b, d in cdq.RECIPES for s in cdq.slab_widths(b, d)]


def _emulated_launchers() -> str:
    """extern "C" entry points over the kernel file, with the grid the host side computes."""
    disp = "\n".join(
        f"    if (bits == {b} && D == {d} && slab_w == {s}) {{ launch(grid, THREADS, [&] {{ "
        f"dequant_kernel<{b}, {d}, {s}>("
        "qweight, N_pad, codebook, G_pad, N, M, GW, k_rows, chunks, rows_per_chunk, out, stride_out, lr_a, stride_an, "
        "rank, extra_rows); }); return 0; }"
        for b, d, s in VARIANTS
    )
    return (
        r"""
#include "dequant.cu"
namespace athena { alignas(16) uint16_t cb_s[48 * 1024 / 2]; }
using namespace athena;
extern "C" int run_dequant(const int* qweight, int N_pad, int GW, const uint16_t* codebook, int G_pad, int D, int bits,
                           int N, int M, int k_rows, int rows_per_chunk, int slab_w, uint16_t* out,
                           long long stride_out,
                           const uint16_t* lr_a, int stride_an, int rank, int extra_rows) {
    const int chunks = ((k_rows < N ? k_rows : N) + rows_per_chunk - 1) / rows_per_chunk;
    const dim3 grid{(unsigned)(chunks * ((N + k_rows - 1) / k_rows)), (unsigned)(GW / slab_w + (extra_rows > 0)), 1};
"""
        + disp
        + r"""
    return 1;
}
extern "C" void run_copy(const uint16_t* src, long long ss, uint16_t* dst, long long sd, int T, int M, int zero_from,
                         int K) {
    launch(dim3{(unsigned)(T < 65535 ? T : 65535), 1, 1}, THREADS,
           [&] { copy_pad_cols_kernel(src, ss, dst, sd, T, M, zero_from, K); });
}
"""
    )


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    lib = cuda_emulation.build(_emulated_launchers(), tmp_path_factory.mktemp("pq_cuda_dequant_emu"))
    P, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.run_dequant.argtypes = [P, i32, i32, P, i32, i32, i32, i32, i32, i32, i32, i32, P, i64, P, i32, i32, i32]
    lib.run_copy.argtypes = [P, i64, P, i64, i32, i32, i32, i32]
    return lib


def _emulate_dequant(lib, qw, cb, geo, out, slab_w, rows_per_chunk, stacked_a=None):
    """What pq_dequantize_t_cuda hands the kernel (A padded to a multiple of 8 ranks), on CPU tensors."""
    a = None
    if stacked_a is not None:
        a = torch.nn.functional.pad(stacked_a.half(), (0, -stacked_a.shape[1] % 8)).contiguous()
    rc = lib.run_dequant(
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
        rows_per_chunk,
        slab_w,
        out.data_ptr(),
        out.stride(0),
        None if a is None else a.data_ptr(),
        0 if a is None else a.stride(0),
        0 if a is None else a.shape[1],
        0 if a is None else out.shape[0] - geo.M,
    )
    assert rc == 0, "no variant"


@pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs g++ >= 11 (C++20 <barrier>)")
@pytest.mark.parametrize(
    "N,M,d,n,k,slab,rows",
    [
        (2100, 130, 2, 64, 4096, 8, 4096),  # several passes, next pass's words prefetched
        (2100, 130, 2, 64, 4096, 16, 2048),  # 16-word slabs: no prefetch
        (203, 77, 2, 64, 50, 4, 12),  # k % 4 != 0: quads straddle chunks; M inside a slab
        (204, 78, 2, 64, 50, 4, 12),  # ... a slab's columns end 2 past M (aligned rows)
        (300, 301, 3, 16, 100, 8, 1024),
        (257, 1030, 4, 256, 128, 4, 1024),  # odd N: every quad element-wise (unaligned rows)
        (130, 50, 1, 64, 64, 8, 1024),
    ],
)
def test_kernel_source_emulated_on_cpu(emulated, N, M, d, n, k, slab, rows):
    geo, qw, cb, A, _, _ = make_layer(N, M, d, n, k, rank=5, device="cpu")
    ref = dequantize_t_reference(qw, cb, geo)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    _emulate_dequant(emulated, qw, cb, geo, out, slab, rows)
    assert torch.equal(out, ref)
    guard = torch.full((M + 3, N + 8), float("nan"), dtype=torch.float16)  # nothing written past row M or column N
    _emulate_dequant(emulated, qw, cb, geo, guard[:M, :N], slab, rows)
    assert torch.equal(guard[:M, :N], ref) and torch.isnan(guard[M:]).all() and torch.isnan(guard[:, N:]).all()
    big = torch.full((M + 11, N + 8), float("nan"), dtype=torch.float16)  # [Ŵᵀ; Aᵀ; 0], wider row stride
    _emulate_dequant(emulated, qw, cb, geo, big[:, :N], slab, rows, stacked_a=A)
    assert torch.equal(big[:M, :N], ref) and torch.equal(big[M : M + 5, :N], A.t()) and (big[M + 5 :, :N] == 0).all()
    assert torch.isnan(big[:, N:]).all()


@pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs g++ >= 11 (C++20 <barrier>)")
@pytest.mark.parametrize("T,M,zero_from,K", [(5, 64, 72, 128), (3, 77, 80, 85)])
def test_copy_kernel_emulated_on_cpu(emulated, T, M, zero_from, K):
    x = torch.randn(T, M + 8).half()[:, :M]  # a strided source
    xu = torch.full((T, K), 7.0, dtype=torch.float16)
    ref = copy_pad_cols_reference(x, xu.clone(), zero_from)
    emulated.run_copy(x.data_ptr(), x.stride(0), xu.data_ptr(), xu.stride(0), T, M, zero_from, K)
    assert torch.equal(xu, ref)


@pytest.mark.skipif(toolchain_or_none() is None, reason="needs the nvidia-cuda-nvrtc and -runtime wheels")
@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
def test_kernels_compile_without_spills(tmp_path, arch):
    """NVRTC (the runtime's compiler) with ptxas' report on the default recipe's slabs and the extreme recipes:
    <= 128 registers (two CTAs of 256 threads per SM, MIN_BLOCKS) and no spills."""
    names = [
        f"athena::dequant_kernel<{b}, {d}, {s}>" for b, d, s in VARIANTS if (b, d) in (cdq.MAIN_RECIPE, (4, 1), (8, 4))
    ]
    regs, spills, report = ptxas_usage("dequant.cu", names, arch, tmp_path)
    assert len(regs) >= len(names) and max(regs) <= 128
    assert spills and all(s == ("0", "0") for s in spills), report[-3000:]


# ----------------------------------------------------------------------------------- GPU
GPU_CASES = [  # N, M, d, n, k: N % 128 != 0, ragged codebook blocks, k % 4 != 0, N odd, every d and b
    (1000, 2050, 2, 64, 512),
    (300, 301, 3, 16, 100),
    (257, 1030, 4, 256, 128),
    (203, 77, 2, 64, 50),
    (130, 50, 1, 64, 64),
    (517, 999, 1, 256, 300),
    (96, 130, 4, 16, 96),
    (4096, 4096, 2, 64, 4096),
]


@needs_gpu
@pytest.mark.parametrize("N,M,d,n,k", GPU_CASES)
def test_cuda_dequantize_is_exact(N, M, d, n, k):
    geo, qw, cb, A, _, _ = make_layer(N, M, d, n, k, rank=5)
    ref = dequantize_t_reference(qw, cb, geo)
    slabs = cdq.slab_widths(geo.bits, d)
    for slab in slabs:
        for rows in (None, 1024, 2048, 4096, 12):
            assert torch.equal(cdq.dequantize_t(qw, cb, geo, slab_w=slab, rows_per_chunk=rows), ref), (slab, rows)
    for pad in (8, 3):  # a wider row stride (aligned, then unaligned): columns >= N and rows >= M untouched
        big = torch.full((M + 2, N + pad), float("nan"), dtype=torch.float16, device=DEV)
        cdq.dequantize_t(qw, cb, geo, out=big[:M, :N])
        assert torch.equal(big[:M, :N], ref) and torch.isnan(big[:, N:]).all() and torch.isnan(big[M:]).all()
    big = torch.full((M + 11, N), float("nan"), dtype=torch.float16, device=DEV)  # [Ŵᵀ; Aᵀ; 0] in one launch
    cdq.dequantize_t(qw, cb, geo, out=big, stacked_a=A)
    assert torch.equal(big[:M], ref) and torch.equal(big[M : M + 5], A.t()) and (big[M + 5 :] == 0).all()


@needs_gpu
@pytest.mark.parametrize("T,M,zero_from,K", [(5, 64, 72, 128), (3, 77, 80, 85), (2049, 4096, 4144, 4160)])
def test_cuda_copy_pad_cols_is_exact(T, M, zero_from, K):
    x = torch.randn(T, M, device=DEV).half()
    xu = torch.full((T, K), 7.0, device=DEV, dtype=torch.float16)
    ref = copy_pad_cols_reference(x, xu.clone(), zero_from)
    assert torch.equal(cdq.copy_pad_cols(x, xu, zero_from), ref)


@needs_gpu
@pytest.mark.parametrize("mode", ["fold", "rows", "addmm", None])
@pytest.mark.parametrize(
    "N,M,k,rank,bias,T",
    [
        (1000, 2050, 512, 8, True, 65),
        (257, 1030, 128, 5, True, 17),
        (4096, 4096, 4096, 48, False, 300),
        (300, 130, 4096, 0, False, 33),
    ],
)
def test_cuda_dequant_matmul_matches_reference(mode, N, M, k, rank, bias, T):
    geo, qw, cb, A, B, b = make_layer(N, M, 2, 64, k, rank, bias)
    x = torch.randn(T, M, device=DEV).half()
    if mode == "fold" and rank and cdq.fold_supports(geo, rank) is not None:  # ranks 8, 5: no folding kernel
        with pytest.raises(ValueError, match="dequantize_fold_t"):
            pq_dequant_matmul(x, qw, cb, geo, A, B, b, dequant="cuda", lowrank_mode=mode)
        return
    y = pq_dequant_matmul(x, qw, cb, geo, A, B, b, dequant="cuda", lowrank_mode=mode)
    assert y.shape == (T, N) and rel_err(y, pq_gemm_reference(x, qw, cb, geo, A, B, b)) < TOL16
