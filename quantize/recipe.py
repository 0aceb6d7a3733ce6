"""Quantization recipes: one frozen dataclass per method, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class AthenaRecipe:
    """Product quantization with Hessian-aware k-means codebooks (docs/ARCHITECTURE.md §3).

    Each row of W is cut into vectors of ``d`` consecutive input columns; every block of ``k``
    rows and every column group shares one codebook of ``n`` centroids.
    """

    d: int = 2  # vector dimension (columns per group)
    n: int = 64  # centroids per codebook (power of two; log2(n) bits per index)
    k: int = 4096  # rows per codebook
    codebook_bits: int = 8  # 8: uint8 codes with per-dimension fp16 min/scale; 16: fp16 centroids
    lowrank: float = 0.01  # residual rank r = round(lowrank * min(N, M)); 0 disables it
    row_scale: bool = False  # one fp16 scale per output row; rows are clustered normalized (FORMAT.md v2)
    kmeans_iters: int = 8  # fixed Lloyd-iteration budget per column group (after k-means++ seeding)
    damp: float = 0.01  # H += damp * mean(diag H) * I
    block_size: int = 128  # lazy-batch width in columns for the GPTQ-style error updates
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d", "n", "k", "codebook_bits", "kmeans_iters", "block_size", "seed"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"AthenaRecipe.{name} must be an integer, got {getattr(self, name)!r}")
        if self.d < 1:
            raise ValueError(f"AthenaRecipe.d (vector dimension) must be >= 1, got {self.d}")
        if self.n < 2 or self.n > (1 << 16) or self.n & (self.n - 1):
            raise ValueError(f"AthenaRecipe.n (centroids) must be a power of two in 2..65536, got {self.n}")
        if self.k < 1:
            raise ValueError(f"AthenaRecipe.k (rows per codebook) must be >= 1, got {self.k}")
        if self.codebook_bits not in (8, 16):
            raise ValueError(f"AthenaRecipe.codebook_bits must be 8 or 16, got {self.codebook_bits}")
        if not isinstance(self.lowrank, (int, float)) or isinstance(self.lowrank, bool) or not 0 <= self.lowrank < 1:
            raise ValueError(f"AthenaRecipe.lowrank must be a fraction in [0, 1), got {self.lowrank!r}")
        if not isinstance(self.row_scale, bool):
            raise ValueError(f"AthenaRecipe.row_scale must be a bool, got {self.row_scale!r}")
        if self.kmeans_iters < 1:
            raise ValueError(f"AthenaRecipe.kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not self.damp >= 0:
            raise ValueError(f"AthenaRecipe.damp must be a number >= 0, got {self.damp!r}")
        if self.block_size < 1:
            raise ValueError(f"AthenaRecipe.block_size must be >= 1, got {self.block_size}")

    @property
    def index_bits(self) -> int:
        return self.n.bit_length() - 1  # log2(n)

    def rank(self, N: int, M: int) -> int:
        """Low-rank residual rank for an [N, M] matrix: round(lowrank * min(N, M)), >= 1 when lowrank > 0."""
        if self.lowrank == 0:
            return 0
        return min(min(N, M), max(1, _round_half_up(self.lowrank * min(N, M))))

    def stored_bytes(self, N: int, M: int) -> int:
        """Bytes of the tensors FORMAT.md stores for an [N, M] layer (bias excluded)."""
        G = -(-M // self.d)
        Nb = -(-N // self.k)
        index_bytes = N * ((G * self.index_bits + 7) // 8)
        codebook_bytes = Nb * G * self.n * self.d * self.codebook_bits // 8
        scale_bytes = 2 * (Nb * G * self.d * 2) if self.codebook_bits == 8 else 0  # scale + min, fp16
        lowrank_bytes = self.rank(N, M) * (N + M) * 2
        row_scale_bytes = 2 * N if self.row_scale else 0
        return index_bytes + codebook_bytes + scale_bytes + lowrank_bytes + row_scale_bytes

    def bits_estimate(self, N: int, M: int) -> float:
        """Bits per weight of an [N, M] layer, from the stored byte count.

        Asymptotically ``log2(n)/d + codebook_bits * n / k`` (+ 32 / k for the uint8 scales/mins
        per dimension) + ``16 r (N + M) / (N M)`` for the low-rank factors (+ ``16 / M`` for row scales).
        """
        if N < 1 or M < 1:
            raise ValueError(f"bits_estimate needs a positive shape, got [{N}, {M}]")
        return 8.0 * self.stored_bytes(N, M) / (N * M)


@dataclass(frozen=True)
class ScalarRecipe:
    """Scalar baselines: asymmetric uniform grid per group of ``group_size`` input columns."""

    method: str = "gptq"  # "rtn" | "gptq"
    bits: int = 4
    group_size: int = 128
    damp: float = 0.01  # GPTQ only: H += damp * mean(diag H) * I
    block_size: int = 128  # GPTQ only: lazy-batch width in columns

    def __post_init__(self) -> None:
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"ScalarRecipe.method must be 'rtn' or 'gptq', got {self.method!r}")
        for name in ("bits", "group_size", "block_size"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"ScalarRecipe.{name} must be an integer, got {getattr(self, name)!r}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"ScalarRecipe.bits must be in 1..8, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"ScalarRecipe.group_size must be >= 1, got {self.group_size}")
        if self.block_size < 1:
            raise ValueError(f"ScalarRecipe.block_size must be >= 1, got {self.block_size}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not self.damp >= 0:
            raise ValueError(f"ScalarRecipe.damp must be a number >= 0, got {self.damp!r}")

    def stored_bytes(self, N: int, M: int) -> int:
        groups = -(-M // self.group_size)
        return N * ((M * self.bits + 7) // 8) + 2 * N * groups * 2

    def bits_estimate(self, N: int, M: int) -> float:
        if N < 1 or M < 1:
            raise ValueError(f"bits_estimate needs a positive shape, got [{N}, {M}]")
        return 8.0 * self.stored_bytes(N, M) / (N * M)
