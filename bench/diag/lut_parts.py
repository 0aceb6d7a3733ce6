"""Where a one-token lookup-table call's time goes, and what its low-rank term costs: the kernel alone,
+ the split-K epilogue, with the u CTAs (u = x Bᵀ) and without, and the whole call (A·u in the
epilogue), as CUDA-graph replays over rotating weight sets (H100 diagnosis).

    python -m bench.diag.lut_parts [--shapes 11008x4096,4096x11008]
"""
from __future__ import annotations

import argparse
import math

import torch

from athena_runtime.kernels import pq_cuda
from athena_runtime.kernels.pq_gemv import row_chunks, splitk_epilogue
from bench.kernels import RECIPE, compressed_bytes, make_layer, time_graph

COLUMNS = ("kernel", "kernel+epi", "kernel+u", "kernel+u+epi(no A)", "full (A·u in epi)")


def parts(x, geo, rank):
    """name -> fn(L) for one token, the runtime's T = 1 launch."""
    slab_w, rows = pq_cuda.T1_SLAB_W, pq_cuda.t1_rows_per_chunk(geo, x.device)
    chunks, _ = row_chunks(geo, rows)
    partial = torch.empty(geo.GW // slab_w, 1, geo.N_pad, device=x.device, dtype=torch.float16)
    u_part = torch.empty(1, 1, rank, device=x.device, dtype=torch.float32)
    none = torch.empty(0, device=x.device, dtype=torch.float16)
    ext = pq_cuda.load_extension()

    def kernel(L, lr=False):
        ext.pq_lut_gemv(x, L["qweight"], L["codebook"], partial, L["B"] if lr else none, u_part if lr else none,
                        geo.N, geo.GW, geo.k, chunks, rows, geo.bits, slab_w, True)

    def epi(L, lr=False):
        return splitk_epilogue(partial, u_part if lr else None, L["A"] if lr else None, None, 1, geo.N, x.dtype)

    return {
        "kernel": kernel,
        "kernel+epi": lambda L: (kernel(L), epi(L)),
        "kernel+u": lambda L: kernel(L, True),
        "kernel+u+epi(no A)": lambda L: (kernel(L, True), epi(L)),
        "full (A·u in epi)": lambda L: pq_cuda.pq_gemv_cuda(x, L["qweight"], L["codebook"], geo, L["A"], L["B"]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="11008x4096,4096x11008,4096x4096,14336x4096")
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{'shape':>12s} {'cuBLAS':>7s} " + " ".join(f"{k:>19s}" for k in COLUMNS) + "  (CUDA-graph µs, T = 1)")
    for sh in args.shapes.split(","):
        N, M = (int(v) for v in sh.split("x"))
        rank = max(1, round(0.01 * min(N, M)))
        one = make_layer(N, M, RECIPE["d"], RECIPE["n"], RECIPE["k"], rank, dev, seed=N)
        n_sets = max(2, min(32, math.ceil(3 * l2 / compressed_bytes(one, 1))))
        sets = [one] + [make_layer(N, M, RECIPE["d"], RECIPE["n"], RECIPE["k"], rank, dev, seed=N + s)
                        for s in range(1, n_sets)]
        dense = [torch.randn(N, M, device=dev).half() for _ in range(max(2, min(8, math.ceil(3 * l2 / (N * M * 2)))))]
        x = torch.randn(1, M, device=dev).half()
        cublas = time_graph(lambda W: x @ W.t(), dense, dev)
        fns = parts(x, one["geo"], one["A"].shape[1])
        us = [time_graph(f, sets, dev) for f in fns.values()]
        print(f"{sh:>12s} {cublas:7.1f} " + " ".join(f"{v:19.1f}" for v in us), flush=True)


if __name__ == "__main__":
    main()
