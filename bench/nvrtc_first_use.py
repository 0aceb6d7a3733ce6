"""First use of the CUDA PQ kernels: the seconds PQLinear layers of the 7B shapes take to bind every token class
(NVRTC compiles, in parallel, or reads the cubin cache), the backend of each class, and the kernels' registers.

    python -m bench.nvrtc_first_use [--json]     (run with an empty ATHENA_KERNEL_CACHE for the cold figure)
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from athena_runtime.kernels import nvrtc
from athena_runtime.pq_linear import PQLinear
from bench.kernels import make_layer

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # qkv, o, gate/up, down of Llama-2-7B


def bind_all(rank: int = 48) -> tuple[float, list[tuple[str, list[str]]]]:
    t0, out = time.perf_counter(), []
    for N, M in SHAPES:
        L = make_layer(N, M, 2, 64, 4096, rank, torch.device("cuda"))
        layer = PQLinear(L["geo"], L["qweight"], L["codebook"], L["A"], L["B"], None)
        out.append((f"{N}x{M}", layer.bind()))
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tc = nvrtc.toolchain()
    cold, paths = bind_all()
    warm, _ = bind_all()  # the same kernels again in this process: plans only
    cached = [json.loads(p.read_text()) for p in sorted(tc.cache_dir.glob("*.json"))]
    res = dict(
        toolchain=tc.describe(),
        cache=str(tc.cache_dir),
        first_use_s=round(cold, 2),
        again_s=round(warm, 2),
        compiled=len(cached),
        compile_s_sum=round(sum(c["seconds"] for c in cached), 2),
        paths=paths,
    )
    print(
        f"{tc.describe()}\nfirst use (bind 4 7B shapes, every token class): {cold:.2f} s; again {warm:.2f} s; "
        f"{len(cached)} cubins in {tc.cache_dir} (NVRTC seconds summed over them: {res['compile_s_sum']})"
    )
    for shape, names in paths:
        print(f"  {shape}: classes 1 / 2-4 / 5-8 / 9-64 / 65+ -> {' / '.join(names)}")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
