"""Which execution path a CPU model runner takes, and its thread count: decided once, logged.

    reference   the spec: PQ layers dequantized to float32 (pq_linear.py), per-sequence paged attention
    fast        compact weights through the compiled kernels (linear.py: PQ layers as exact uint8, fp16, or
                int8 per output channel), q/k/v and gate/up fused, lm_head included; batched decode attention
                (attention.py)
    auto        fast when its kernels build here (a C compiler is needed once), else reference with a
                WARNING saying why

Settings come from the environment (the server and CLIs need no new flags):
    ATHENA_CPU_PATH     auto | fast | reference        (default auto)
    ATHENA_CPU_WEIGHTS  auto | fp16 | int8             (default auto; the fast path's weight format, linear.py)

auto keeps PQ layers in their exact uint8 form (1 byte a weight, same values as the reference) and the
lm_head as int8 per 32 columns; fp16 stores every effective weight as float16 (2 bytes, exact for practical
purposes); int8 per output row moved SmolLM2-135M's logits by up to 3.6% of the largest (its massive
activations amplify per-row rounding): choose it knowingly.
    ATHENA_CPU_THREADS  N                              (default: PyTorch's, the cores it may use)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from athena_runtime.format.environment import Environment

log = logging.getLogger(__name__)

CPU_PATHS = ("auto", "fast", "reference")


@dataclass(frozen=True)
class CPUPathSettings:
    path: str = "auto"  # auto | fast | reference
    weights: str = "auto"  # auto | fp16 | int8: the fast path's weight format (linear.py)
    threads: int | None = None  # torch.set_num_threads; None keeps PyTorch's default

    def __post_init__(self):
        from athena_runtime.cpu.linear import WEIGHT_FORMATS

        if self.path not in CPU_PATHS:
            raise ValueError(f"unknown CPU path {self.path!r}; choose one of {CPU_PATHS}")
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"unknown CPU weight format {self.weights!r}; choose one of {WEIGHT_FORMATS}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"CPU threads must be >= 1, got {self.threads}")

    @classmethod
    def from_env(cls, env=None) -> "CPUPathSettings":
        """From the ATHENA_CPU_* variables of `env` (default: the process environment; format/environment.py)."""
        e = Environment.read(env)
        return cls(path=e.cpu_path, weights=e.cpu_weights, threads=e.cpu_threads)


def set_threads(settings: CPUPathSettings) -> int:
    """Apply the thread count (if set) and log the one in effect."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
        why = "ATHENA_CPU_THREADS"
    else:
        why = "PyTorch default: the cores this process may use" + (
            ", OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else ""
        )
    n = torch.get_num_threads()
    log.info("CPU threads: %d (%s; %d CPUs visible)", n, why, len(os.sched_getaffinity(0)))
    return n


def choose_path(settings: CPUPathSettings) -> tuple[str, str]:
    """("fast" | "reference", why)."""
    if settings.path == "reference":
        return "reference", "ATHENA_CPU_PATH=reference"
    from athena_runtime.cpu.linear import KERNELS

    ok, why = KERNELS.available()
    if ok:
        return "fast", "ATHENA_CPU_PATH=" + settings.path
    if settings.path == "fast":
        raise RuntimeError(f"ATHENA_CPU_PATH=fast, but {why}")
    log.warning("CPU fast path unavailable, running the float32 reference path (slow): %s", why)
    return "reference", why


def apply(model: torch.nn.Module, settings: CPUPathSettings) -> str:
    """Set threads, pick the path and, for "fast", rewrite `model` in place. Returns the path taken."""
    set_threads(settings)
    path, why = choose_path(settings)
    if path == "reference":
        log.info("CPU path: reference (%s): float32 dequantized weights, per-sequence attention", why)
        return path
    from athena_runtime.cpu.attention import CPUPagedAttention
    from athena_runtime.cpu.linear import KERNELS, convert_model
    from athena_runtime.cpu.specialize import specialize

    t0 = time.perf_counter()
    stats = convert_model(model, settings.weights)
    ops = KERNELS.load()
    attention = CPUPagedAttention(ops)
    for layer in model.model.layers:
        layer.self_attn.paged_attention = attention
    switched = specialize(model, ops)
    log.info(
        "CPU path: compiled decoder ops for %s (norms, RoPE, SiLU, K/V writes and decode attention; "
        "each module falls back to PyTorch where its kernel does not apply, e.g. a quantized KV cache)",
        ", ".join(f"{n} {name}" for name, n in switched.items()) or "no module",
    )
    log.info(
        "CPU path: fast (%s): %d linear layers through the compiled kernels (ATHENA_CPU_WEIGHTS=%s: %s), "
        "%.0f MB of weights per token (float32 reference: %.0f MB), batched decode attention; "
        "converted in %.1f s",
        why,
        stats["layers"],
        settings.weights,
        ", ".join(f"{n} {f}" for f, n in stats["formats"].items()),
        stats["weight_bytes"] / 1e6,
        stats["reference_bytes"] / 1e6,
        time.perf_counter() - t0,
    )
    return path
