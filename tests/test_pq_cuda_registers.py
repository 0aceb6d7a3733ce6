"""nvcc register and spill check of the CUDA lookup-table kernel's one-token variants (where nvcc is
installed): on sm_90 the fp16-table variants of <= 8-word slabs (4 words: the runtime's launch) are compiled for
4 CTAs per SM (`pq_cuda.T1_MIN_BLOCKS_SM90`), which must fit 64 registers without spilling; on sm_89 they stay
unbounded and must not spill either."""
from __future__ import annotations

import pytest

from athena_runtime.kernels import pq_cuda
from nvcc_check import nvcc_path, ptxas_usage

T1 = [(t, b, s, f) for t, b, s, f in pq_cuda.VARIANTS if t == 1 and s <= 8 and f]


@pytest.mark.skipif(nvcc_path() is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
def test_one_token_variants_fit_their_bound_without_spills(tmp_path, arch):
    inst = "\n".join(f"template __global__ void athena_pq::pq_lut_gemv_kernel<{t}, {b}, {s}, true, {pq_cuda.THREADS}>("
                     "const __half*, int, int, int, const int*, int, const __half*, int, int, int, int, int, int, int, "
                     "int, __half*, const __half*, int, int, int, float*, athena_pq::EpiArgs);" for t, b, s, _ in T1)
    regs, spills, report = ptxas_usage(pq_cuda.kernel_source() + "\n" + inst + "\n", arch, tmp_path)
    assert T1 and len(regs) == len(T1), report[-2000:]
    assert all(s == ("0", "0") for s in spills), report[-3000:]
    if arch == "sm_90":
        assert max(regs) <= 65536 // (pq_cuda.THREADS * pq_cuda.T1_MIN_BLOCKS_SM90)
