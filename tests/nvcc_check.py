"""nvcc -Xptxas -v on kernel text: the register and spill checks of the CPU tests (where nvcc is installed)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


def nvcc_path() -> str | None:
    for cand in (os.environ.get("CUDA_HOME", "") + "/bin/nvcc", "/usr/local/cuda/bin/nvcc", shutil.which("nvcc") or ""):
        if cand and os.path.isfile(cand):
            return cand
    return None


def ptxas_usage(source: str, arch: str, workdir: Path) -> tuple[list[int], list[tuple[str, str]], str]:
    """Compile `source` for `arch` (-O3, C++17); returns (registers per kernel, (spill stores, spill loads) per
    kernel, ptxas' report). Fails the calling test when nvcc does."""
    src = workdir / "kernels.cu"
    src.write_text(source)
    res = subprocess.run([nvcc_path(), f"-arch={arch}", "-std=c++17", "-O3", "-Xptxas", "-v", "-c", str(src), "-o",
                          str(workdir / "k.o")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", res.stderr)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return regs, spills, res.stderr
