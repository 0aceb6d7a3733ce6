"""Every tuned launch threshold of the GPU kernels, in one frozen object per device, each with the reason it holds.

Measured on an H100 (BENCHMARKS.md §3; the one-token slab A/B:
`git show 34d9173:bench/results/t1ab_slab4_h100_2c3f2b0.txt`); `Tuning.for_device` adds the device's facts (SMs,
shared memory per CTA). Tests and benchmarks build their own with `dataclasses.replace`. What the kernels' sources
fix (instantiated widths, `__launch_bounds__`, register and shared-memory limits) stays beside their launchers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from athena_runtime.format.environment import Environment


@dataclass(frozen=True)
class Tuning:
    # ---- which kernel serves how many tokens (backends.py)
    lut_max_tokens: int = 1  # CUDA lookup table alone: at 2 tokens frag was faster on 3 of the 4 7B shapes
    lut_no_frag_max_tokens: int = 4  # ... up to 4 where frag does not serve the layer (the table beats dequantize)
    lut_fallback_max_tokens: int = 8  # ... and up to 8 after Triton's table (2-7x cuBLAS from 8 tokens up)
    triton_lut_max_tokens: int = 4  # the Triton lookup table where the CUDA one cannot run
    frag_max_tokens: int = 64  # frag's tallest token tile; above it, dequantize + cuBLAS
    lut_max_centroids: int = 256  # lookup tables for n <= 256 centroids (n table entries per group)
    # ---- lookup table (lut.py)
    lut_t1_slab_w: int = 4  # one token: 4-word slabs in 4096-row chunks beat 8 words / 2048 rows on all 7B shapes
    lut_t1_rows: int = 4096  # ..., halved down to 1024 where fewer than lut_ctas_per_sm CTAs per SM
    lut_ctas_per_sm: float = 1.5  # slab widths / chunks: at least this many table CTAs per SM (else the GPU idles)
    fused_epilogue_max_tokens: int = 1  # split-K epilogue inside the one-token launch (0.5-1.0 µs a call saved)
    epi_tile: int = 0  # rows per epilogue CTA; 0: 32 where that is <= 1 CTA per SM, else 64, 256 if 64 fills the GPU
    epi_poll_ns: int = 64  # epilogue back-off between two reads of a counter (0-64 ns within 0.05 µs of best)
    # ---- fragment kernel (frag.py)
    frag_ctas_per_sm: int = 2  # K split so one wave of ~2 CTAs per SM (a few more would add a near-empty wave)
    frag_stages: int = 3  # shared-memory stages (the template takes others; only 3 is launched)
    # ---- Triton lookup table (triton_lut.py)
    triton_lut_rows: int = 1024  # rows per chunk: tall chunks amortize the table over many rows
    triton_lut_t1_slab_w: int = 8  # one token: best or within 10% of the best on the 7B shapes (kernels.md sweep)
    triton_lut_ctas_per_sm: float = 1.5  # else the widest slab that still gives this many programs per SM
    # ---- dequantize + fold (dequant.py)
    dequant_rows: tuple[int, ...] = (1024, 2048, 4096)  # rows per chunk choose_launch picks from
    dequant_fallback: tuple[int, int] = (8, 2048)  # (slab, rows) where no candidate keeps every CTA resident
    fold_rows: tuple[int, ...] = (512, 1024, 2048)  # fold: 1024 rows best at 4096 x 4096, 512 at 11008 x 4096
    # ---- split-K epilogue (splitk.py)
    splitk_tile_min_tokens: int = 4  # above: [16 tokens, 64 rows] tiles (per-token programs: 14.7 µs at 16 tokens)
    splitk_t1_max_slabs: int = 256  # one token: every slab in one block (4096 x 11008, 140 slabs: 16.3 -> 15.3 µs)
    splitk_max_slabs: int = 64  # 2-4 tokens: at most this many slabs per block
    splitk_ctas_per_sm: int = 2  # 2-4 tokens: row tiles narrow enough for this many programs per SM
    # ---- paged decode attention (paged_decode.py, paged_attention.py)
    decode_tile_tokens: int = 64  # keys per loop step (4 pages of 16): 32 KiB of fp16 K and V loads in flight
    decode_warps: int = 4  # per program; at 64 keys 8 warps take as many registers or more (sm_89 / sm_90)
    decode_wide_head_dim: int = 128  # wider heads (Gemma's 256): half the tile and 8 warps (registers; not timed)
    decode_wide_tile_tokens: int = 32
    decode_wide_warps: int = 8
    decode_programs_per_sm: int = 2  # automatic split count: this many programs per SM
    decode_max_splits: int = 16
    decode_sms: int = 0  # SMs the split count aims at; 0: `sms` (the CPU interpreter's 32: tests still split)
    fresh_sdpa_max_tokens: int = 4096  # one SDPA call of whole prompts covers at most this many (its mask is T x T)
    # ---- quantized KV write (kv_write.py)
    kv_write_one_warp_max_head_dim: int = 128  # one warp per head up to here (SASS counts, sm_89/sm_90; not timed)
    # ---- device facts
    sms: int = 132
    smem_per_cta: int = 227 * 1024  # opt-in dynamic shared memory per CTA (Ada: 99 KB)

    def decode_launch_shape(self, head_dim: int) -> tuple[int, int]:
        """(keys per tile, warps per program) of the decode kernel for heads of `head_dim`."""
        if head_dim > self.decode_wide_head_dim:
            return self.decode_wide_tile_tokens, self.decode_wide_warps
        return self.decode_tile_tokens, self.decode_warps

    @staticmethod
    def for_device(device: torch.device) -> "Tuning":
        if device.type != "cuda":
            return Tuning(sms=4, decode_sms=32)
        return _cuda_tuning(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_tuning(index: int) -> Tuning:
    props = torch.cuda.get_device_properties(index)
    # ATHENA_FUSED_EPILOGUE=0: the one-token epilogue as a second launch (A/B runs of bench.decode)
    fused = 1 if Environment.read().fused_epilogue else 0
    return Tuning(
        sms=props.multi_processor_count,
        fused_epilogue_max_tokens=fused,
        smem_per_cta=getattr(props, "shared_memory_per_block_optin", 99 * 1024),
    )
