"""The runtime's tuned defaults that depend on the device type, one frozen object per type. (The PQ kernels'
launch thresholds are `kernels/tuning.py`'s `Tuning`, one per device.)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceDefaults:
    # prompt tokens per step while other requests decode, when EngineSettings.prefill_chunk_tokens is not set
    prefill_chunk_tokens: int
    # KV cache bytes when neither num_blocks nor kv_budget_bytes is given (None: the free device memory, less the
    # reserve)
    kv_budget_bytes: int | None
    kv_reserve_bytes: int  # left free for activations and CUDA graph pools when the cache takes the free memory


DEVICE_DEFAULTS: dict[str, DeviceDefaults] = {
    # CPU: on the embedded model's fp16 reference (2 cores) a 128-token chunk cost about three decode steps, no more
    # than a 64-token one (both overhead-bound); 256 cost 5.5.
    "cpu": DeviceDefaults(prefill_chunk_tokens=128, kv_budget_bytes=1 << 30, kv_reserve_bytes=0),
    # CUDA: a step with prompt tokens is bound by the host (~60-100 ms on a 7B H100 whether it feeds 512 or 2048), so
    # fewer, larger chunks admit a burst sooner: 64 streams of 128-token prompts behind the server, 7B H100 (03b5bf5,
    # BENCHMARKS.md §7): 2048 gave 1446 output tok/s (TTFT p50 2.4 s) against 825 (4.8 s) with 512, ITL p50 alike.
    "cuda": DeviceDefaults(prefill_chunk_tokens=2048, kv_budget_bytes=None, kv_reserve_bytes=2 << 30),
}


def device_defaults(device_type: str) -> DeviceDefaults:
    """The defaults of a device type ('cuda', 'cpu'; any other type takes the CPU's)."""
    return DEVICE_DEFAULTS.get(device_type, DEVICE_DEFAULTS["cpu"])
