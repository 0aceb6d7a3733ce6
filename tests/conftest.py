"""Shared test set-up: kernels run under the Triton interpreter when there is no GPU; tests use a
private cache folder; tiny models are built once per session."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# CPU model runners take the reference path (the spec, compared with transformers at 1e-4) unless a
# test asks for the fast one (tests/test_cpu_path.py compares the two with stated tolerances).
os.environ.setdefault("ATHENA_CPU_PATH", "reference")

sys.path.insert(0, str(Path(__file__).parent))
# Under pytest-xdist each worker gets one thread: the tests run many tiny ops, which stall when two
# workers' thread pools fight over two cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def pytest_ignore_collect(collection_path, config):
    """Under `-m gpu` (bench/gpu_suite.sh tests) a test module with no gpu mark is not even imported: the lent GPU
    machine lacks parts of the server stack that other modules import."""
    if (
        config.getoption("markexpr", "") == "gpu"
        and collection_path.name.startswith("test_")
        and collection_path.suffix == ".py"
    ):
        return True if "mark.gpu" not in collection_path.read_text() else None
    return None
