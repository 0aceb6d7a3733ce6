"""One call of each PQ kernel at a 7B shape, for a hardware-counter profile under Nsight Compute:

    ncu --clock-control none -k regex:'pq|splitk' --section SpeedOfLight --section WarpStateStats \
        python3 -m bench.profile_pq [--N 11008 --M 4096]

Each kernel runs twice (the first call compiles it); ncu picks the launches by name.
"""
from __future__ import annotations

import argparse

import torch

from bench.kernels import RECIPE, layer_args, make_layer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=11008)
    ap.add_argument("--M", type=int, default=4096)
    ap.add_argument("--only-frag", action="store_true", help="only the fragment-lookup kernel (16 and 64 tokens)")
    args = ap.parse_args(argv)
    from athena_runtime.kernels.pq_cuda import pq_gemv_cuda
    from athena_runtime.kernels.pq_cuda_frag import pq_frag_cuda
    from athena_runtime.kernels.pq_gemm import pq_dequantize_t, pq_gemm

    dev = torch.device("cuda")
    L = make_layer(args.N, args.M, RECIPE["d"], RECIPE["n"], RECIPE["k"], round(0.01 * min(args.N, args.M)), dev)
    qw, cb, geo, A, B, _ = layer_args(L)
    x1 = torch.randn(1, args.M, device=dev).half()
    x64 = torch.randn(64, args.M, device=dev).half()
    x16 = torch.randn(16, args.M, device=dev).half()
    if args.only_frag:
        for _ in range(2):
            pq_frag_cuda(x16, qw, cb, geo, A, B)
            pq_frag_cuda(x64, qw, cb, geo, A, B)
        torch.cuda.synchronize()
        return 0
    for _ in range(2):
        pq_dequantize_t(qw, cb, geo, torch.float16)
        pq_dequantize_t(qw, cb, geo, torch.float16, A, B)
        pq_gemv_cuda(x1, qw, cb, geo, A, B)
        pq_gemm(x64, qw, cb, geo, block_m=64, block_n=64, block_w=32, split_k=1, num_warps=4, num_stages=1)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
