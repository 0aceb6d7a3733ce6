"""Load-time repacking of an Athena layer (FORMAT.md) into the layout the PQ kernels read.

The layout and why: docs/ARCHITECTURE.md §10 (layout.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GW_ALIGN = 32  # words per row are padded to a multiple of this (the widest slab any kernel uses)
N_ALIGN = 128  # rows are padded to a multiple of this (the tallest row tile any kernel uses)


@dataclass(frozen=True)
class PQGeometry:
    """Sizes of one Athena layer and of its kernel layout."""

    N: int  # outputs
    M: int  # inputs
    d: int  # vector dimension
    n: int  # centroids per codebook
    k: int  # rows per codebook block

    def __post_init__(self):
        for name in ("N", "M", "d", "n", "k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n < 2 or self.n & (self.n - 1) or self.n > 1 << 16:
            raise ValueError(f"n must be a power of two in 2..65536, got {self.n}")

    @property
    def bits(self) -> int:  # b = log2 n
        return self.n.bit_length() - 1

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def G(self) -> int:
        return math.ceil(self.M / self.d)

    @property
    def Nb(self) -> int:
        return math.ceil(self.N / self.k)

    @property
    def GW(self) -> int:
        return _round_up(math.ceil(self.G / self.per_word), GW_ALIGN)

    @property
    def G_pad(self) -> int:
        return self.per_word * self.GW

    @property
    def N_pad(self) -> int:
        return _round_up(self.N, N_ALIGN)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# --------------------------------------------------------------------------------- index words
def pack_words(indices: torch.Tensor, geo: PQGeometry) -> torch.Tensor:
    """I [N, G] (values < n) -> qweight int32 [GW, N_pad] (module docstring)."""
    if tuple(indices.shape) != (geo.N, geo.G):
        raise ValueError(f"indices shape {tuple(indices.shape)} != {(geo.N, geo.G)}")
    I = torch.zeros(geo.N_pad, geo.G_pad, dtype=torch.int64, device=indices.device)
    I[: geo.N, : geo.G] = indices.to(torch.int64)
    planes = I.view(geo.N_pad, geo.per_word, geo.GW)  # [N_pad, PER_WORD, GW], slot s = plane s
    shifts = torch.arange(geo.per_word, device=I.device, dtype=torch.int64) * geo.bits
    words = (planes << shifts[None, :, None]).sum(dim=1)  # [N_pad, GW], < 2^32
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.t().contiguous()


def unpack_words(qweight: torch.Tensor, geo: PQGeometry) -> torch.Tensor:
    """qweight int32 [GW, N_pad] -> I int64 [N, G] (inverse of pack_words)."""
    words = qweight.t().to(torch.int64) & 0xFFFFFFFF  # [N_pad, GW]
    shifts = torch.arange(geo.per_word, device=words.device, dtype=torch.int64) * geo.bits
    planes = (words[:, None, :] >> shifts[None, :, None]) & (geo.n - 1)  # [N_pad, PER_WORD, GW]
    return planes.reshape(geo.N_pad, geo.G_pad)[: geo.N, : geo.G]


def row_chunks(geo: PQGeometry, rows_per_chunk: int) -> tuple[int, int]:
    """(chunks per codebook block, number of row programs) for chunks that never cross a block."""
    chunks_per_block = -(-min(geo.k, geo.N) // rows_per_chunk)
    return chunks_per_block, geo.Nb * chunks_per_block


# --------------------------------------------------------------------------------- codebooks
def pad_codebook(C: torch.Tensor, geo: PQGeometry) -> torch.Tensor:
    """C [Nb, G, n, d] -> kernel codebook [Nb, G_pad, d, n]: l-major, zero for the padding groups."""
    if tuple(C.shape) != (geo.Nb, geo.G, geo.n, geo.d):
        raise ValueError(f"codebook shape {tuple(C.shape)} != {(geo.Nb, geo.G, geo.n, geo.d)}")
    out = torch.zeros(geo.Nb, geo.G_pad, geo.d, geo.n, dtype=C.dtype, device=C.device)
    out[:, : geo.G] = C.transpose(2, 3)
    return out


# --------------------------------------------------------------------------------- reference
def dequantize_reference(qweight: torch.Tensor, codebook: torch.Tensor, geo: PQGeometry) -> torch.Tensor:
    """Ŵ [N, M] from the kernel layout: Ŵ[i, d·j + l] = C[i // k, j, I[i, j], l] (FORMAT.md)."""
    I = unpack_words(qweight, geo)  # [N, G]
    blk = (torch.arange(geo.N, device=I.device) // geo.k)[:, None]  # [N, 1]
    j = torch.arange(geo.G, device=I.device)[None, :]  # [1, G]
    W = codebook[blk, j, :, I]  # [N, G, d] (advanced indices around a slice come first)
    return W.reshape(geo.N, geo.G * geo.d)[:, : geo.M]
