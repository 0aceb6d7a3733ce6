"""One registry of the PQ matmul backends: each says whether it can run a layer, and binds one for a token class.

    lut             CUDA lookup table (lut.py), 1 token (up to 8 where no tensor-core kernel serves the layer)
    frag            CUDA tensor cores fed by codebook lookups (frag.py), 2-64 tokens, d = 2, b = 6
    dequant         CUDA dequantize (+ low-rank fold) of Ŵᵀ, then one cuBLAS GEMM (dequant.py, dequant_matmul.py)
    triton-gemv     Triton lookup table (triton_lut.py), <= 4 tokens: the portable path where lut cannot run
    triton-dequant  Triton dequantize, then cuBLAS: the portable path for more tokens
    reference       dequantize + matmul in PyTorch (pq_reference.py): the spec; CPU
`Registry.resolve` walks RULES in order and takes the first backend whose token limit covers the class and whose
`can_run(geo, tokens, dtype)` says yes; the CUDA kernels' toolchain (NVRTC, nvrtc.py) is probed once per device.
PQLinear binds one callable per token class at load and never decides again; a CUDA layer that does not get the
first choice of its class logs a WARNING naming the path taken and why.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from athena_runtime.kernels import dequant, frag, lut, nvrtc
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.splitk import triton
from athena_runtime.kernels.tuning import Tuning

log = logging.getLogger(__name__)

NAMES = ("lut", "frag", "dequant", "triton-gemv", "triton-dequant", "reference")
Matmul = Callable[[torch.Tensor, "tuple[int, int] | None"], torch.Tensor]  # (x [T, M], glu) -> y


def rules(t: Tuning) -> tuple[tuple[str, float], ...]:
    """(backend, most tokens) in priority order (thresholds: tuning.py)."""
    return (
        ("lut", t.lut_max_tokens),
        ("frag", t.frag_max_tokens),
        ("lut", t.lut_no_frag_max_tokens),
        ("triton-gemv", t.triton_lut_max_tokens),
        ("lut", t.lut_fallback_max_tokens),
        ("dequant", math.inf),
        ("triton-dequant", math.inf),
        ("reference", math.inf),
    )


def token_classes(t: Tuning) -> tuple[int, ...]:
    """Upper token counts of the classes in which no rule changes (the last one open-ended)."""
    return tuple(sorted({int(n) for _, n in rules(t) if n != math.inf})) + (math.inf,)


def _probe_cuda(device: torch.device) -> str | None:
    """Why the CUDA kernels cannot run on `device` (None: they can), found once per device."""
    if device.type != "cuda":
        return "not a CUDA device"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 0):
        return f"compute capability {cc[0]}.{cc[1]} (the kernels need sm_80-class mma.sync, cp.async)"
    try:
        tc = nvrtc.toolchain()
        tc.target(10 * cc[0] + cc[1])
    except nvrtc.KernelUnavailable as e:
        return str(e)
    log.info("CUDA PQ kernels compiled at run time by %s; cubins cached in %s", tc.describe(), tc.cache_dir)
    return None


class Registry:
    """The backends of one device: `can_run` per backend, `resolve` per token count, `bind` per layer."""

    def __init__(self, device: torch.device, tuning: Tuning):
        self.device, self.tuning = device, tuning
        self.cuda_reason = _probe_cuda(device)
        # (the Triton interpreter runs them on CPU tensors only where a test forces a path)
        self.triton_reason = (
            None
            if triton is not None and device.type == "cuda"
            else ("Triton is not installed" if triton is None else "not a CUDA device")
        )

    def can_run(self, name: str, geo: PQGeometry, tokens: int, dtype: torch.dtype) -> tuple[bool, str]:
        if name == "reference":
            return True, ""
        if name.startswith("triton"):
            why = self.triton_reason
            if why is None and name == "triton-gemv" and geo.n > self.tuning.lut_max_centroids:
                why = f"n={geo.n} centroids (tables for <= {self.tuning.lut_max_centroids})"
        elif self.cuda_reason is not None:
            why = self.cuda_reason
        elif name == "lut":
            why = lut.supports(geo, tokens, dtype) if geo.n <= self.tuning.lut_max_centroids else f"n={geo.n}"
        elif name == "frag":
            why = frag.supports(geo, tokens, dtype)
        else:
            why = dequant.supports(geo, dtype)
        return why is None, why or ""

    def resolve(
        self, geo: PQGeometry, tokens: int, dtype: torch.dtype, exclude: set[str] = frozenset()
    ) -> tuple[str, list[tuple[str, str]]]:
        """(backend for `tokens`, [(backend passed over, why)]); `exclude`: backends that failed to bind."""
        skipped = []
        for name, most in rules(self.tuning):
            if tokens > most or name in exclude or any(name == s for s, _ in skipped):
                continue
            ok, why = self.can_run(name, geo, tokens, dtype)
            if ok:
                return name, skipped
            skipped.append((name, why))
        raise AssertionError("the reference always runs")

    def bind(self, name: str, layer) -> Matmul:
        """The callable of backend `name` for `layer` (a PQLinear), its CUDA kernels compiled (in parallel) now;
        raises nvrtc.KernelUnavailable when they do not compile or load."""
        fn = getattr(self, "_bind_" + name.replace("-", "_"))(layer)
        if name == "reference":  # the spec computes in fp32 whatever x's dtype
            return fn
        dtype = layer.codebook.dtype  # the kernels take x in the codebooks' dtype
        return lambda x, glu: fn(x if x.dtype == dtype else x.to(dtype), glu)

    # ---- one binder per backend: (x [T, M] in the codebook's dtype, glu) -> y [T, N] (or [T, F] with glu)
    def _bind_lut(self, layer) -> Matmul:
        args = layer.kernel_args()
        plans: dict = {}

        def plan_for(t_inst: int, glu):
            p = plans.get((t_inst, glu))
            if p is None:
                p = plans[(t_inst, glu)] = lut.LutPlan(*args, t_inst, tuning=self.tuning, glu=glu)
            return p

        plan_for(1, None)  # compiles the one-token kernel now
        t_insts = lut.TOKENS
        return lambda x, glu: plan_for(next(t for t in t_insts if t >= x.shape[0]), glu)(x)

    def _bind_frag(self, layer) -> Matmul:
        args, geo, st = layer.kernel_args(), layer.geo, self.tuning.frag_stages
        _compile(
            [
                (frag._kernel, (t, frag.choose_nr(geo, t, st, self.tuning), geo.bits, st, self.device.index))
                for t in frag.T_PADS
            ]
        )
        return lambda x, glu: frag.frag_matmul(x, *args, glu=glu, tuning=self.tuning, checked=True)

    def _bind_dequant(self, layer) -> Matmul:
        rank = 0 if layer.lowrank_a is None else layer.lowrank_a.shape[1]
        _compile(
            [(dequant._kernel, (f, n, self.device.index, smem)) for f, n, smem in dequant.kernel_names(layer.geo, rank)]
        )
        from athena_runtime.kernels.dequant_matmul import dequant_matmul

        args = layer.kernel_args()
        return _unfused_glu(lambda x: dequant_matmul(x, *args, dequant="cuda"))

    def _bind_triton_gemv(self, layer) -> Matmul:
        from athena_runtime.kernels.triton_lut import triton_lut_matmul

        args = layer.kernel_args()
        return lambda x, glu: triton_lut_matmul(x, *args, glu=glu)

    def _bind_triton_dequant(self, layer) -> Matmul:
        from athena_runtime.kernels.dequant_matmul import dequant_matmul

        args = layer.kernel_args()
        return _unfused_glu(lambda x: dequant_matmul(x, *args, dequant="triton"))

    def _bind_reference(self, layer) -> Matmul:
        return _unfused_glu(layer.reference_matmul)


def _unfused_glu(fn: Callable[[torch.Tensor], torch.Tensor]) -> Matmul:
    """A backend without a fused gate/up epilogue: silu(gate) · up by `fused_ops.silu_mul` after it."""

    def call(x, glu):
        y = fn(x)
        if glu is None:
            return y
        from athena_runtime.kernels.fused_ops import silu_mul

        return silu_mul(y[:, : glu[1]], y[:, glu[0] : glu[0] + glu[1]])

    return call


def _compile(jobs: list[tuple[Callable, tuple]]):
    """Compile (or read from the cache) several kernels side by side: NVRTC releases the GIL while it works."""
    if len(jobs) <= 1:
        for fn, a in jobs:
            fn(*a)
        return
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for f in [pool.submit(fn, *a) for fn, a in jobs]:
            f.result()


@functools.lru_cache(maxsize=16)
def registry(device: torch.device) -> Registry:
    """The registry of `device` (probed once per process)."""
    return Registry(device, Tuning.for_device(device))
