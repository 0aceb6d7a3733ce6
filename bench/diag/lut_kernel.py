"""The one-token lookup-table kernel alone (no epilogue), for Nsight Compute and for launch variants.

    ncu --clock-control none -k regex:pq_lut_gemv_kernel --section SpeedOfLight ... \
        python -m bench.diag.lut_kernel --ncu            # two calls per shape, nothing timed
    python -m bench.diag.lut_kernel                       # CUDA-graph µs per (slab, rows, table) launch

Every variant's partial sums are checked against the default launch's (through the same epilogue).
"""
from __future__ import annotations

import argparse

import torch

from athena_runtime.kernels import pq_cuda
from athena_runtime.kernels.pq_gemv import row_chunks, splitk_epilogue
from bench.kernels import time_graph, weight_sets

SLOTS = 3 * 132  # CTAs of the T = 1 variant (74 registers, 256 threads) an H100 holds at once
# (slab_w, rows per chunk, fp16 table, slabs: None = GW / slab_w, "wave" = spread over one full wave, or a count)
VARIANTS = [(8, 2048, True, None), (8, 2048, True, "wave"), (8, 2048, True, "wave-u"), (8, 2048, True, "2wave"),
            (8, 1024, True, "wave"), (8, 1024, True, "2wave"), (16, 2048, True, None)]


def slab_count(geo, slab_w, rows, how, rank=None):
    """None -> GW / slab_w; 'wave' -> as many slabs as fill SLOTS (at most slab_w words each); 'wave-u' the
    same beside 1% low-rank u CTAs; '2wave' two waves."""
    if how is None:
        return geo.GW // slab_w
    _, n_row = row_chunks(geo, rows)
    rank = -(-round(0.01 * min(geo.N, geo.M)) // 16) * 16 if rank is None else rank  # 1%, padded as PQLinear does
    free = {"wave": SLOTS, "wave-u": SLOTS - rank, "2wave": 2 * SLOTS}[how]
    return max(-(-geo.GW // slab_w), min(geo.GW, free // n_row))


def launcher(x, geo, slab_w, rows, fp16_table, n_slabs=None):
    chunks, _ = row_chunks(geo, rows)
    partial = torch.empty(n_slabs or geo.GW // slab_w, 1, geo.N_pad, device=x.device, dtype=torch.float16)
    none = torch.empty(0, device=x.device, dtype=torch.float16)
    no_sync = torch.empty(0, device=x.device, dtype=torch.int32)
    ext = pq_cuda.load_extension()

    def kernel(L):
        ext.pq_lut_gemv(x, L["qweight"], L["codebook"], partial, none, none, geo.N, geo.GW, geo.k, chunks, rows,
                        geo.bits, slab_w, fp16_table, none, none, none, no_sync, 0, 0, pq_cuda.EPI_TILE)

    def finish():
        return splitk_epilogue(partial, None, None, None, 1, geo.N, x.dtype)

    return kernel, finish


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="11008x4096,4096x11008,4096x4096,14336x4096")
    ap.add_argument("--ncu", action="store_true", help="two default launches per shape, no timing")
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for sh in args.shapes.split(","):
        N, M = (int(v) for v in sh.split("x"))
        sets = weight_sets(N, M, max(1, round(0.01 * min(N, M))), dev, l2, seed=N)
        geo = sets[0]["geo"]
        x = torch.randn(1, M, device=dev).half()
        if args.ncu:
            kernel, _ = launcher(x, geo, pq_cuda.T1_SLAB_W, pq_cuda.t1_rows_per_chunk(geo, dev), True)
            for L in sets[:2]:
                kernel(L)
            torch.cuda.synchronize()
            continue
        ref = None
        row = []
        for slab_w, rows, f16, how in VARIANTS:
            if (1, geo.bits, slab_w, f16) not in pq_cuda.VARIANTS or geo.GW % slab_w:
                continue
            S = slab_count(geo, slab_w, rows, how)
            kernel, finish = launcher(x, geo, slab_w, rows, f16, S)
            kernel(sets[0])
            y = finish().float()
            ref = y if ref is None else ref
            err = ((y - ref).norm() / ref.norm()).item()
            us = time_graph(kernel, sets, dev)
            row.append(f"w{slab_w}/r{rows}/S{S} {us:.2f}" + ("" if err < 2e-3 else f" ERR {err:.1e}"))
        print(f"{sh}: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
