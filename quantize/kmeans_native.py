"""The compiled k-means steps (`kmeans_native.c`) for CPU tensors, built once with the system C compiler.

`kmeans.py` calls `seed` / `lloyd` / `nearest` here for float32 CPU problems and falls back to its PyTorch loop
when the library cannot be built (no compiler, build error), saying so once in the log. The library is
compiled `-O3 -march=native` (no OpenMP: the quantizer runs one thread) into
`<cache>/kernels/kmeans-<hash>.so`, the hash covering the source, the flags, the compiler and this CPU's
feature flags; building takes well under a second. Callers pass ``native=False`` for the PyTorch loop
(A/B runs, tests).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch
from torch import Tensor

from athena_runtime.format.native_build import build_shared_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kmeans_native.c")
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")
ABI = 2


class NativeKMeans:
    """The compiled library, built on first use; `load()` returns it or raises RuntimeError saying why
    (the failure is remembered and logged once)."""

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def load(self) -> ctypes.CDLL:
        with self._lock:
            if self._lib is not None:
                return self._lib
            if self._error is None:
                try:
                    self._lib = self._build_and_load()
                    return self._lib
                except Exception as e:  # noqa: BLE001 - any failure means the PyTorch loop, said once
                    self._error = f"compiled k-means unavailable ({type(e).__name__}: {e}); using the PyTorch loop"
                    log.warning("%s", self._error)
            raise RuntimeError(self._error)

    def _build_and_load(self) -> ctypes.CDLL:
        out = build_shared_library("kmeans", (SOURCE,), (), CFLAGS, what="the compiled k-means", timeout=120)
        lib = ctypes.CDLL(str(out))
        if lib.athena_kmeans_abi() != ABI:
            raise RuntimeError(f"{out}: ABI {lib.athena_kmeans_abi()}, expected {ABI}")
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.athena_kmeans_lloyd.argtypes = [p, p, p, i64, i64, i64, i64, i64]
        lib.athena_kmeans_lloyd.restype = ctypes.c_int
        lib.athena_kmeans_assign.argtypes = [p, p, i64, i64, i64, i64, p, p]
        lib.athena_kmeans_assign.restype = ctypes.c_int
        lib.athena_kmeans_seed.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, p]
        lib.athena_kmeans_seed.restype = ctypes.c_int
        log.info("compiled k-means loaded from %s", out)
        return lib

    def usable_for(self, z: Tensor) -> bool:
        """True when `z` is a float32 CPU tensor and the library loads (else the caller's PyTorch loop runs)."""
        if z.device.type != "cpu" or z.dtype != torch.float32:
            return False
        try:
            self.load()
            return True
        except RuntimeError:
            return False

    def lloyd(self, z: Tensor, weight: Tensor, C: Tensor, iters: int) -> Tensor:
        """``iters`` Lloyd steps: z [B, d, K], weight [B, K], C [B, d, n] (initial centroids) -> new C."""
        B, d, K = z.shape
        n = C.shape[2]
        z, w = z.contiguous(), weight.to(torch.float32).contiguous()
        out = C.to(torch.float32, copy=True).contiguous()
        if self.load().athena_kmeans_lloyd(z.data_ptr(), w.data_ptr(), out.data_ptr(), B, d, K, n, iters) != 0:
            raise MemoryError("compiled k-means: out of memory")
        return out

    def seed(self, z: Tensor, weight: Tensor, race: Tensor, sizes: list[int]) -> Tensor:
        """k-means++ rounds: z [B, d, K], weight [B, K], race keys [rounds, B, K], centres per round -> idx [B, n]."""
        B, d, K = z.shape
        n = sum(sizes)
        z, w, race = z.contiguous(), weight.to(torch.float32).contiguous(), race.to(torch.float32).contiguous()
        sz = torch.tensor(sizes, dtype=torch.int64)
        idx = torch.empty(B, n, dtype=torch.int64)
        lib = self.load()
        if lib.athena_kmeans_seed(
            z.data_ptr(), w.data_ptr(), race.data_ptr(), sz.data_ptr(), len(sizes), B, d, K, n, idx.data_ptr()
        ):
            raise MemoryError("compiled k-means: out of memory")
        return idx

    def nearest(self, z: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, d, K], C [B, d, n] -> (idx int64 [B, K], min over c of ‖c‖² - 2 z·c [B, K])."""
        B, d, K = z.shape
        n = C.shape[2]
        z, C = z.contiguous(), C.to(torch.float32).contiguous()
        idx = torch.empty(B, K, dtype=torch.int64)
        smin = torch.empty(B, K, dtype=torch.float32)
        if self.load().athena_kmeans_assign(z.data_ptr(), C.data_ptr(), B, d, K, n, idx.data_ptr(), smin.data_ptr()):
            raise MemoryError("compiled k-means: out of memory")
        return idx, smin
