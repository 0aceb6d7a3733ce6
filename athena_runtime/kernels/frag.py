"""Host side of the fragment-lookup tensor-core kernel (cuda/frag.cu) for 2-64 tokens, d = 2, b = 6.

Codebook entries looked up straight into mma.m16n8k16 operand registers (the algorithm: the top of frag.cu); tokens
padded to one of T_PADS, 256-row CTAs (NR = 4) where codebook blocks allow, else 128 (NR = 2); K split so one wave
holds about `Tuning.frag_ctas_per_sm` CTAs per SM. The fp16 split-K partial sums (and u = x Bᵀ, summed in the kernel
where `in_kernel_lowrank`) are finished by `splitk.splitk_epilogue`. `pq_reference.pq_matmul_reference` is the spec.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from athena_runtime.kernels import nvrtc
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.pq_reference import check_operands
from athena_runtime.kernels.splitk import splitk_epilogue
from athena_runtime.kernels.tuning import Tuning

WORDS = 8  # index words per stage
T_PADS = (16, 32, 64)
RECIPES = ((6, 2),)  # (bits, d)
# launched: (T_PAD, NR) with NR = n8 row tiles per warp (R = 64·NR rows per CTA; 2 for layers with 128-row blocks),
# `Tuning.frag_stages` buffers in shared memory (STAGES - 1 requested ahead)
MAX_TOKENS = T_PADS[-1]


def smem_bytes(t_pad: int, nr: int, stages: int, bits: int = 6) -> int:
    """Dynamic shared memory of one CTA: STAGES x (index words + codebook lines + x + B rows) + interleaved lines."""
    per_word, nc = 32 // bits, 1 << bits
    xs_ld = per_word * 16 + 8
    cb = per_word * WORDS * nc
    stage = WORDS * (64 * nr + 8) + cb + t_pad * xs_ld // 2 + 8 * xs_ld // 2
    return 4 * (stages * stage + cb)


def row_tile(geo: PQGeometry) -> int | None:
    """NR (n8 row tiles per warp) for this layer: 4 (256-row CTAs) when codebook blocks allow, else 2."""
    for nr in (4, 2):
        if geo.Nb == 1 or geo.k % (64 * nr) == 0:
            return nr
    return None


def supports(geo: PQGeometry, tokens: int, dtype: torch.dtype) -> str | None:
    """Why the kernel does not serve this layer and token count (None: it does)."""
    if dtype != torch.float16:
        return f"fp16 only, not {dtype}"
    if not 1 <= tokens <= MAX_TOKENS:
        return f"{tokens} tokens (1-{MAX_TOKENS})"
    if (geo.bits, geo.d) not in RECIPES:
        return f"recipe b={geo.bits} d={geo.d} (b = 6, d = 2 only)"
    if row_tile(geo) is None:
        return f"codebook blocks of k={geo.k} rows split its 128-row tiles"
    if geo.M % 8:
        return f"M={geo.M} not a multiple of 8 (16-byte rows of x)"
    return None


def in_kernel_lowrank(lr_b: torch.Tensor, n_row_tiles: int) -> bool:
    """Whether the kernel computes u = x Bᵀ itself: rank a multiple of 8 (PQLinear pads it to 16), at most
    8 ranks per row tile, 16-byte aligned rows."""
    r = lr_b.shape[0]
    return (
        r % 8 == 0
        and r // 8 <= n_row_tiles
        and lr_b.stride(1) == 1
        and lr_b.stride(0) % 8 == 0
        and lr_b.data_ptr() % 16 == 0
    )


@functools.cache
def _kernel(t_pad: int, nr: int, bits: int, stages: int, index: int) -> nvrtc.Kernel:
    return nvrtc.Kernel(
        "frag.cu",
        kernel_name(t_pad, nr, bits, stages),
        torch.device("cuda", index),
        smem_max=smem_bytes(t_pad, nr, stages, bits),
    )


def kernel_name(t_pad: int, nr: int, bits: int, stages: int) -> str:
    return f"athena::frag_kernel<{t_pad}, {nr}, {bits}, {stages}>"


def choose_nr(geo: PQGeometry, t_pad: int, stages: int, tuning: Tuning) -> int:
    """256-row CTAs where the codebook blocks and shared memory allow (Ada: 99 KB per CTA), else 128."""
    nr = row_tile(geo)
    return 2 if nr == 4 and smem_bytes(t_pad, 4, stages, geo.bits) > tuning.smem_per_cta else nr


def frag_matmul(
    x,
    qweight,
    codebook,
    geo: PQGeometry,
    lowrank_a=None,
    lowrank_b=None,
    bias=None,
    *,
    split: int | None = None,
    nr: int | None = None,
    glu: tuple[int, int] | None = None,
    tuning: Tuning | None = None,
    checked: bool = False,
):
    """x [T <= 64, M] fp16 -> y [T, N] fp16 (CUDA, tensor cores fed by codebook lookups); with `glu`,
    silu(gate) · up from the epilogue. `split`, `nr`: launch shape (tests, benchmarks; default the Tuning's).
    `checked`: the caller (PQLinear) checked the layer once."""
    T = x.shape[0]
    if not checked:
        check_operands(x, qweight, codebook, geo, lowrank_a, lowrank_b, bias, cuda_fp16=True)
        why = supports(geo, T, x.dtype)
        if why is not None:
            raise ValueError(f"frag_matmul: {why}")
    tuning = tuning or Tuning.for_device(x.device)
    stages = tuning.frag_stages
    t_pad = next(t for t in T_PADS if t >= T)
    nr = nr or choose_nr(geo, t_pad, stages, tuning)
    if nr not in (2, 4):
        raise ValueError(f"frag_matmul: no variant nr={nr} (2 or 4)")
    if nr != 2 and geo.Nb > 1 and geo.k % (64 * nr):
        raise ValueError(f"frag_matmul: {64 * nr}-row tiles would straddle codebook blocks of {geo.k} rows")
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    n_row, n_stages = -(-geo.N_pad // (64 * nr)), geo.GW // WORDS
    if split is None:  # one wave of ~2 CTAs per SM (a few CTAs over it would make a second, nearly empty wave)
        split = max(1, min(n_stages, tuning.frag_ctas_per_sm * tuning.sms // n_row))
    per_split = -(-n_stages // split)
    split = -(-n_stages // per_split)
    partial = torch.empty(split, t_pad, geo.N_pad, device=x.device, dtype=torch.float16)
    u_part, lr_b = None, None
    if lowrank_a is not None:
        lr_b = lowrank_b if lowrank_b.dtype == torch.float16 else lowrank_b.half()
        if in_kernel_lowrank(lr_b, n_row):  # summed by the kernel, one u partial sum per split
            u_part = torch.empty(split, t_pad, lr_b.shape[0], device=x.device, dtype=torch.float32)
        else:
            u_part, lr_b = (x @ lr_b.t()).unsqueeze(0), None  # [1, T, r] by cuBLAS (the epilogue widens it)
    kernel = _kernel(t_pad, nr, geo.bits, stages, x.device.index)
    i32 = ctypes.c_int
    ptr = nvrtc.ptr
    vals = [
        ptr(x),
        i32(x.stride(0)),
        i32(T),
        i32(geo.M),
        ptr(qweight),
        i32(geo.N_pad),
        ptr(codebook),
        i32(geo.G_pad),
        i32(geo.GW),
        i32(geo.k),
        i32(per_split * WORDS),
        ptr(partial),
        ptr(lr_b),
        i32(0 if lr_b is None else lr_b.stride(0)),
        i32(0 if lr_b is None else lr_b.shape[0]),
        ptr(None if lr_b is None else u_part),
    ]
    kernel.launch((n_row, split), smem_bytes(t_pad, nr, stages, geo.bits), nvrtc.param_array(vals))
    return splitk_epilogue(partial, u_part, lowrank_a, bias, T, geo.N, x.dtype, glu, tuning=tuning)
