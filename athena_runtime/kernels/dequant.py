"""Host side of the CUDA dequantize kernels (cuda/dequant.cu, cuda/fold.cu): Ŵᵀ or (Ŵ + A B)ᵀ [M, N] as fp16.

    dequantize_t       Ŵᵀ[D·j + l, i] = C[i // k, j, l, I[i, j]]  (a gather: bit-exact); with `stacked_a` = A [N, r]
                       also [Ŵᵀ; Aᵀ; 0] in one launch (the "rows" low-rank GEMM operand of dequant_matmul.py)
    dequantize_fold_t  (Ŵ + A B)ᵀ summed in fp32, rounded once (the low-rank product on tensor cores)
    copy_pad_cols      [x | · | 0]: the other operand of the "rows" GEMM
The algorithms are described at the top of the .cu files; their PyTorch specs, with the same arguments and checks, are
in tests/pq_dequant_reference.py. Compiled by NVRTC on first use (`nvrtc.py`).
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from athena_runtime.kernels import nvrtc
from athena_runtime.kernels.layout import PQGeometry, row_chunks
from athena_runtime.kernels.nvrtc import ptr
from athena_runtime.kernels.pq_reference import check_layer_tensors
from athena_runtime.kernels.tuning import Tuning

THREADS = 256  # a thread owns 4 consecutive rows: passes of 1024 rows
MIN_BLOCKS = 2  # __launch_bounds__(THREADS, 2) in dequant.cu: <= 128 registers, 2 CTAs per SM
MAIN_RECIPE, MAIN_SLABS = (6, 2), (4, 8, 16)  # (bits, d) of the default recipe and its slab widths
SMEM_LIMIT = 48 * 1024  # codebook lines per CTA (the default dynamic shared-memory limit)
# fold.cu: 8-word slabs, rounds of 64 rows, B's fragments (rank / 16 k-steps) in registers for the CTA's life,
# __launch_bounds__(THREADS, 2)
FOLD_SLAB_W, FOLD_ROUND_ROWS, FOLD_MAX_RANK, FOLD_MIN_BLOCKS = 8, 64, 64, 2
FOLD_FRAG_REGS = 60  # at most this many registers of B's fragments (PER_WORD · m-tiles · KS · 4): 64 and more spill
FOLD_SMEM_LIMIT = 96 * 1024  # per CTA (opt-in above 48 KB; Ada allows 99 KB, Hopper 227 KB)
RECIPES = tuple((bits, d) for bits in (4, 6, 8) for d in (1, 2, 3, 4))  # both kernels: b in 4/6/8, d <= 4


def smem_bytes(bits: int, d: int, slab_w: int) -> int:
    return (32 // bits) * slab_w * d * (1 << bits) * 2


def slab_widths(bits: int, d: int) -> tuple[int, ...]:
    """The slab widths launched for a recipe: MAIN_SLABS for the default one, else the widest of 8 / 4 words whose
    codebook lines fit SMEM_LIMIT."""
    if (bits, d) == MAIN_RECIPE:
        return MAIN_SLABS
    return (next(s for s in (8, 4) if smem_bytes(bits, d, s) <= SMEM_LIMIT),)


def supports(geo: PQGeometry, dtype: torch.dtype = torch.float16) -> str | None:
    """Why the dequantize kernel does not serve this layer (None: it does)."""
    if dtype != torch.float16:
        return f"it writes fp16, not {dtype}"
    if (geo.bits, geo.d) not in RECIPES:
        return f"recipe b={geo.bits} d={geo.d} not instantiated (b in 4/6/8, d <= 4)"
    return None


def n_ctas(geo: PQGeometry, slab_w: int, rows_per_chunk: int) -> int:
    return geo.Nb * -(-min(geo.k, geo.N) // rows_per_chunk) * (geo.GW // slab_w)


@functools.lru_cache(maxsize=1024)
def choose_launch(geo: PQGeometry, tuning: Tuning) -> tuple[int, int]:
    """(slab_w, rows_per_chunk) by a rule to be replaced by measurements: all CTAs resident at once (no
    partial last wave) with at least one per SM, as many as that allows (more warps to hide latency),
    ties to taller chunks (the codebook lines staged per CTA are a fraction n / rows of its output);
    layers too small or too large for that get the most CTAs, or `tuning.dequant_fallback`."""
    n_sms = tuning.sms
    slabs = [s for s in slab_widths(geo.bits, geo.d) if geo.GW % s == 0]
    resident = MIN_BLOCKS * n_sms
    cands = [(n_ctas(geo, s, r), r, s) for s in slabs for r in tuning.dequant_rows]
    fits = [c for c in cands if n_sms <= c[0] <= resident]
    if fits:
        _, r, s = max(fits)
    elif all(c[0] < n_sms for c in cands):
        _, r, s = max(cands, key=lambda c: (c[0], -c[1]))
    else:
        s, r = tuning.dequant_fallback
        s = s if s in slabs else slabs[0]
    return s, r


def fold_frag_regs(bits: int, d: int, ks: int) -> int:
    return (32 // bits) * -(-d * FOLD_SLAB_W // 16) * ks * 4


def fold_smem_bytes(bits: int, d: int, rank: int) -> int:
    """Low-rank tile (fp32) + codebook lines + B's columns of one fold CTA."""
    per_word, cols = 32 // bits, d * FOLD_SLAB_W
    m_tiles = -(-cols // 16)
    return (
        per_word * m_tiles * 16 * (FOLD_ROUND_ROWS + 4) * 4
        + per_word * FOLD_SLAB_W * d * (1 << bits) * 2
        + per_word * m_tiles * 16 * (rank + 8) * 2
    )


def fold_supports(geo: PQGeometry, rank: int, dtype: torch.dtype = torch.float16) -> str | None:
    """Why the folding kernel does not serve this layer and rank (None: it does)."""
    if dtype != torch.float16 or (geo.bits, geo.d) not in RECIPES:
        return f"fp16 and b in 4/6/8, d <= 4 only (got {dtype}, b={geo.bits}, d={geo.d})"
    if rank % 16 or not 0 < rank <= FOLD_MAX_RANK or fold_frag_regs(geo.bits, geo.d, rank // 16) > FOLD_FRAG_REGS:
        return f"rank {rank}: a multiple of 16 whose fragments fit {FOLD_FRAG_REGS} registers"
    if geo.GW % FOLD_SLAB_W or fold_smem_bytes(geo.bits, geo.d, rank) > FOLD_SMEM_LIMIT:
        return "shared memory"
    return None


@functools.lru_cache(maxsize=1024)
def choose_fold_rows(geo: PQGeometry, tuning: Tuning) -> int:
    """Rows per chunk with the fullest last wave (CTAs / slots over its ceiling, FOLD_MIN_BLOCKS CTAs per SM), ties
    (within 0.02) to taller chunks (fewer CTAs stage the same codebook lines and B columns). H100, 2048 tokens
    (BENCHMARKS.md §3): 4096 x 4096 1024 rows 31.8 µs (512: 34.6, 2048: 43.0); 11008 x 4096 512 rows 76.8 (1024:
    82.3, 2048: 95.8)."""

    def fill(rows):
        waves = n_ctas(geo, FOLD_SLAB_W, rows) / (FOLD_MIN_BLOCKS * tuning.sms)
        return waves / math.ceil(waves)

    best = max(fill(r) for r in tuning.fold_rows)
    return max(r for r in tuning.fold_rows if fill(r) >= best - 0.02)


@functools.cache
def _kernel(file: str, name: str, index: int, smem_max: int = 0) -> nvrtc.Kernel:
    return nvrtc.Kernel(file, name, torch.device("cuda", index), smem_max=smem_max)


def kernel_names(geo: PQGeometry, rank: int) -> list[tuple[str, str, int]]:
    """(file, instance, opt-in shared memory) of every kernel this layer's prefill may launch (compiled ahead)."""
    out = [
        ("dequant.cu", f"athena::dequant_kernel<{geo.bits}, {geo.d}, {s}>", 0)
        for s in slab_widths(geo.bits, geo.d)
        if geo.GW % s == 0
    ]
    if rank and fold_supports(geo, rank) is None:
        out.append(
            (
                "fold.cu",
                f"athena::fold_kernel<{geo.bits}, {geo.d}, {rank // 16}>",
                fold_smem_bytes(geo.bits, geo.d, rank),
            )
        )
    return out


# ----------------------------------------------------------------------------------- wrappers
def _geometry_args(qweight, codebook, geo: PQGeometry, rows_per_chunk: int) -> tuple[int, list]:
    """(row programs, the leading arguments of dequant_kernel and fold_kernel: the layer and its row chunks)."""
    chunks, n_row = row_chunks(geo, rows_per_chunk)
    i32 = ctypes.c_int
    return n_row, [
        ptr(qweight),
        i32(geo.N_pad),
        ptr(codebook),
        i32(geo.G_pad),
        i32(geo.N),
        i32(geo.M),
        i32(geo.GW),
        i32(geo.k),
        i32(chunks),
        i32(rows_per_chunk),
    ]


def check_args(qweight, codebook, geo: PQGeometry, dtype, out, stacked_a) -> int:
    """`dequantize_t`'s argument checks (its reference in the tests shares them); returns out's row count K."""
    check_layer_tensors(qweight, codebook, geo)
    if dtype != torch.float16 or codebook.dtype != torch.float16:
        raise ValueError(f"dequantize_t writes fp16 from an fp16 codebook, got {dtype} / {codebook.dtype}")
    r = 0
    if stacked_a is not None:
        if stacked_a.dim() != 2 or stacked_a.shape[0] != geo.N:
            raise ValueError(f"stacked_a must be A [{geo.N}, r], got {tuple(stacked_a.shape)}")
        r = stacked_a.shape[1]
    K = geo.M + r if out is None else out.shape[0]
    if out is not None and (
        out.dim() != 2
        or out.shape[1] != geo.N
        or out.shape[0] < geo.M + r
        or out.stride(1) != 1
        or out.dtype != torch.float16
    ):
        raise ValueError(
            f"out must be a row-contiguous fp16 [K >= {geo.M + r}, {geo.N}] tensor, got "
            f"{out.dtype} {tuple(out.shape)} strides {tuple(out.stride())}"
        )
    if out is not None and stacked_a is None and out.shape[0] != geo.M:
        raise ValueError(f"out must be [{geo.M}, {geo.N}] without stacked_a, got {tuple(out.shape)}")
    if len({t.device for t in (qweight, codebook, out, stacked_a) if t is not None}) != 1:
        raise ValueError("all operands must be on one device")
    return K


def dequantize_t(
    qweight,
    codebook,
    geo: PQGeometry,
    dtype=torch.float16,
    *,
    out=None,
    stacked_a=None,
    slab_w: int | None = None,
    rows_per_chunk: int | None = None,
):
    """Ŵᵀ [M, N] fp16 by the CUDA kernel: `out` an optional row-contiguous destination (e.g. the top rows of a
    taller buffer); with `stacked_a` = A [N, r], `out` is [K >= M + r, N] and gets [Ŵᵀ; Aᵀ; 0] in the same launch.
    slab_w / rows_per_chunk: launch shape (default `choose_launch`)."""
    K = check_args(qweight, codebook, geo, dtype, out, stacked_a)
    if qweight.device.type != "cuda":
        raise ValueError("dequantize_t needs CUDA tensors (the reference runs anywhere)")
    why = supports(geo, dtype)
    if why is not None:
        raise ValueError(f"dequantize_t: {why}")
    auto_s, auto_r = choose_launch(geo, Tuning.for_device(qweight.device))
    slab_w, rows_per_chunk = slab_w or auto_s, rows_per_chunk or auto_r
    if slab_w not in slab_widths(geo.bits, geo.d) or geo.GW % slab_w:
        raise ValueError(f"no CUDA dequantize for bits={geo.bits} d={geo.d} slab_w={slab_w} (GW={geo.GW})")
    if rows_per_chunk % 4 or rows_per_chunk <= 0:
        raise ValueError(f"rows_per_chunk must be a positive multiple of 4, got {rows_per_chunk}")
    Wt = torch.empty(K, geo.N, device=qweight.device, dtype=dtype) if out is None else out
    a, extra = None, 0
    if (
        stacked_a is not None
    ):  # the kernel reads 8 ranks per 16-byte load: pad r to a multiple of 8 (zeros) where needed
        a = stacked_a.to(torch.float16)
        if a.shape[1] % 8 or a.stride(1) != 1 or a.stride(0) % 8 or a.data_ptr() % 16:
            a = torch.nn.functional.pad(a, (0, -a.shape[1] % 8)).contiguous()
        extra = K - geo.M
    k = _kernel("dequant.cu", f"athena::dequant_kernel<{geo.bits}, {geo.d}, {slab_w}>", qweight.device.index)
    n_row, vals = _geometry_args(qweight, codebook, geo, rows_per_chunk)
    vals += [
        ptr(Wt),
        ctypes.c_longlong(Wt.stride(0)),
        ptr(a),
        ctypes.c_int(0 if a is None else a.stride(0)),
        ctypes.c_int(0 if a is None else a.shape[1]),
        ctypes.c_int(extra),
    ]
    k.launch(
        (n_row, geo.GW // slab_w + (1 if extra else 0)), smem_bytes(geo.bits, geo.d, slab_w), nvrtc.param_array(vals)
    )
    return Wt


def check_fold(qweight, codebook, geo: PQGeometry, lowrank_a, lowrank_b, out):
    check_layer_tensors(qweight, codebook, geo)
    if (
        lowrank_a is None
        or lowrank_b is None
        or lowrank_a.dim() != 2
        or lowrank_b.dim() != 2
        or lowrank_a.shape[0] != geo.N
        or lowrank_b.shape[1] != geo.M
        or lowrank_a.shape[1] != lowrank_b.shape[0]
    ):
        raise ValueError(
            f"dequantize_fold_t: low-rank factors A [{geo.N}, r] and B [r, {geo.M}] needed, got "
            f"{None if lowrank_a is None else tuple(lowrank_a.shape)} x "
            f"{None if lowrank_b is None else tuple(lowrank_b.shape)}"
        )
    if out is not None and (tuple(out.shape) != (geo.M, geo.N) or out.stride(1) != 1 or out.dtype != torch.float16):
        raise ValueError(
            f"out must be a row-contiguous fp16 [{geo.M}, {geo.N}] tensor, got {out.dtype} {tuple(out.shape)}"
        )


def dequantize_fold_t(
    qweight, codebook, geo: PQGeometry, lowrank_a, lowrank_b, *, out=None, rows_per_chunk: int | None = None
):
    """(Ŵ + A B)ᵀ [M, N] fp16 by the CUDA kernel; `out` an optional row-contiguous destination, `rows_per_chunk` the
    launch shape (default `choose_fold_rows`)."""
    check_fold(qweight, codebook, geo, lowrank_a, lowrank_b, out)
    if qweight.device.type != "cuda":
        raise ValueError("dequantize_fold_t needs CUDA tensors (the reference runs anywhere)")
    rank = lowrank_a.shape[1]
    why = fold_supports(geo, rank, codebook.dtype)
    if why is not None:
        raise ValueError(f"dequantize_fold_t: {why}")
    rows = rows_per_chunk or choose_fold_rows(geo, Tuning.for_device(qweight.device))
    if rows % 8 or rows <= 0:
        raise ValueError(f"rows_per_chunk must be a positive multiple of 8, got {rows}")
    A, B = lowrank_a.half(), lowrank_b.half()
    if A.stride(1) != 1 or A.stride(0) % 2 or A.data_ptr() % 4 or B.stride(1) != 1:
        A, B = A.contiguous(), B.contiguous()
    Wt = torch.empty(geo.M, geo.N, device=qweight.device, dtype=torch.float16) if out is None else out
    smem = fold_smem_bytes(geo.bits, geo.d, rank)
    k = _kernel("fold.cu", f"athena::fold_kernel<{geo.bits}, {geo.d}, {rank // 16}>", qweight.device.index, smem)
    n_row, vals = _geometry_args(qweight, codebook, geo, rows)
    vals += [
        ptr(A),
        ctypes.c_int(A.stride(0)),
        ptr(B),
        ctypes.c_int(B.stride(0)),
        ctypes.c_int(rank),
        ptr(Wt),
        ctypes.c_longlong(Wt.stride(0)),
    ]
    k.launch((n_row, geo.GW // FOLD_SLAB_W), smem, nvrtc.param_array(vals))
    return Wt


def copy_pad_cols(x, xu, zero_from: int):
    """xu[:, :M] = x, xu[:, zero_from:] = 0 (columns M .. zero_from are left as they are) in one CUDA launch
    (16-byte vectors where rows are aligned)."""
    check_copy(x, xu, zero_from)
    if x.device.type != "cuda":
        raise ValueError("copy_pad_cols needs CUDA tensors")
    T = x.shape[0]
    if T:
        k = _kernel("dequant.cu", "athena::copy_pad_cols_kernel", x.device.index)
        vals = [
            ptr(x),
            ctypes.c_longlong(x.stride(0)),
            ptr(xu),
            ctypes.c_longlong(xu.stride(0)),
            ctypes.c_int(T),
            ctypes.c_int(x.shape[1]),
            ctypes.c_int(zero_from),
            ctypes.c_int(xu.shape[1]),
        ]
        k.launch((min(T, 65535), 1), 0, nvrtc.param_array(vals))
    return xu


def check_copy(x, xu, zero_from):
    if x.dim() != 2 or xu.dim() != 2 or x.shape[0] != xu.shape[0] or not x.shape[1] <= zero_from <= xu.shape[1]:
        raise ValueError(
            f"copy_pad_cols: x [T, M] into xu [T, K >= zero_from >= M], got {tuple(x.shape)}, "
            f"{tuple(xu.shape)}, zero_from={zero_from}"
        )
    if x.stride(1) != 1 or xu.stride(1) != 1 or x.dtype != xu.dtype or x.device != xu.device:
        raise ValueError("copy_pad_cols: row-contiguous tensors of one dtype and device")
    if x.device.type == "cuda" and x.dtype != torch.float16:
        raise ValueError(f"copy_pad_cols: the CUDA kernel copies fp16, got {x.dtype}")
