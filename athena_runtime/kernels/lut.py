"""Host side of the CUDA lookup-table kernel (cuda/lut.cu, its one-token epilogue cuda/lut_epilogue.cuh).

The kernel (algorithm: the top of lut.cu) serves 1-8 tokens, instantiated per (T, BITS, SLAB_W) with T padded up
to one of TOKENS. `LutPlan` fixes everything a launch needs for one layer and token count when it is made (kernel,
grid, shared memory, the epilogue's tile, the argument array with the weights' pointers), so a call sets the
pointers of x, the outputs and the scratch buffers and launches. With one token the split-K sums are finished by
epilogue CTAs in the same launch where `fused_epilogue_reason` allows it; otherwise by `splitk.splitk_epilogue`.
`pq_reference.pq_matmul_reference` is the spec; `lut_matmul` the functional form (tests, benchmarks).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging

import torch

from athena_runtime.kernels import nvrtc
from athena_runtime.kernels.layout import PQGeometry, row_chunks
from athena_runtime.kernels.pq_reference import check_operands
from athena_runtime.kernels.splitk import splitk_epilogue
from athena_runtime.kernels.tuning import Tuning
from athena_runtime.log_once import log_once

log = logging.getLogger(__name__)

THREADS, ROWS_PER_THREAD = 256, 4  # a CTA covers THREADS * 4 = 1024 rows per pass
TOKENS = (1, 2, 4, 8)  # instantiated token counts (T is padded up to the next one; the registry stops at 8)
BITS = (4, 6, 8)
SYNC_INTS = 4096  # counters of the fused epilogue: 2 + one per row program


def max_slab_w(bits: int, tokens: int) -> int:
    """Widest slab (<= 32 words) whose fp16 table fits in 24 KB (several CTAs per SM)."""
    per_word, nc = 32 // bits, 1 << bits
    slab = 32
    while slab > 2 and per_word * slab * tokens * nc * 2 > 24 * 1024:
        slab //= 2
    return slab


def slab_widths(t_inst: int, bits: int) -> tuple[int, ...]:
    """The slab widths launched for (T, b), widest first: b = 6 with 2-3 widths (one is picked per layer shape), the
    others with one; all with tables within the default 48 KB of shared memory; 4 words for one token at b = 6."""
    top = max_slab_w(bits, t_inst)
    slabs = {
        s
        for s in ((top, top // 2, top // 4) if bits == 6 else (top,))
        if s >= 2 and (32 // bits) * s * t_inst * (1 << bits) * 2 <= 48 * 1024
    }
    if (t_inst, bits) == (1, 6):
        slabs.add(4)
    return tuple(sorted(slabs, reverse=True))


def supports(geo: PQGeometry, tokens: int, dtype: torch.dtype) -> str | None:
    """Why the kernel does not serve this layer and token count (None: it does)."""
    t_inst = next((t for t in TOKENS if t >= tokens), None)
    if t_inst is None:
        return f"more than {TOKENS[-1]} tokens"
    if dtype != torch.float16:
        return f"fp16 only, not {dtype}"
    if geo.bits not in BITS or geo.d > 4 or (geo.k % 4 and geo.Nb > 1):
        return f"recipe b={geo.bits} d={geo.d} k={geo.k} (b in 4/6/8, d <= 4, k % 4 == 0 with several blocks)"
    if not any(geo.GW % s == 0 for s in slab_widths(t_inst, geo.bits)):
        return f"no slab width divides GW={geo.GW}"
    return None


def table_smem(t_inst: int, bits: int, slab_w: int) -> int:
    return (32 // bits) * slab_w * t_inst * (1 << bits) * 2


def choose_launch(geo: PQGeometry, t_inst: int, tuning: Tuning) -> tuple[int, int]:
    """(slab_w, rows_per_chunk). One token: the measured-best 4-word slabs in the tallest chunk, from 4096 rows down
    to 1024, that still gives `lut_ctas_per_sm` table CTAs per SM (4096 x 4096 at 4096 rows: 104 CTAs on 132 SMs would
    leave a third of the GPU empty). Else one 1024-row pass per chunk and the widest slab with that many CTAs."""
    target = tuning.lut_ctas_per_sm * tuning.sms
    slabs = [s for s in slab_widths(t_inst, geo.bits) if geo.GW % s == 0]
    if t_inst == 1 and tuning.lut_t1_slab_w in slabs:
        rows = tuning.lut_t1_rows
        while rows > 1024 and row_chunks(geo, rows)[1] * (geo.GW // tuning.lut_t1_slab_w) < target:
            rows //= 2
        return tuning.lut_t1_slab_w, rows
    slabs = [s for s in slabs if s <= 16] or slabs  # 32 words hold 128 prefetch registers: ~240 in all
    rows = THREADS * ROWS_PER_THREAD
    n_row = row_chunks(geo, rows)[1]
    return next((s for s in slabs if n_row * (geo.GW // s) >= target), slabs[-1]), rows


def prog_rows(geo: PQGeometry, rows_per_chunk: int) -> list[tuple[int, int]]:
    """[row_start, row_end) of each row program of the table CTAs (empty ones too), as the kernel derives them."""
    chunks_per_block, n_row = row_chunks(geo, rows_per_chunk)
    out = []
    for p in range(n_row):
        blk = p // chunks_per_block
        start = blk * geo.k + (p % chunks_per_block) * rows_per_chunk
        out.append((start, min(start + rows_per_chunk, (blk + 1) * geo.k, geo.N)))
    return out


@functools.lru_cache(maxsize=256)
def _layout_reason(geo: PQGeometry, rows_per_chunk: int, glu: tuple[int, int] | None) -> str | None:
    """The geometry's part of `fused_epilogue_reason` (cached: it walks the row programs)."""
    progs = prog_rows(geo, rows_per_chunk)
    if 2 + len(progs) > SYNC_INTS:
        return f"{len(progs)} row programs (counters for {SYNC_INTS - 2})"
    if geo.N_pad % 8:
        return f"N_pad {geo.N_pad} not a multiple of 8"
    if glu is not None:
        if glu[0] % 8:
            return f"gate/up offset {glu[0]} not a multiple of 8"
        # the epilogue CTAs wait for the row programs of their rows, and the counters are zeroed once they all
        # waited: a row program whose rows are neither gate nor up rows would be left counted
        up, F = glu
        if any(s < e and min(e, F) <= s and min(e, up + F) <= max(s, up) for s, e in progs):
            return "a row program holds neither gate nor up rows"
    return None


def fused_epilogue_reason(
    geo: PQGeometry, t_inst: int, rows_per_chunk: int, lowrank_a, glu, device, tuning: Tuning
) -> str | None:
    """Why the split-K epilogue is a separate launch for this layer (None: fused into the kernel)."""
    if t_inst > tuning.fused_epilogue_max_tokens:
        return f"more than {tuning.fused_epilogue_max_tokens} token(s)"
    reason = _layout_reason(geo, rows_per_chunk, tuple(glu) if glu is not None else None)
    if reason is not None:
        return reason
    if lowrank_a is not None and (
        lowrank_a.dtype != torch.float16
        or lowrank_a.shape[1] % 8
        or lowrank_a.stride(1) != 1
        or lowrank_a.stride(0) % 8
        or lowrank_a.data_ptr() % 16
    ):
        return "low-rank A not fp16 with 16-byte rows of a rank divisible by 8"
    parts = 2 if glu is not None else 1
    if (parts * 8 * THREADS + t_inst * (0 if lowrank_a is None else lowrank_a.shape[1])) * 4 > 48 * 1024:
        return "rank too large for the epilogue's shared memory"
    if sync_buffer(device) is None:
        return "first call inside a CUDA-graph capture (counters not made yet)"
    return None


_sync: dict[int, torch.Tensor] = {}


def sync_buffer(device) -> torch.Tensor | None:
    """The fused epilogue's counters on `device` (zero between calls; every call leaves them zero), or None
    while a CUDA graph is being captured before the first eager call made them (a capture cannot zero
    memory for the calls outside it)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _sync.get(idx)
    if buf is None and not torch.cuda.is_current_stream_capturing():
        buf = _sync[idx] = torch.zeros(SYNC_INTS, device=device, dtype=torch.int32)
    return buf


class EpiArgs(ctypes.Structure):  # lut_epilogue.cuh's EpiArgs, passed by value
    _fields_ = [
        ("sync", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("stride_yt", ctypes.c_int),
        ("lr_a", ctypes.c_void_p),
        ("stride_an", ctypes.c_int),
        ("bias", ctypes.c_void_p),
        ("n_out", ctypes.c_int),
        ("up_off", ctypes.c_int),
        ("glu", ctypes.c_int),
        ("n_epi", ctypes.c_int),
        ("tile", ctypes.c_int),
        ("poll_ns", ctypes.c_int),
    ]


def kernel_name(t_inst: int, bits: int, slab_w: int) -> str:
    return f"athena::lut_kernel<{t_inst}, {bits}, {slab_w}>"


@functools.cache
def _kernel(name: str, index: int) -> nvrtc.Kernel:
    return nvrtc.Kernel("lut.cu", name, torch.device("cuda", index))


class LutPlan:
    """One layer (fp16 CUDA tensors, checked by the caller) and one instantiated token count, ready to launch:
    `plan(x)` -> y [T, N] (or silu(gate) · up [T, F] with `glu`)."""

    def __init__(
        self,
        qweight,
        codebook,
        geo: PQGeometry,
        lowrank_a,
        lowrank_b,
        bias,
        t_inst: int,
        *,
        tuning: Tuning,
        glu: tuple[int, int] | None = None,
        slab_w: int | None = None,
        rows_per_chunk: int | None = None,
        fused_epilogue: bool | None = None,
    ):
        dev = qweight.device
        auto_s, auto_r = choose_launch(geo, t_inst, tuning)
        self.slab_w, self.rows = slab_w or auto_s, rows_per_chunk or auto_r
        if self.slab_w not in slab_widths(t_inst, geo.bits) or geo.GW % self.slab_w:
            raise ValueError(
                f"no CUDA lookup-table launch for T={t_inst} bits={geo.bits} slab_w={self.slab_w} (GW={geo.GW})"
            )
        if self.rows % 4 or self.rows <= 0:
            raise ValueError(f"rows_per_chunk must be a positive multiple of 4, got {self.rows}")
        self.geo, self.t_inst, self.glu, self.device, self.tuning = geo, t_inst, glu, dev, tuning
        self.lowrank_a, self.bias = lowrank_a, bias
        self.lr_b = None if lowrank_b is None else lowrank_b.half().contiguous()
        self.rank = 0 if lowrank_a is None else lowrank_a.shape[1]
        self.n_slabs = geo.GW // self.slab_w
        chunks, n_row = row_chunks(geo, self.rows)
        self.kernel = _kernel(kernel_name(t_inst, geo.bits, self.slab_w), dev.index)
        smem = table_smem(t_inst, geo.bits, self.slab_w)
        self.n_out = glu[1] if glu is not None else geo.N
        ep = EpiArgs()
        reason = (
            "not asked for"
            if fused_epilogue is False
            else fused_epilogue_reason(geo, t_inst, self.rows, lowrank_a, glu, dev, tuning)
        )
        if reason is None:  # epilogue CTAs after the table CTAs, where the GPU holds them all beside the others
            parts = 2 if glu is not None else 1
            tile = tuning.epi_tile
            epi_smem = lambda tl: (parts * (THREADS // 32) * tl + t_inst * self.rank) * 4  # noqa: E731
            slots = self.kernel.occupancy(max(smem, epi_smem(tile or 256))) * tuning.sms
            if tile == 0:  # 32 rows where that is at most one epilogue CTA per SM (4096 outputs at 4-word slabs:
                # 13.7 µs against 14.6 at 64 rows), else 64 (best or within 0.1 µs of it on the larger 7B shapes),
                # 256 where 64-row CTAs would not leave the waited-on CTAs a slot (H100, BENCHMARKS.md §3)
                tile = 32 if -(-self.n_out // 32) <= tuning.sms else 64 if -(-self.n_out // 64) < slots else 256
            n_epi = -(-self.n_out // tile)
            if n_epi >= slots:
                reason = "more epilogue CTAs than the GPU holds at once"
            else:
                smem = max(smem, epi_smem(tile))
                ep = EpiArgs(
                    sync_buffer(dev).data_ptr(),
                    0,
                    0,
                    _ptr(lowrank_a),
                    0 if lowrank_a is None else lowrank_a.stride(0),
                    _ptr(bias),
                    self.n_out,
                    glu[0] if glu else 0,
                    1 if glu else 0,
                    n_epi,
                    tile,
                    tuning.epi_poll_ns,
                )
        if fused_epilogue and reason is not None:
            raise ValueError(f"lut: fused epilogue unavailable: {reason}")
        if reason is not None and fused_epilogue is None and t_inst <= tuning.fused_epilogue_max_tokens:
            log_once(
                log,
                ("lut", "unfused", geo.N, geo.M, glu),
                logging.INFO,
                "lut %dx%d: split-K epilogue as a second launch (%s)",
                geo.N,
                geo.M,
                reason,
            )
        self.fused, self.smem, self.ep = reason is None, smem, ep
        self.grid = (self.rank + n_row * self.n_slabs + ep.n_epi, 1)
        i32 = ctypes.c_int
        # the kernel's arguments: x (0-3), weights (4-14), partial (15), low-rank (16-20), epilogue (21)
        self.args = [
            ctypes.c_void_p(),
            i32(),
            i32(),
            i32(geo.M),
            ctypes.c_void_p(qweight.data_ptr()),
            i32(geo.N_pad),
            ctypes.c_void_p(codebook.data_ptr()),
            i32(geo.G_pad),
            i32(geo.d),
            i32(geo.N),
            i32(geo.GW),
            i32(geo.k),
            i32(chunks),
            i32(self.rows),
            i32(n_row),
            ctypes.c_void_p(),
            ctypes.c_void_p(_ptr(self.lr_b)),
            i32(0 if self.lr_b is None else self.lr_b.stride(0)),
            i32(self.rank),
            i32(),
            ctypes.c_void_p(),
            self.ep,
        ]
        self.params = nvrtc.param_array(self.args)
        self._b_vec = self.lr_b is not None and self.lr_b.stride(0) % 8 == 0 and self.lr_b.data_ptr() % 16 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        T, dev, a = x.shape[0], self.device, self.args
        x = x if x.stride(1) == 1 else x.contiguous()
        partial = torch.empty(self.n_slabs, self.t_inst, self.geo.N_pad, device=dev, dtype=torch.float16)
        u = torch.empty(1, self.t_inst, self.rank, device=dev, dtype=torch.float32) if self.rank else None
        a[0].value, a[1].value, a[2].value = x.data_ptr(), x.stride(0), T
        a[15].value, a[20].value = partial.data_ptr(), 0 if u is None else u.data_ptr()
        # int4 loads of x and B rows when every row starts on 16 bytes (else scalar loads)
        a[19].value = self.geo.M // 8 * 8 if self._b_vec and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0 else 0
        if self.fused:
            y = torch.empty(T, self.n_out, device=dev, dtype=torch.float16)
            self.ep.y, self.ep.stride_yt = y.data_ptr(), y.stride(0)
            self.kernel.launch(self.grid, self.smem, self.params)
            return y
        self.kernel.launch(self.grid, self.smem, self.params)
        return splitk_epilogue(
            partial, u, self.lowrank_a, self.bias, T, self.geo.N, x.dtype, self.glu, tuning=self.tuning
        )


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def lut_matmul(
    x,
    qweight,
    codebook,
    geo: PQGeometry,
    lowrank_a=None,
    lowrank_b=None,
    bias=None,
    *,
    slab_w: int | None = None,
    rows_per_chunk: int | None = None,
    glu: tuple[int, int] | None = None,
    fused_epilogue: bool | None = None,
    epi_tile: int | None = None,
):
    """The CUDA lookup-table kernel for T <= 8 fp16 tokens: x [T, M] -> y [T, N] (silu(gate) · up with `glu`).
    A plan per call (tests, benchmarks; PQLinear keeps its plans): launch shape and epilogue tile default to
    `Tuning`; `fused_epilogue` None: fused where the layer allows it, True: must be, False: never."""
    check_operands(x, qweight, codebook, geo, lowrank_a, lowrank_b, bias, cuda_fp16=True)
    why = supports(geo, x.shape[0], x.dtype)
    if why is not None:
        raise ValueError(f"lut_matmul: {why}")
    tuning = Tuning.for_device(x.device)
    if epi_tile is not None:
        tuning = dataclasses.replace(tuning, epi_tile=epi_tile)
    t_inst = next(t for t in TOKENS if t >= x.shape[0])
    plan = LutPlan(
        qweight,
        codebook,
        geo,
        lowrank_a,
        lowrank_b,
        bias.half() if bias is not None else None,
        t_inst,
        tuning=tuning,
        glu=glu,
        slab_w=slab_w,
        rows_per_chunk=rows_per_chunk,
        fused_epilogue=fused_epilogue,
    )
    return plan(x)
