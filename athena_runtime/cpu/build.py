"""Build-once loader of the CPU kernels (`linear.c`: linear layers, `ops.c`: norms, RoPE, SiLU,
KV writes and decode attention), called through ctypes.

The sources are compiled with the system C compiler (`$CC`, else cc/gcc/clang) as
`-O3 -march=native -fopenmp -shared` into one `<cache>/kernels/cpu_linear-<hash>.so`, the hash covering
the sources, the flags, the compiler and this CPU's feature flags (a cache shared between machines
never hands one CPU another's build). `-fopenmp` links `libgomp.so.1`, which PyTorch's CPU wheel has
already loaded, so the kernels share PyTorch's OpenMP runtime and thread count. Takes ~1 s once.

`load()` returns the library or raises RuntimeError saying why (no compiler, build error, ABI
mismatch); the failure is remembered, so the caller decides its fallback once and logs it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

from athena_runtime.format.native_build import build_shared_library

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(n) for n in ("linear.c", "ops.c", "layer.c"))
HEADERS = (Path(__file__).with_name("half.h"),)  # included by both sources
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
ABI = 4  # linear.c's athena_cpu_linear_abi()
OPS_ABI = 1  # ops.c's athena_cpu_ops_abi()
LAYER_ABI = 2  # layer.c's athena_cpu_layer_abi() (and its structs: LinearDesc, LayerDesc in layer_desc.py)


class CPUKernels:
    """The compiled kernels, built on first `load()`; `march` other than "native" (e.g. "x86-64": no AVX2, F16C
    or FMA) builds the portable scalar loops, which tests compare with the native build."""

    def __init__(self, march: str = "native"):
        self.cflags = tuple(f"-march={march}" if f == "-march=native" else f for f in CFLAGS)
        self._lib = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def load(self) -> ctypes.CDLL:
        with self._lock:
            if self._lib is not None:
                return self._lib
            if self._error is not None:
                raise RuntimeError(self._error)
            try:
                self._lib = self._build_and_load()
            except Exception as e:  # noqa: BLE001 - any failure disables the kernels, loudly, once
                self._error = f"CPU linear kernels unavailable: {type(e).__name__}: {e}"
                raise RuntimeError(self._error) from e
            return self._lib

    def _build_and_load(self) -> ctypes.CDLL:
        import torch  # noqa: F401 - loads PyTorch's libgomp before ours resolves against it

        out = build_shared_library(
            "cpu_linear", SOURCES, HEADERS, self.cflags, what="the CPU linear kernels", timeout=300
        )
        lib = ctypes.CDLL(str(out))
        got = (lib.athena_cpu_linear_abi(), lib.athena_cpu_ops_abi(), lib.athena_cpu_layer_abi())
        if got != (ABI, OPS_ABI, LAYER_ABI):
            raise RuntimeError(f"{out}: ABI {got}, expected {(ABI, OPS_ABI, LAYER_ABI)}")
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for fn in (lib.i8_linear, lib.f16_linear, lib.q8g_linear):
            fn.argtypes = [p, i64, i64, p, p, p, p, i64, ctypes.c_int]
            fn.restype = None
        lib.q8g_linear.restype = ctypes.c_int
        lib.pq8_linear.argtypes = [p, i64, i64, i64, p, i64, p, p, p, i64, p, p, i64, p, p, p, p, i64, ctypes.c_int]
        lib.pq8_linear.restype = ctypes.c_int
        f32 = ctypes.c_float
        for fn, args in (
            (lib.rmsnorm_add, [p, p, p, f32, p, p, i64, i64]),
            (lib.rope_, [p, i64, i64, i64, i64, p, p]),
            (lib.silu_mul, [p, i64, i64, i64, i64, p]),
            (lib.kv_write, [p, p, i64, i64, p, p, p, i64, ctypes.c_int]),
        ):
            fn.argtypes, fn.restype = args, None
        lib.attn_decode.argtypes = [
            p,
            i64,
            i64,
            i64,
            i64,
            i64,
            p,
            p,
            ctypes.c_int,
            p,
            i64,
            p,
            i64,
            f32,
            i64,
            p,
            ctypes.c_int,
        ]
        lib.attn_decode.restype = ctypes.c_int
        lib.linear_run.argtypes = [p, p, i64, p, ctypes.c_int]
        lib.linear_run.restype = ctypes.c_int
        lib.layer_decode.argtypes = [p, p, p, p, p, i64, p, p, p, p, i64, p, p, ctypes.c_int]
        lib.layer_decode.restype = ctypes.c_int
        lib.stack_decode.argtypes = [p, i64, p, p, i64, p, p, p, p, i64, p, p, ctypes.c_int]
        lib.stack_decode.restype = ctypes.c_int
        log.info("CPU linear kernels loaded from %s", out)
        return lib

    def available(self) -> tuple[bool, str]:
        """(True, "") when the kernels load here, else (False, why); never raises."""
        try:
            self.load()
            return True, ""
        except RuntimeError as e:
            return False, str(e)
