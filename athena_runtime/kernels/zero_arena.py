"""Zeroed fp32 scratch for kernels that accumulate with atomics, handed out in slices during one forward pass.

The CUDA lookup-table kernel sums its share of u = x Bᵀ into a zeroed [T, r] buffer with atomics; a
`torch.zeros` per layer call is one fill kernel per call (128 per 7B decode step, ~1 µs each plus
the gap after it). Inside `ARENA.forward(device)` the whole pass's buffers are slices of one
buffer that is zeroed by ONE fill at the start of the pass:

    with ARENA.forward(device):          # CausalLM.forward
        ...
        u = ARENA.zeros((1, T, r), device)   # a slice, already zero

The arena learns how much one pass needs (the high-water mark of earlier passes) and zeroes only
that prefix; a request that does not fit, or one made outside a pass, gets a fresh `torch.zeros`
(still correct, only slower). The buffer is allocated once and never moved, so CUDA graphs captured
over a pass (their fill included) keep pointing at live memory. One buffer per device: passes on one
device must not run concurrently from several threads (the engine runs its model on one thread).
"""
from __future__ import annotations

import logging
import math
import threading
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

ALIGN = 64  # elements: every slice starts on a 256-byte boundary


class ZeroArena:
    def __init__(self, capacity: int = 1 << 20, device_types: tuple[str, ...] = ("cuda",)):
        self.capacity = capacity  # fp32 elements per device (4 MB)
        self.device_types = device_types  # where passes use the arena (tests add "cpu")
        self._bufs: dict[torch.device, torch.Tensor] = {}
        self._need: dict[torch.device, int] = {}
        self._local = threading.local()  # the open pass (device, offset) of this thread
        self._overflow_logged = False

    @contextmanager
    def forward(self, device: torch.device):
        """One forward pass on `device`: zeroes the learned prefix once, then hands out slices of it."""
        device = torch.device(device)
        if device.type not in self.device_types or getattr(self._local, "device", None) is not None:
            yield  # CPU (no atomics kernel) or a nested pass: plain torch.zeros
            return
        buf = self._bufs.get(device)
        if buf is None:  # a normal tensor even when the first pass runs in inference mode (calibration)
            with torch.inference_mode(False):
                buf = self._bufs[device] = torch.empty(self.capacity, device=device, dtype=torch.float32)
        need = self._need.get(device, 0)
        if need:
            buf[:need].zero_()
        self._local.device, self._local.offset, self._local.zeroed = device, 0, need
        try:
            yield
        finally:
            self._need[device] = min(self.capacity, max(need, self._local.offset))
            self._local.device = None

    def zeros(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A zeroed fp32 tensor of `shape`: a slice of the open pass's buffer when it fits."""
        n = math.prod(shape)
        if getattr(self._local, "device", None) == torch.device(device):
            start = self._local.offset
            end = start + -(-n // ALIGN) * ALIGN
            self._local.offset = end
            if end <= self._local.zeroed:
                return self._bufs[self._local.device][start:start + n].view(shape)
            if end > self.capacity and not self._overflow_logged:
                self._overflow_logged = True
                log.warning("zero arena: a forward pass needs more than %d floats; the rest uses torch.zeros",
                            self.capacity)
        return torch.zeros(shape, device=device, dtype=torch.float32)


ARENA = ZeroArena()
