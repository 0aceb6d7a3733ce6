"""Is a 2048-token PQLinear call bound by the GPU or by the host? The runtime's module (path chosen per
call) timed three ways side by side with cuBLAS fp16: do_bench medians of eager calls (what
`bench/kernels.py` reports; the L2 flush before each call gives the host ~85 µs of head start), CUDA-graph
replays (GPU time alone, no host work), and the host's µs per eager call (enqueue only, GPU running
behind). With `--profile FILE` the host side of 30 eager calls is written as cProfile stats.

    python -m bench.diag.prefill_host [--shapes 4096x4096,11008x4096] [--rounds 3] [--profile out.txt]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import time

import torch

from athena_runtime.pq_linear import PQLinear
from bench.kernels import time_call, time_graph, weight_sets


def host_us(fn, sets, calls=30):
    """Host µs per call with the GPU queue running behind (no sync inside the loop)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(sets[i % len(sets)])
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e6 / calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,14336x4096")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", default="", help="write cProfile stats of 30 eager low-rank calls here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(
        f"{'shape':>12s} {'round':>5s} | {'cuBLAS eager/graph/host':>24s} | {'PQ+LR eager/graph/host':>24s} | "
        f"{'PQ eager/graph/host':>24s}   (µs; T = {args.tokens})"
    )
    for sh in args.shapes.split(","):
        N, M = (int(v) for v in sh.split("x"))
        rank = max(1, round(0.01 * min(N, M)))
        for rnd in range(args.rounds):
            sets = weight_sets(N, M, rank, dev, l2, seed=N + rnd)
            for L in sets:
                L["lr"] = PQLinear(L["geo"], L["qweight"], L["codebook"], L["A"], L["B"], None)
                L["nolr"] = PQLinear(L["geo"], L["qweight"], L["codebook"], None, None, None)
            x = torch.randn(args.tokens, M, device=dev).half()
            dense = [
                torch.randn(N, M, device=dev).half() * 0.02
                for _ in range(max(2, min(8, math.ceil(3 * l2 / (N * M * 2)))))
            ]
            cols = []
            for fn, ss in (
                (lambda W, x=x: x @ W.t(), dense),
                (lambda L, x=x: L["lr"](x), sets),
                (lambda L, x=x: L["nolr"](x), sets),
            ):
                fn(ss[0])
                cols.append((time_call(fn, ss, dev), time_graph(fn, ss, dev, replays=10), host_us(fn, ss)))
            print(
                f"{sh:>12s} {rnd:5d} | " + " | ".join(f"{e:7.1f} /{g:7.1f} /{h:7.1f}" for e, g, h in cols), flush=True
            )
            if args.profile and rnd == 0:
                prof = cProfile.Profile()
                torch.cuda.synchronize()
                prof.enable()
                for i in range(30):
                    sets[i % len(sets)]["lr"](x)
                prof.disable()
                torch.cuda.synchronize()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
                with open(args.profile, "a") as f:
                    f.write(f"== {sh}, 30 eager calls with low-rank\n{buf.getvalue()}\n")
            del sets, dense
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
