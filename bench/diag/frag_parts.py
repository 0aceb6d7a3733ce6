"""Where a fragment-kernel call's time goes: the main kernel alone, + the split-K epilogue, + the
low-rank u = x Bᵀ (cuBLAS), as CUDA-graph replays over rotating weight sets (H100 diagnosis).

    python -m bench.diag.frag_parts [--shapes 11008x4096,4096x11008] [--tokens 1,16,64]
"""
from __future__ import annotations

import argparse

import torch

from athena_runtime.kernels import pq_cuda_frag as frag
from athena_runtime.kernels.pq_gemv import splitk_epilogue
from bench.kernels import compressed_bytes, time_graph, weight_sets


def parts(L, x, nr, stages, split):
    geo = L["geo"]
    t_pad = next(t for t in frag.T_PADS if t >= x.shape[0])
    n_row, n_st = -(-geo.N_pad // (64 * nr)), geo.GW // frag.WORDS
    split = split or max(1, min(n_st, 2 * torch.cuda.get_device_properties(0).multi_processor_count // n_row))
    per = -(-n_st // split)
    split = -(-n_st // per)
    partial = torch.empty(split, t_pad, geo.N_pad, device=x.device, dtype=torch.float16)
    ext = frag.EXTENSION.load()
    none = torch.empty(0, device=x.device, dtype=torch.float16)

    def kernel(L):
        ext.pq_frag(x, L["qweight"], L["codebook"], partial, none, none, geo.GW, geo.k, per * frag.WORDS, geo.bits,
                    nr, stages)

    def with_epilogue(L):
        kernel(L)
        return splitk_epilogue(partial, None, None, None, x.shape[0], geo.N, x.dtype)

    def full(L):
        return frag.pq_frag_cuda(x, L["qweight"], L["codebook"], geo, L["A"], L["B"], None, nr=nr, stages=stages,
                                 split=split)
    return split, {"kernel": kernel, "kernel+epilogue": with_epilogue, "full (with low-rank)": full}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="11008x4096,4096x11008")
    ap.add_argument("--tokens", default="1,16,64")
    ap.add_argument("--configs", default="4:3,2:3,4:4", help="NR:STAGES pairs")
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{'shape':>12s} {'T':>3s} {'nr:st':>5s} {'S':>3s} " + " ".join(f"{k:>22s}" for k in
          ("kernel", "kernel+epilogue", "full (with low-rank)")) + "   GB/s kernel")
    for sh in args.shapes.split(","):
        N, M = (int(v) for v in sh.split("x"))
        rank = max(1, round(0.01 * min(N, M)))
        sets = weight_sets(N, M, rank, dev, l2, seed=N)
        one = sets[0]
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, M, device=dev).half()
            for cfg in args.configs.split(","):
                nr, st = (int(v) for v in cfg.split(":"))
                t_pad = next(t for t in frag.T_PADS if t >= T)
                if (t_pad, nr, st) not in frag.VARIANTS:
                    continue
                split, fns = parts(one, x, nr, st, None)
                us = {k: time_graph(f, sets, dev) for k, f in fns.items()}
                gbs = compressed_bytes(one, T, False) / (us["kernel"] * 1e-6) / 1e9
                print(f"{sh:>12s} {T:3d} {nr}:{st:<3d} {split:3d} " + " ".join(f"{v:22.1f}" for v in us.values())
                      + f"   {gbs:8.0f}", flush=True)


if __name__ == "__main__":
    main()
