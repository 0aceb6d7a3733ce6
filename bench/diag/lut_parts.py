"""Where a one-token lookup-table call's time goes, and what its low-rank term costs: the kernel alone,
+ the split-K epilogue, with the u CTAs (u = x Bᵀ) and without, and the whole call (A·u in the
epilogue), as CUDA-graph replays over rotating weight sets (H100 diagnosis).

    python -m bench.diag.lut_parts [--shapes 11008x4096,4096x11008]
    python -m bench.diag.lut_parts --variants mb4,mb1 [--rounds 2]   # kernel-source variants side by side, A/B
"""
from __future__ import annotations

import argparse
import math

import torch

from athena_runtime.kernels import pq_cuda
from athena_runtime.kernels.pq_gemv import row_chunks, splitk_epilogue
from bench.kernels import time_graph, weight_sets

COLUMNS = ("kernel", "kernel+epi", "kernel+u", "kernel+u+epi(no A)", "full (A·u in epi)", "fused epi")


def launchers(x, geo, rank, slab_w=None, rows=None, fp16_table=True):
    """(kernel(L, lr), epi(L, lr, **launch)) for one token, sharing one partial-sum buffer: the kernel alone
    (no fused epilogue) at the runtime's T = 1 launch unless `slab_w` / `rows` / `fp16_table` say otherwise;
    `lr` adds the u CTAs / A·u, `launch` goes to `splitk_epilogue`."""
    slab_w = slab_w or pq_cuda.T1_SLAB_W
    rows = rows or pq_cuda.t1_rows_per_chunk(geo, x.device)
    chunks, _ = row_chunks(geo, rows)
    partial = torch.empty(geo.GW // slab_w, 1, geo.N_pad, device=x.device, dtype=torch.float16)
    u_part = torch.empty(1, 1, rank, device=x.device, dtype=torch.float32)
    none = torch.empty(0, device=x.device, dtype=torch.float16)
    ext = pq_cuda.load_extension()

    def kernel(L, lr=False):
        ext.pq_lut_gemv(x, L["qweight"], L["codebook"], partial, L["B"] if lr else none, u_part if lr else none,
                        geo.N, geo.GW, geo.k, chunks, rows, geo.bits, slab_w, fp16_table,
                        none, none, none, torch.empty(0, device=x.device, dtype=torch.int32), 0, 0, 0, 0)

    def epi(L, lr=False, **launch):
        return splitk_epilogue(partial, u_part if lr else None, L["A"] if lr else None, None, 1, geo.N, x.dtype,
                               **launch)

    return kernel, epi


def parts(x, geo, rank):
    """name -> fn(L), the columns of the table."""
    kernel, epi = launchers(x, geo, rank)
    return {
        "kernel": kernel,
        "kernel+epi": lambda L: (kernel(L), epi(L)),
        "kernel+u": lambda L: kernel(L, True),
        "kernel+u+epi(no A)": lambda L: (kernel(L, True), epi(L)),
        "full (A·u in epi)": lambda L: pq_cuda.pq_gemv_cuda(x, L["qweight"], L["codebook"], geo, L["A"], L["B"],
                                                            fused_epilogue=False),
        "fused epi": lambda L: pq_cuda.pq_gemv_cuda(x, L["qweight"], L["codebook"], geo, L["A"], L["B"], fused_epilogue=True),
    }


EPI_SWEEP = [(bn, bs, nw) for bn in (16, 32, 64) for bs in (64, 128, 256) for nw in (2, 4, 8)]


def sweep_shape(sh, x, sets, dev):
    """kernel (with u CTAs) + epilogue with A·u, per epilogue launch (BLOCK_N, BLOCK_S, warps); each output
    checked against the default launch's."""
    one = sets[0]
    geo = one["geo"]
    S = geo.GW // pq_cuda.T1_SLAB_W
    kernel, epi = launchers(x, geo, one["A"].shape[1])

    def call(L, **launch):
        kernel(L, True)
        return epi(L, True, **launch)

    ref = call(one).float()
    res = [("default", time_graph(call, sets, dev), 0.0)]
    for bn, bs, nw in EPI_SWEEP:
        if bs < S and bs != 64:
            continue  # BLOCK_S above 64 only where it takes every slab in one block
        kw = dict(block_n=bn, block_s=bs, num_warps=nw)
        err = ((call(one, **kw).float() - ref).norm() / ref.norm()).item()
        res.append((f"n{bn}-s{bs}-w{nw}", time_graph(lambda L, kw=kw: call(L, **kw), sets, dev), err))
    default = res[0][1]
    res.sort(key=lambda r: r[1])
    print(f"{sh} (S = {S} slabs): " + ", ".join(f"{n} {us:.2f} µs" + ("" if e < 1e-3 else f" ERR {e:.1e}")
                                                for n, us, e in res[:8]) + f"; default {default:.2f}", flush=True)


FUSED_SWEEP = [(tile, poll) for tile in (0, 64, 128, 256) for poll in (0, 64, 512)]


def fused_sweep_shape(sh, x, sets, dev):
    """The whole call with the fused epilogue per (rows per epilogue CTA (0: auto), back-off ns), against the
    unfused call; each output checked against the unfused one's."""
    one = sets[0]
    geo = one["geo"]

    def call(L, **kw):
        return pq_cuda.pq_gemv_cuda(x, L["qweight"], L["codebook"], geo, L["A"], L["B"], **kw)

    ref = call(one, fused_epilogue=False).float()
    res = [("unfused", time_graph(lambda L: call(L, fused_epilogue=False), sets, dev), 0.0)]
    for tile, poll in FUSED_SWEEP:
        kw = dict(fused_epilogue=True, epi_tile=tile, epi_poll_ns=poll)
        try:
            err = ((call(one, **kw).float() - ref).norm() / ref.norm()).item()
        except ValueError:
            continue  # more epilogue CTAs than the GPU holds
        res.append((f"t{tile}-p{poll}", time_graph(lambda L, kw=kw: call(L, **kw), sets, dev), err))
    print(f"{sh}: " + ", ".join(f"{n} {us:.2f}" + ("" if e < 1e-3 else f" ERR {e:.1e}") for n, us, e in res), flush=True)


def source_variant(name: str):
    """'mbN': the T = 1 variants compiled for N CTAs per SM on sm_90. Add other variants of the kernel text here
    for A/B runs (measured this way and dropped: a byte-offset lookup, a tie, bench/results/t1ab_lookup_*; the
    second pass's words by cp.async into shared memory at the CTA's start, 40% slower, t1ab_smemnext_*)."""
    if name.startswith("mb"):
        return lambda: pq_cuda.cuda_source(int(name[2:]))
    raise ValueError(f"unknown source variant {name!r}")


def variant_extension(name: str):
    """The decode extension built from kernel-source variant `name` (`source_variant`), beside the runtime's own."""
    from athena_runtime.kernels.cuda_build import InlineExtension
    return InlineExtension("athena_pq_cuda", f"the CUDA PQ decode kernel ({name})", pq_cuda._CPP_DECL,
                           source_variant(name), ["pq_lut_gemv"])


def variants_ab(shapes, values, rounds, dev, l2, rows_list=(2048, 1024)):
    """The kernel alone and the whole call (fused epilogue, one call per chunk height in `rows_list`) for each
    kernel-source variant (`source_variant`), side by side in one process, `rounds` times in alternating order;
    each output checked against the first build's."""
    exts = {mb: variant_extension(mb) for mb in values}
    default_ext = pq_cuda.EXTENSION
    for mb, ext in exts.items():
        ext.load()
    kinds = ("kernel",) + tuple(f"fused r{r}" for r in rows_list)
    cols = [f"{mb} {c}" for mb in values for c in kinds]
    print(f"{'shape':>12s} {'cuBLAS':>7s} " + " ".join(f"{c:>16s}" for c in cols) + "  (CUDA-graph µs, T = 1, with low-rank)")
    try:
        for rnd in range(rounds):
            order = list(values) if rnd % 2 == 0 else list(reversed(values))
            for sh in shapes:
                N, M = (int(v) for v in sh.split("x"))
                rank = max(1, round(0.01 * min(N, M)))
                sets = weight_sets(N, M, rank, dev, l2, seed=N + rnd)
                x = torch.randn(1, M, device=dev).half()
                dense = [torch.randn(N, M, device=dev).half() for _ in range(max(2, min(8, math.ceil(3 * l2 / (N * M * 2)))))]
                cublas = time_graph(lambda W: x @ W.t(), dense, dev)
                res, ref, bad = {}, None, []
                for mb in order:
                    pq_cuda.EXTENSION = exts[mb]
                    geo = sets[0]["geo"]
                    kernel, _ = launchers(x, geo, sets[0]["A"].shape[1])
                    res[(mb, "kernel")] = time_graph(lambda L: kernel(L, True), sets, dev)
                    for rows in rows_list:
                        def call(L, rows=rows):
                            return pq_cuda.pq_gemv_cuda(x, L["qweight"], L["codebook"], geo, L["A"], L["B"],
                                                        slab_w=pq_cuda.T1_SLAB_W, rows_per_chunk=rows, fused_epilogue=True)
                        y = call(sets[0]).float()
                        ref = y if ref is None else ref
                        if ((y - ref).norm() / ref.norm()).item() > 1e-3:
                            bad.append(f"{mb} r{rows}")
                        res[(mb, f"fused r{rows}")] = time_graph(call, sets, dev)
                print(f"{sh:>12s} {cublas:7.1f} " + " ".join(f"{res[(mb, c)]:16.2f}" for mb in values for c in kinds)
                      + (f"  MISMATCH {bad}" if bad else ""), flush=True)
                del sets, dense
                torch.cuda.empty_cache()
    finally:
        pq_cuda.EXTENSION = default_ext


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", "--min-blocks", dest="variants", default="", help="source variants side by side, e.g. mb4,mb1 (the sm_90 CTAs-per-SM "
                    "bound of the T = 1 variants)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", default="2048,1024", help="rows per chunk of the fused calls in --variants runs")
    ap.add_argument("--shapes", default="11008x4096,4096x11008,4096x4096,14336x4096")
    ap.add_argument("--sweep", action="store_true", help="the split-K epilogue's launch (with the low-rank term) instead")
    ap.add_argument("--fused-sweep", action="store_true", help="the fused epilogue's tile and back-off instead")
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    if args.variants:
        variants_ab(args.shapes.split(","), args.variants.split(","), args.rounds, dev, l2,
                    tuple(int(r) for r in args.rows.split(",")))
        return
    if not (args.sweep or args.fused_sweep):
        print(f"{'shape':>12s} {'cuBLAS':>7s} " + " ".join(f"{k:>19s}" for k in COLUMNS) + "  (CUDA-graph µs, T = 1)")
    for sh in args.shapes.split(","):
        N, M = (int(v) for v in sh.split("x"))
        rank = max(1, round(0.01 * min(N, M)))
        sets = weight_sets(N, M, rank, dev, l2, seed=N)
        x = torch.randn(1, M, device=dev).half()
        if args.sweep or args.fused_sweep:
            (sweep_shape if args.sweep else fused_sweep_shape)(sh, x, sets, dev)
            continue
        one = sets[0]
        dense = [torch.randn(N, M, device=dev).half() for _ in range(max(2, min(8, math.ceil(3 * l2 / (N * M * 2)))))]
        cublas = time_graph(lambda W: x @ W.t(), dense, dev)
        fns = parts(x, one["geo"], one["A"].shape[1])
        us = [time_graph(f, sets, dev) for f in fns.values()]
        print(f"{sh:>12s} {cublas:7.1f} " + " ".join(f"{v:19.1f}" for v in us), flush=True)


if __name__ == "__main__":
    main()
