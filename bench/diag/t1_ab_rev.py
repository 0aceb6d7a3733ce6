"""One-token calls of this checkout's CUDA lookup-table kernel side by side with another revision's, in one process:
the whole call (fused epilogue, low-rank term) as CUDA-graph replays over rotating weight sets, cuBLAS fp16 beside,
rounds in alternating order; each output checked against the PyTorch reference.

    git show REV:athena_runtime/kernels/pq_cuda.py > DIR/pq_cuda.py
    git show REV:athena_runtime/kernels/pq_cuda_epilogue.py > DIR/pq_cuda_epilogue.py
    python -m bench.diag.t1_ab_rev --old-dir DIR [--mb 4,3] [--tiles 0,128] [--tables 16,32] [--rounds 3]

--mb builds this checkout's kernel once per sm_90 CTAs-per-SM bound of its one-token variants (T1_MIN_BLOCKS_SM90);
every (bound, epilogue tile, table entry width) combination is a column.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys

import torch

from athena_runtime.kernels import pq_cuda
from athena_runtime.kernels.pq_gemv import pq_gemv_reference
from bench.kernels import rel_err, time_graph, weight_sets


def load_old(old_dir: str):
    """The other revision's pq_cuda module (its own epilogue module, its own counters)."""
    name = "athena_runtime.kernels.pq_cuda_epilogue"
    saved = sys.modules[name]
    spec = importlib.util.spec_from_file_location(name + "_rev", f"{old_dir}/pq_cuda_epilogue.py")
    epi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(epi)
    sys.modules[name] = epi
    try:
        spec = importlib.util.spec_from_file_location("athena_runtime.kernels.pq_cuda_rev", f"{old_dir}/pq_cuda.py")
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    finally:
        sys.modules[name] = saved
    return old


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-dir", required=True)
    ap.add_argument("--mb", default=str(pq_cuda.T1_MIN_BLOCKS_SM90), help="sm_90 CTAs-per-SM bounds to build")
    ap.add_argument("--tiles", default="0", help="epilogue tiles (0: the launcher's choice)")
    ap.add_argument("--tables", default="16", help="table entry bits of this checkout's calls: 16 and/or 32")
    ap.add_argument("--slabs", default="0", help="slab widths x rows per chunk of this checkout's calls, e.g. 0,4x2048 "
                    "(0: the launcher's choice)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default="11008x4096,4096x11008,4096x4096,14336x4096")
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sms = pq_cuda.num_sms(dev)
    old = load_old(args.old_dir)
    old.load_extension()
    from bench.diag.lut_parts import variant_extension
    exts = {mb: variant_extension(f"mb{mb}") for mb in map(int, args.mb.split(","))}
    for ext in exts.values():
        ext.load()
    default_ext = pq_cuda.EXTENSION
    tiles = [int(t) for t in args.tiles.split(",")]
    slabs = [tuple(int(v) for v in sl.split("x")) if sl != "0" else (None, None) for sl in args.slabs.split(",")]
    combos = [(mb, t, f, sl) for mb in exts for t in tiles for f in map(int, args.tables.split(",")) for sl in slabs]
    cols = ["old"] + [f"m{mb}t{t}f{f}" + (f"s{sl[0]}r{sl[1]}" if sl[0] else "") for mb, t, f, sl in combos]
    print(f"{'shape':>12s} {'cuBLAS':>7s} " + " ".join(f"{c:>11s}" for c in cols)
          + "  (CUDA-graph µs per call, T = 1, fused epilogue, low-rank; x cuBLAS in brackets)", flush=True)
    for rnd in range(args.rounds):
        for sh in args.shapes.split(","):
            N, M = (int(v) for v in sh.split("x"))
            rank = max(1, round(0.01 * min(N, M)))
            sets = weight_sets(N, M, rank, dev, l2, seed=N + 7 * rnd)
            geo = sets[0]["geo"]
            x = torch.randn(1, M, device=dev).half()
            dense = [torch.randn(N, M, device=dev).half() for _ in range(max(2, min(8, math.ceil(3 * l2 / (N * M * 2)))))]
            cublas = time_graph(lambda W: x @ W.t(), dense, dev)
            fns = {"old": lambda L: old.pq_gemv_cuda(x, L["qweight"], L["codebook"], geo, L["A"], L["B"],
                                                     fused_epilogue=True)}
            for (mb, t, f, sl), col in zip(combos, cols[1:]):
                def fn(L, ext=exts[mb], t=t, f=f, sl=sl):
                    pq_cuda.EXTENSION = ext
                    try:
                        return pq_cuda.pq_gemv_cuda(x, L["qweight"], L["codebook"], geo, L["A"], L["B"],
                                                    fused_epilogue=True, epi_tile=t, fp16_table=f == 16,
                                                    slab_w=sl[0], rows_per_chunk=sl[1])
                    finally:
                        pq_cuda.EXTENSION = default_ext
                fns[col] = fn
            ref = pq_gemv_reference(x, sets[0]["qweight"], sets[0]["codebook"], geo, sets[0]["A"], sets[0]["B"])
            bad = [c for c, f in fns.items() if not rel_err(f(sets[0]), ref) < 4e-3]
            order = cols if rnd % 2 == 0 else cols[::-1]
            res = {c: time_graph(fns[c], sets, dev) for c in order}
            print(f"{sh:>12s} {cublas:7.1f} " + " ".join(f"{res[c]:5.2f}({cublas / res[c]:.2f})" for c in cols)
                  + f"  [{sms} SMs]" + (f"  MISMATCH {bad}" if bad else ""), flush=True)
            del sets, dense
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
