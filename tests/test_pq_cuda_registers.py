"""NVRTC register and spill check of the lookup-table kernel's one-token instances (where the NVRTC wheel is
installed; no GPU needed): on sm_90 the <= 8-word slabs (4 words: the runtime's launch) are compiled for 4 CTAs per
SM (`ATHENA_T1_MIN_BLOCKS` in lut.cu), which must fit 64 registers without spilling; on sm_89 they stay
unbounded and must not spill either; the few-token instances must not spill on either."""

from __future__ import annotations

import pytest
from nvrtc_check import ptxas_usage, toolchain_or_none

from athena_runtime.kernels import lut

T1 = [lut.kernel_name(1, 6, s) for s in lut.slab_widths(1, 6) if s <= 8]


@pytest.mark.skipif(toolchain_or_none() is None, reason="needs the nvidia-cuda-nvrtc and -runtime wheels")
@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
def test_one_token_instances_fit_their_bound_without_spills(tmp_path, arch):
    regs, spills, report = ptxas_usage("lut.cu", T1, arch, tmp_path)
    assert T1 and len(regs) == len(T1), report[-2000:]
    assert all(s == ("0", "0") for s in spills), report[-3000:]
    if arch == "sm_90":
        assert max(regs) <= 65536 // (lut.THREADS * 4)


@pytest.mark.skipif(toolchain_or_none() is None, reason="needs the nvidia-cuda-nvrtc and -runtime wheels")
def test_few_token_instances_do_not_spill(tmp_path):
    names = [lut.kernel_name(t, 6, lut.slab_widths(t, 6)[0]) for t in (2, 8)]
    regs, spills, report = ptxas_usage("lut.cu", names, "sm_90", tmp_path)
    assert len(regs) == len(names) and all(s == ("0", "0") for s in spills), report[-3000:]


def test_param_array_takes_ctypes_only():
    """cuLaunchKernel's argument array holds pointers to ctypes objects; a plain int is refused with its position
    (a Python int among the lookup kernel's arguments failed only at launch on the GPU)."""
    import ctypes

    from athena_runtime.kernels import nvrtc

    arr = nvrtc.param_array([ctypes.c_void_p(0), ctypes.c_int(3)])
    assert len(arr) == 2
    with pytest.raises(TypeError, match=r"\(1, 'int'\)"):
        nvrtc.param_array([ctypes.c_int(1), 5])
