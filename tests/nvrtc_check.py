"""Register and spill checks of the CUDA kernels compiled by NVRTC itself (the runtime's compiler), on the CPU:
NVRTC needs no GPU, only the nvidia-cuda-nvrtc and nvidia-cuda-runtime wheels (`.[kernels-check]`)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from athena_runtime.kernels import nvrtc


def toolchain_or_none() -> nvrtc.Toolchain | None:
    try:
        return nvrtc.toolchain()
    except nvrtc.KernelUnavailable:
        return None


def ptxas_usage(file: str, names: list[str], arch: str, workdir: Path) -> tuple[list[int], list[tuple[str, str]], str]:
    """Compile each template instance `names` of cuda/`file` for `arch` with ptxas' report (cache: `workdir`);
    returns (registers per kernel, (spill stores, spill loads) per kernel, the reports)."""
    tc = dataclasses.replace(nvrtc.toolchain(), cache_dir=workdir)
    report = "\n".join(tc.compile(file, name, arch, options=("--ptxas-options=-v",))[2] for name in names)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return regs, spills, report
