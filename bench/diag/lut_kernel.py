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
from bench.diag.lut_parts import launchers
from bench.kernels import time_graph, weight_sets

VARIANTS = [(8, 2048, True), (8, 1024, True), (8, 3072, True), (8, 4096, True), (16, 2048, True),
            (4, 2048, True), (8, 2048, False), (16, 2048, False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="11008x4096,4096x11008")
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
            kernel, _ = launchers(x, geo, 1)
            for L in sets[:2]:
                kernel(L)
            torch.cuda.synchronize()
            continue
        ref = None
        row = []
        for slab_w, rows, f16 in VARIANTS:
            if (1, geo.bits, slab_w, f16) not in pq_cuda.VARIANTS or geo.GW % slab_w:
                continue
            kernel, epi = launchers(x, geo, 1, slab_w, rows, f16)
            kernel(sets[0])
            y = epi(sets[0]).float()
            ref = y if ref is None else ref
            err = ((y - ref).norm() / ref.norm()).item()
            us = time_graph(kernel, sets, dev)
            row.append(f"s{slab_w}/r{rows}/{'f16' if f16 else 'f32'} {us:.2f}" + ("" if err < 2e-3 else f" ERR {err:.1e}"))
        print(f"{sh}: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
