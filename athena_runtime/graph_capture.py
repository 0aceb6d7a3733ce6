"""Capturing one CUDA graph (the decode graphs of `model_runner.py`, the prefill graphs of `prefill_graphs.py`):
warm-up runs on a side stream, then the capture into the memory pool all of a runner's graphs share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class CapturedGraph:
    graph: "torch.cuda.CUDAGraph"
    logits: torch.Tensor  # float32, written by each replay


def capture_graph(forward: Callable[[], torch.Tensor], device, pool) -> CapturedGraph:
    """Capture `forward()` (which must read and write only static buffers) as a graph in `pool`."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm up (Triton compilation, allocator, cuBLAS handles) off the capture
        for _ in range(2):
            forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        logits = forward()
    return CapturedGraph(graph, logits)
