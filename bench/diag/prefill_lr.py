"""Where the low-rank share of a 2048-token call goes: the cuBLAS products of the prefill path, one by one,
on fresh random operands per round (H100 diagnosis of the 4096 x 4096 case, whose low-rank share swung
between ~25 and ~85 µs from run to run).

    python -m bench.diag.prefill_lr [--shapes 4096x4096,11008x4096] [--rounds 3]
"""
from __future__ import annotations

import argparse

import torch
import triton


def ops(T, N, M, r, dev):
    from athena_runtime.kernels import dequant as cdq, dequant as fold
    from athena_runtime.kernels.dequant_matmul import dequant_matmul as pq_dequant_matmul
    from bench.kernels import RECIPE, make_layer
    L = make_layer(N, M, RECIPE["d"], RECIPE["n"], RECIPE["k"], r, dev)
    x = torch.randn(T, M, device=dev).half()
    Wt = torch.randn(M, N, device=dev).half()
    A = (torch.randn(N, r, device=dev) * 0.02).half()
    B = (torch.randn(r, M, device=dev) * 0.02).half()
    Bt = B.t().contiguous()
    u = x @ B.t()
    y = torch.empty(T, N, device=dev, dtype=torch.float16)
    K = M + r + (-(M + r)) % 64  # the rows mode's padded inner dimension
    xu = torch.zeros(T, K, device=dev, dtype=torch.float16)
    Wu = torch.randn(K, N, device=dev).half()
    return {
        "x Wt (beta 0)": lambda: torch.mm(x, Wt, out=y),
        "y += x Wt (beta 1)": lambda: y.addmm_(x, Wt),
        "u = x Bᵀ (B [r, M])": lambda: x @ B.t(),
        "u = x Bt (Bt [M, r])": lambda: x @ Bt,
        "u = (B xᵀ)ᵀ": lambda: (B @ x.t()).t(),
        "u Aᵀ": lambda: u @ A.t(),
        "rows GEMM [T, K] x [K, N]": lambda: xu @ Wu,
        "addmm mode (3 products)": lambda: ((x @ B.t()) @ A.t()).addmm_(x, Wt),
        "PQ cuda-dequant, low-rank (default: fold)": lambda: pq_dequant_matmul(
            x, L["qweight"], L["codebook"], L["geo"], L["A"], L["B"], dequant="cuda"),
        "PQ cuda-dequant, rows": lambda: pq_dequant_matmul(
            x, L["qweight"], L["codebook"], L["geo"], L["A"], L["B"], dequant="cuda", lowrank_mode="rows"),
        "PQ cuda-dequant, no low-rank": lambda: pq_dequant_matmul(x, L["qweight"], L["codebook"], L["geo"], dequant="cuda"),
        "PQ cuda-dequant, addmm": lambda: pq_dequant_matmul(
            x, L["qweight"], L["codebook"], L["geo"], L["A"], L["B"], dequant="cuda", lowrank_mode="addmm"),
        "dequantize alone": lambda: cdq.dequantize_t(L["qweight"], L["codebook"], L["geo"]),
        **{f"fold kernel alone r{r}": (lambda r=r: fold.dequantize_fold_t(
            L["qweight"], L["codebook"], L["geo"], L["A"], L["B"], rows_per_chunk=r)) for r in fold.FOLD_ROWS_CANDIDATES},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    for sh in args.shapes.split(","):
        N, M = (int(v) for v in sh.split("x"))
        r = -(-round(0.01 * min(N, M)) // 16) * 16
        rows = {}
        for _ in range(args.rounds):
            for name, fn in ops(args.tokens, N, M, r, dev).items():
                rows.setdefault(name, []).append(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3)
            torch.cuda.empty_cache()
        print(f"{sh} T={args.tokens} r={r}: " + "; ".join(f"{k} " + "/".join(f"{v:.1f}" for v in vs)
                                                     for k, vs in rows.items()), flush=True)


if __name__ == "__main__":
    main()
