"""Check and time the PQ kernels on a GPU in one run; a short table is printed last.

    python3 bench/kernels.py --out $OUT          (device machine: torch, triton, numpy, nvcc)
    TRITON_INTERPRET=1 python bench/kernels.py --smoke     (CPU: exercises the plumbing only)

1. checks every variant against the PyTorch reference on fresh random inputs (odd shapes too;
   the caching allocator is poisoned with NaN first, so unwritten outputs show), and a CUDA-graph
   capture/replay of PQLinear;
2. measures copy bandwidth (device-to-device copy, bytes read + written);
3. times every variant with triton.testing.do_bench (median; L2 flushed by do_bench and weight sets
   rotated) at 7B shapes W [N, M] for several token counts, against cuBLAS fp16 (x @ W.t()), and
   for few tokens also as CUDA-graph replays of calls over rotating weight sets (decode setting);
4. writes kernels.json (every number) and kernels.md under --out.

--plan prefill: 2048 tokens, the four shapes: cuBLAS fp16, the Triton dequantize with the low-rank
term folded in, the CUDA dequantize with the low-rank term folded by cuBLAS, as rows or addmm, both without low-rank,
and the two dequantize kernels alone (bytes = Ŵᵀ written + index words and codebook read), with a
sweep of the CUDA kernel's launch shape (slab words x rows per CTA); the checks first include the
CUDA dequantize bit for bit against the reference.

Recipe: d=2, n=64, k=4096, codebooks dequantized to fp16 at load (codebook_bits 8 on disk),
low-rank rank = 1% of min(N, M), no bias. "Compressed bytes" = what the kernel must read: packed
index words as stored (int32, 5 per word, padding included), fp16 codebook, low-rank factors, x,
plus the output written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from athena_runtime.kernels import layout  # noqa: E402
from athena_runtime.kernels.dequant_matmul import dequant_matmul as pq_dequant_matmul  # noqa: E402
from athena_runtime.kernels.layout import PQGeometry  # noqa: E402
from athena_runtime.kernels.pq_reference import pq_matmul_reference as pq_gemv_reference  # noqa: E402
from athena_runtime.kernels.triton_lut import triton_lut_matmul as pq_gemv  # noqa: E402
from athena_runtime.kernels.tuning import Tuning  # noqa: E402
from athena_runtime.pq_linear import PQLinear, pad_lowrank  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # W [N, M]


def family_shapes(families: list[str]) -> list[tuple[int, int]]:
    """The W [N, M] of every PQ call a decoder layer of each family's shape makes (bench.random_checkpoint.FAMILIES),
    as the runtime calls them: gate/up as one layer, q/k/v as one where PQLinear.concat takes them (GQA's narrow k/v
    would pad too many codebook-block rows: then three calls), in order of first appearance."""
    from bench.random_checkpoint import FAMILIES, model_shapes

    k = RECIPE["k"]
    out: list[tuple[int, int]] = []
    for name in families:
        linears, _ = model_shapes(FAMILIES[name])
        part = {n.rsplit("layers.0.", 1)[1]: (N, M) for n, (N, M, _) in linears.items() if ".layers.0." in n}
        q, kk, v = part["self_attn.q_proj"], part["self_attn.k_proj"], part["self_attn.v_proj"]
        padded = -(-q[0] // k) * k + -(-kk[0] // k) * k + v[0]
        qkv = [(padded, q[1])] if padded - (q[0] + kk[0] + v[0]) <= 0.125 * (q[0] + kk[0] + v[0]) else [q, kk, v]
        gate = part["mlp.gate_proj"]
        gate_up = (-(-gate[0] // k) * k + gate[0], gate[1])
        for shape in qkv + [part["self_attn.o_proj"], gate_up, part["mlp.down_proj"]]:
            if shape not in out:
                out.append(shape)
    return out


TOKENS = [1, 2, 4, 8, 16, 64, 256, 2048]
RECIPE = dict(d=2, n=64, k=4096)
TOL = 4e-3


# ------------------------------------------------------------------------------------ helpers
class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget = time.time(), budget_s

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def __str__(self):
        return f"{time.time() - self.t0:6.1f}s"


def make_layer(N, M, d, n, k, rank, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    geo = PQGeometry(N, M, d, n, k)
    I = torch.randint(0, n, (N, geo.G), generator=g, device=device)
    C = (torch.randn(geo.Nb, geo.G, n, d, generator=g, device=device) * 0.02).half()
    A = (torch.randn(N, rank, generator=g, device=device) * 0.02).half() if rank else None
    B = (torch.randn(rank, M, generator=g, device=device) * 0.02).half() if rank else None
    A, B = pad_lowrank(A, B)  # as PQLinear.from_tensors does
    return dict(geo=geo, qweight=layout.pack_words(I, geo), codebook=layout.pad_codebook(C, geo), A=A, B=B, bias=None)


def weight_sets(N, M, rank, device, l2_bytes, seed):
    """Layers of one shape at the recipe, enough of them (2-32) that rotating through them reads more
    than 3x the L2 cache per round (timings of memory-bound calls then measure DRAM, not the cache)."""
    one = make_layer(N, M, RECIPE["d"], RECIPE["n"], RECIPE["k"], rank, device, seed=seed)
    n_sets = max(2, min(32, math.ceil(3 * l2_bytes / compressed_bytes(one, 1))))
    return [one] + [
        make_layer(N, M, RECIPE["d"], RECIPE["n"], RECIPE["k"], rank, device, seed=seed + s) for s in range(1, n_sets)
    ]


def layer_args(L, lowrank=True):
    return (L["qweight"], L["codebook"], L["geo"], L["A"] if lowrank else None, L["B"] if lowrank else None, L["bias"])


def compressed_bytes(L, T, lowrank=True):
    geo = L["geo"]
    b = L["qweight"].numel() * 4 + L["codebook"].numel() * 2 + T * geo.M * 2 + T * geo.N * 2
    if lowrank and L["A"] is not None:
        b += (L["A"].numel() + L["B"].numel()) * 2
    return b


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def poison(device):
    if device.type == "cuda":  # freed NaN block: the next torch.empty calls get NaN-filled memory
        p = torch.full((64 << 20,), float("nan"), device=device, dtype=torch.float32)
        del p


# ------------------------------------------------------------------------------------ variants
def variants(cuda_ok, cuda_dq_ok=lambda: False):
    """name -> (fn(x, L, lowrank), applies(T, geo))."""
    from athena_runtime.kernels import frag, lut

    def cuda(**kw):
        return lambda x, L, lr: lut.lut_matmul(x, *layer_args(L, lr), **kw)

    def cuda_applies(T, geo, slab=None):
        t_inst = next((t for t in lut.TOKENS if t >= T), None)
        if not cuda_ok() or t_inst is None or lut.supports(geo, T, torch.float16) is not None:
            return False
        return slab is None or (slab in lut.slab_widths(t_inst, geo.bits) and geo.GW % slab == 0)

    v = {
        "cuda-frag": (
            lambda x, L, lr: frag.frag_matmul(x, *layer_args(L, lr)),
            lambda T, g: cuda_ok() and frag.supports(g, T, torch.float16) is None,
        ),
        "cuda-lut": (cuda(), lambda T, g: cuda_applies(T, g)),
        "triton-lut": (lambda x, L, lr: pq_gemv(x, *layer_args(L, lr)), lambda T, g: T <= 16 and g.n <= 256),
        "dequant+cublas": (lambda x, L, lr: pq_dequant_matmul(x, *layer_args(L, lr)), lambda T, g: T >= 16),
    }
    for slab in (4, 8, 16):
        for rows in (1024, 2048, 4096):
            v[f"cuda-lut-s{slab}-r{rows}"] = (
                cuda(slab_w=slab, rows_per_chunk=rows),
                lambda T, g, s=slab: T == 1 and cuda_applies(T, g, s),
            )
    for slab in (4, 8, 16):
        v[f"triton-lut-s{slab}"] = (
            lambda x, L, lr, s=slab: pq_gemv(x, *layer_args(L, lr), slab_w=s),
            lambda T, g: T == 1,
        )
    _dmm = pq_dequant_matmul
    for bn, bw, nw in ((128, 16, 4), (128, 32, 8), (256, 16, 8), (64, 32, 4), (128, 8, 4)):
        v[f"dequantT{bn}x{bw}w{nw}+cublas"] = (
            lambda x, L, lr, bn=bn, bw=bw, nw=nw: _dmm(x, *layer_args(L, lr), block_n=bn, block_w=bw, num_warps=nw),
            lambda T, g, bn=bn, bw=bw: T >= 2 and g.N_pad % bn == 0 and g.GW % bw == 0,
        )
    v["dequant+cublas-addmm"] = (
        lambda x, L, lr: _dmm(x, *layer_args(L, lr), lowrank_mode="addmm"),
        lambda T, g: T >= 16,
    )
    v["dequant+cublas-rows"] = (lambda x, L, lr: _dmm(x, *layer_args(L, lr), lowrank_mode="rows"), lambda T, g: T >= 16)
    v["cuda-frag-nr2"] = (  # 128-row CTAs (the launch of layers whose codebook blocks split 256-row ones)
        lambda x, L, lr: frag.frag_matmul(x, *layer_args(L, lr), nr=2),
        lambda T, g: cuda_ok() and frag.supports(g, T, torch.float16) is None,
    )
    v.update(dequant_variants(cuda_dq_ok))
    v["PQLinear"] = (lambda x, L, lr: L["linear" if lr else "linear_nolr"](x), lambda T, g: True)
    return v


def dequant_variants(cuda_dq_ok):
    """The dequantize-then-cuBLAS path with the CUDA dequantize (kernels/dequant.py), and both dequantize
    kernels alone (their bytes: `DEQUANT_ALONE`)."""
    from athena_runtime.kernels import dequant as cdq
    from athena_runtime.kernels.dequant_matmul import dequant_matmul as dmm
    from athena_runtime.kernels.dequant_matmul import triton_dequantize_t as pq_dequantize_t

    def ok(T, g):
        return cuda_dq_ok() and cdq.supports(g, torch.float16) is None

    v = {
        "cuda-dq+cublas": (
            lambda x, L, lr: dmm(x, *layer_args(L, lr), dequant="cuda"),
            lambda T, g: T >= 16 and ok(T, g),
        ),
        "cuda-dq+cublas-fold": (
            lambda x, L, lr: dmm(x, *layer_args(L, lr), dequant="cuda", lowrank_mode="fold"),
            lambda T, g: T >= 16 and ok(T, g),
        ),
        "cuda-dq+cublas-rows": (
            lambda x, L, lr: dmm(x, *layer_args(L, lr), dequant="cuda", lowrank_mode="rows"),
            lambda T, g: T >= 16 and ok(T, g),
        ),
        "cuda-dq+cublas-addmm": (
            lambda x, L, lr: dmm(x, *layer_args(L, lr), dequant="cuda", lowrank_mode="addmm"),
            lambda T, g: T >= 16 and ok(T, g),
        ),
        "triton-dqT": (lambda x, L, lr: pq_dequantize_t(L["qweight"], L["codebook"], L["geo"]), lambda T, g: True),
        "cuda-dqT": (lambda x, L, lr: cdq.dequantize_t(L["qweight"], L["codebook"], L["geo"]), ok),
    }
    for slab in cdq.MAIN_SLABS:
        for rows in Tuning().dequant_rows:
            v[f"cuda-dqT-s{slab}-r{rows}"] = (
                lambda x, L, lr, s=slab, r=rows: cdq.dequantize_t(
                    L["qweight"], L["codebook"], L["geo"], slab_w=s, rows_per_chunk=r
                ),
                lambda T, g, s=slab: ok(T, g) and s in cdq.slab_widths(g.bits, g.d),
            )
    return v


def dequant_alone_bytes(L, T, lr):
    """Bytes a dequantize kernel must move: Ŵᵀ written, index words and codebook read once."""
    return L["geo"].M * L["geo"].N * 2 + L["qweight"].numel() * 4 + L["codebook"].numel() * 2


DEQUANT_ALONE = ("triton-dqT", "cuda-dqT")  # name prefixes timed with dequant_alone_bytes


# ------------------------------------------------------------------------------------ checks
CHECK_CASES = [  # (N, M, d, n, k, rank, tokens)
    (4096, 4096, 2, 64, 4096, 41, (1, 3, 8, 16, 40, 64)),
    (1000, 2050, 2, 64, 512, 8, (1, 2, 5, 33)),
    (300, 301, 3, 16, 100, 3, (1, 4, 12)),
    (257, 1030, 4, 256, 128, 5, (2, 7)),
    (11008, 4096, 2, 64, 4096, 41, (1, 4)),
    (14336, 4096, 2, 64, 4096, 41, (1, 16)),
]
FRAG_CHECK_CASES = [(1000, 1000, 2, 64, 512, 8, (1, 5, 17, 33, 64)), (300, 1000, 2, 64, 128, 4, (3, 16, 40))]
SMOKE_CHECK_CASES = [(70, 130, 2, 64, 64, 2, (1, 5)), (37, 29, 3, 16, 20, 3, (2,))]


def run_checks(dev, V, clock, log, cases=CHECK_CASES, linear_shape=(4096, 4096), cuda_dq_ok=lambda: False):
    rows = []
    if cuda_dq_ok():  # the CUDA dequantize first: bit for bit, then the matmul paths built on it
        rows += _check_dequant_exact(dev, log, cases)
        rows += _check_cases(
            dev,
            V,
            clock,
            log,
            cases,
            True,
            {"cuda-dq+cublas", "cuda-dq+cublas-fold", "cuda-dq+cublas-rows", "cuda-dq+cublas-addmm"},
        )
    # a few Triton checks first (the CUDA extension builds in the background meanwhile); the Triton
    # kernels passed every case of the previous run, their code is unchanged since
    rows += _check_cases(
        dev,
        V,
        clock,
        log,
        cases[1:3],
        False,
        {"triton-lut", "dequant+cublas", "dequantT128x16w4+cublas", "dequantT256x16w8+cublas"},
    )
    rows += _check_cases(
        dev,
        V,
        clock,
        log,
        cases + FRAG_CHECK_CASES,
        True,
        {"cuda-lut", "cuda-frag", "cuda-frag-nr2"},
    )
    rows += _check_linear(dev, log, linear_shape)
    return rows


def _check_cases(dev, V, clock, log, cases, cuda_pass, only):
    rows = []
    for ci, (N, M, d, n, k, rank, toks) in enumerate(cases):
        L = make_layer(N, M, d, n, k, rank, dev, seed=10 + ci)
        for T in toks:
            x = torch.randn(T, M, device=dev).half()
            ref = pq_gemv_reference(x, *layer_args(L))
            for name, (fn, applies) in V.items():
                if name not in only:
                    continue
                if name.startswith("cuda") != cuda_pass or not applies(T, L["geo"]):
                    continue
                case = dict(shape=[N, M], d=d, n=n, k=k, rank=rank, T=T, variant=name)
                try:
                    poison(dev)
                    y = fn(x, L, True)
                    e = rel_err(y, ref)
                    nan = bool(torch.isnan(y).any())
                    rows.append(dict(case, rel_err=e, nan=nan, ok=(e < TOL and not nan)))
                except Exception as ex:  # noqa: BLE001
                    rows.append(dict(case, ok=False, error=f"{type(ex).__name__}: {ex}"[:300]))
                    log(f"CHECK ERROR {name} {N}x{M} T={T}: {ex}")
            if clock.left() < 230:
                log("checks cut short by the time budget")
                return rows
    return rows


def _check_dequant_exact(dev, log, cases):
    """The CUDA dequantize == Ŵᵀ of the reference (a pure gather), every launch shape of the recipe."""
    from athena_runtime.kernels import dequant as cdq

    rows = []
    for ci, (N, M, d, n, k, rank, _) in enumerate(cases):
        L = make_layer(N, M, d, n, k, rank, dev, seed=50 + ci)
        geo = L["geo"]
        if cdq.supports(geo) is not None:
            continue
        ref = layout.dequantize_reference(L["qweight"], L["codebook"], geo).t().contiguous()
        for slab in cdq.slab_widths(geo.bits, d):
            for rpc in (None,) + Tuning().dequant_rows:
                name = f"cuda-dqT-s{slab}-r{rpc or 'auto'}"
                try:
                    poison(dev)
                    out = cdq.dequantize_t(L["qweight"], L["codebook"], geo, slab_w=slab, rows_per_chunk=rpc)
                    same = bool(torch.equal(out, ref))
                    rows.append(
                        dict(
                            shape=[N, M],
                            d=d,
                            n=n,
                            k=k,
                            rank=rank,
                            T=0,
                            variant=name,
                            rel_err=0.0 if same else rel_err(out, ref),
                            nan=bool(torch.isnan(out).any()),
                            ok=same,
                        )
                    )
                except Exception as ex:  # noqa: BLE001
                    rows.append(
                        dict(
                            shape=[N, M],
                            d=d,
                            n=n,
                            k=k,
                            rank=rank,
                            T=0,
                            variant=name,
                            ok=False,
                            error=f"{type(ex).__name__}: {ex}"[:300],
                        )
                    )
                    log(f"CHECK ERROR {name} {N}x{M}: {ex}")
    return rows


def _check_linear(dev, log, linear_shape):
    """PQLinear: the auto path, and a CUDA-graph capture replayed on new input."""
    rows = []
    Nl, Ml = linear_shape
    L = make_layer(Nl, Ml, 2, 64, 4096, 41, dev, seed=99)
    layer = PQLinear(
        L["geo"], L["qweight"], L["codebook"], L["A"], L["B"], None, path=None if dev.type == "cuda" else "triton-gemv"
    )
    for T in (1, 4, 16, 64, 300):
        try:
            path = layer.backend_for(T)
            x = torch.randn(T, Ml, device=dev).half()
            ref = pq_gemv_reference(x, *layer_args(L))
            y = layer(x)
            row = dict(
                shape=[Nl, Ml],
                T=T,
                variant=f"PQLinear[{path}]",
                rel_err=rel_err(y, ref),
                nan=bool(torch.isnan(y).any()),
            )
            if dev.type == "cuda":
                static_x = torch.zeros_like(x)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    layer(static_x)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    static_y = layer(static_x)
                x2 = torch.randn(T, Ml, device=dev).half()
                static_x.copy_(x2)
                g.replay()
                torch.cuda.synchronize()
                row["graph_rel_err"] = rel_err(static_y, pq_gemv_reference(x2, *layer_args(L)))
            row["ok"] = row["rel_err"] < TOL and not row["nan"] and row.get("graph_rel_err", 0) < TOL
            rows.append(row)
        except Exception as ex:  # noqa: BLE001
            rows.append(
                dict(shape=[Nl, Ml], T=T, variant="PQLinear", ok=False, error=f"{type(ex).__name__}: {ex}"[:300])
            )
            log(f"CHECK ERROR PQLinear T={T}: {ex}")
    return rows


# ------------------------------------------------------------------------------------ timing
def time_call(fn, sets, dev):
    """Median µs per call (do_bench: L2 flushed before each call; weight sets rotated)."""
    if dev.type != "cuda":
        t0 = time.perf_counter()
        fn(sets[0])
        return (time.perf_counter() - t0) * 1e6
    import triton

    i = [0]

    def call():
        s = sets[i[0] % len(sets)]
        i[0] += 1
        fn(s)

    return triton.testing.do_bench(call, warmup=5, rep=30, return_mode="median") * 1e3


def graph_of(fn, sets):
    """fn over all weight sets, back to back, captured as one CUDA graph (after a warm-up pass on a side stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for st in sets:
            fn(st)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for st in sets:
            fn(st)
    return g


def time_graph(fn, sets, dev, replays=20):
    """µs per call when calls over all weight sets are replayed back to back as one CUDA graph."""
    if dev.type != "cuda":
        return float("nan")
    g = graph_of(fn, sets)
    for _ in range(3):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(sets))


def copy_bandwidth(dev):
    if dev.type != "cuda":
        return float("nan")
    import triton

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    a.random_(0, 255)
    # a long warm-up: measured first on a cold GPU (clocks still ramping) it once read 1229 GB/s, not ~2900
    ms = min(triton.testing.do_bench(lambda: b.copy_(a), warmup=300, rep=200, return_mode="median") for _ in range(2))
    return 2 * n / (ms * 1e-3) / 1e9  # GB/s, bytes read + written


def plan(smoke, name="full"):
    """(priority order) list of (T, variant names, lowrank flags, graph?)."""
    if name == "summary":  # what BENCHMARKS.md reports: PQLinear (the runtime's chosen path) vs cuBLAS
        return (
            [(1, ["cublas", "PQLinear"], (True, False), True)]
            + [(t, ["cublas", "PQLinear"], (True,), True) for t in (2, 4, 8, 16, 32, 64, 256)]
            + [(2048, ["cublas", "PQLinear", "dequant+cublas-rows"], (True, False), True)]
        )
    if name == "frag":  # batches of decode tokens: the fragment-lookup kernel against the others
        names = ["cublas", "PQLinear", "cuda-frag", "cuda-frag-nr2", "cuda-lut"]
        return [(t, names, (True,), True) for t in (64, 16, 8, 4, 2, 1, 32)]
    if name == "prefill":  # 2048 tokens: cuBLAS vs the dequantize-then-cuBLAS paths, then the kernels alone
        from athena_runtime.kernels import dequant as cdq

        sweep = [f"cuda-dqT-s{s}-r{r}" for s in cdq.MAIN_SLABS for r in Tuning().dequant_rows]
        return [
            (
                2048,
                [
                    "cublas",
                    "dequant+cublas",
                    "cuda-dq+cublas-fold",
                    "cuda-dq+cublas-rows",
                    "cuda-dq+cublas-addmm",
                    "PQLinear",
                ],
                (True,),
                False,
            ),
            (2048, ["dequant+cublas", "cuda-dq+cublas", "PQLinear"], (False,), False),
            (2048, ["triton-dqT", "cuda-dqT"] + sweep, (False,), False),
        ]
    if name == "t1":  # one token: the decode launch (1024- vs 2048-row chunks), with and without low-rank
        return [
            (
                1,
                [
                    "cublas",
                    "PQLinear",
                    "cuda-lut-s8-r1024",
                    "cuda-lut-s8-r2048",
                    "cuda-lut-s16-r1024",
                    "cuda-lut-s16-r2048",
                ],
                (True, False),
                True,
            )
        ]
    if name == "mid":  # a batch of decode tokens: lookup table vs tensor cores vs dequantize + cuBLAS
        names = ["cublas", "PQLinear", "cuda-lut", "cuda-frag", "dequant+cublas"]
        return [(t, names, (True,), True) for t in (64, 16, 8, 32, 4, 2)] + [
            (2048, ["cublas", "PQLinear", "dequant+cublas-addmm"], (True, False), False)
        ]
    if name == "focus":  # the decode launch with low-rank, and the dequantize(+low-rank) + cuBLAS path
        dqt = [
            "dequantT128x16w4+cublas",
            "dequantT128x32w8+cublas",
            "dequantT256x16w8+cublas",
            "dequantT64x32w4+cublas",
            "dequantT128x8w4+cublas",
        ]
        mid = ["cublas", "PQLinear", "cuda-lut", "dequantT128x16w4+cublas", "dequantT256x16w8+cublas"]
        return [
            (
                1,
                [
                    "cublas",
                    "PQLinear",
                    "cuda-lut-s8-r2048",
                    "cuda-lut-s8-r1024",
                    "cuda-lut-s16-r1024",
                    "cuda-lut-s16-r2048",
                ],
                (True, False),
                True,
            ),
            (2048, ["cublas", "PQLinear", "dequant+cublas"] + dqt, (True, False), False),
            (8, mid, (True,), True),
            (4, mid, (True,), True),
            (16, mid, (True,), True),
            (64, mid, (True,), True),
            (2, mid, (True,), True),
            (32, mid, (True,), True),
        ]
    if smoke:
        return [
            (1, ["cublas", "triton-lut", "PQLinear"], (True, False), True),
            (64, ["cublas", "dequantT64x32w4+cublas", "PQLinear"], (True,), False),
        ]
    sweep = [f"cuda-lut-s{s}-r{r}" for s in (4, 8, 16) for r in (1024, 2048, 4096)] + [
        "triton-lut-s4",
        "triton-lut-s8",
        "triton-lut-s16",
    ]
    dq = ["dequantT128x16w4+cublas", "dequantT128x32w8+cublas", "dequantT64x32w4+cublas"]
    return [
        (1, ["cublas", "cuda-lut", "triton-lut", "PQLinear"], (True, False), True),
        (2048, ["cublas", "PQLinear"] + dq, (True, False), False),
        (1, sweep, (False,), True),
        (4, ["cublas", "cuda-lut", "triton-lut", "PQLinear"], (True, False), True),
        (16, ["cublas", "cuda-lut", "PQLinear"], (True, False), True),
        (8, ["cublas", "cuda-lut", "PQLinear"], (True,), True),
        (2, ["cublas", "cuda-lut", "PQLinear"], (True,), True),
        (64, ["cublas", "PQLinear", "cuda-frag"], (True,), True),
        (256, ["cublas", "PQLinear"], (True,), False),
    ]


def run_timings(dev, V, clock, log, shapes, smoke, copy_gbs, l2_bytes, plan_name="full"):
    rows = []
    layers, dense = {}, {}
    for N, M in shapes:
        rank = max(1, round(0.01 * min(N, M)))
        layers[(N, M)] = (
            [make_layer(N, M, RECIPE["d"], RECIPE["n"], RECIPE["k"], rank, dev, seed=N + M)]
            if smoke
            else weight_sets(N, M, rank, dev, l2_bytes, seed=N + M)
        )
        for L in layers[(N, M)]:  # the module the runtime uses (path chosen per call)
            L["linear"] = PQLinear(L["geo"], L["qweight"], L["codebook"], L["A"], L["B"], None)
            L["linear_nolr"] = PQLinear(L["geo"], L["qweight"], L["codebook"], None, None, None)
        n_dense = 1 if smoke else max(2, min(8, math.ceil(3 * l2_bytes / (N * M * 2))))
        dense[(N, M)] = [torch.randn(N, M, device=dev).half() * 0.02 for _ in range(n_dense)]
    for T, names, lowranks, graph in plan(smoke, plan_name):
        for N, M in shapes:
            x = torch.randn(T, M, device=dev).half()
            for name in names:
                for lr in lowranks:
                    if clock.left() < 40:
                        log(f"timings cut short by the time budget at T={T} {name}")
                        return rows
                    try:
                        if name == "cublas":
                            if not lr and False in lowranks:
                                continue  # cuBLAS has no low-rank term: time it once
                            sets = dense[(N, M)]
                            fn = lambda W, x=x: x @ W.t()  # noqa: E731
                            nbytes = N * M * 2 + T * (N + M) * 2
                        else:
                            fnv, applies = V[name]
                            if not applies(T, layers[(N, M)][0]["geo"]):
                                continue
                            sets = layers[(N, M)]
                            fn = lambda L, x=x, fnv=fnv, lr=lr: fnv(x, L, lr)  # noqa: E731
                            alone = name.startswith(DEQUANT_ALONE)
                            nbytes = (dequant_alone_bytes if alone else compressed_bytes)(sets[0], T, lr)
                        us = time_call(fn, sets, dev)
                        row = dict(
                            shape=[N, M],
                            T=T,
                            variant=name,
                            lowrank=lr if name != "cublas" else None,
                            us=us,
                            bytes=nbytes,
                            gbs=nbytes / (us * 1e-6) / 1e9,
                        )
                        row["pct_copy_bw"] = 100 * row["gbs"] / copy_gbs if copy_gbs == copy_gbs else None
                        if graph and clock.left() > 60:
                            row["graph_us"] = time_graph(fn, sets, dev)
                        rows.append(row)
                        log(
                            f"{clock} T={T:5d} {N:6d}x{M:<6d} {name:22s} lr={str(lr):5s} {us:9.1f} us"
                            + (f"  graph {row['graph_us']:8.1f} us" if "graph_us" in row else "")
                        )
                    except Exception as ex:  # noqa: BLE001
                        rows.append(
                            dict(shape=[N, M], T=T, variant=name, lowrank=lr, error=f"{type(ex).__name__}: {ex}"[:300])
                        )
                        log(f"TIMING ERROR T={T} {N}x{M} {name}: {ex}")
    return rows


# ------------------------------------------------------------------------------------ report
def summarize(checks, timings, copy_gbs, meta):
    cub = {(tuple(r["shape"]), r["T"]): r for r in timings if r["variant"] == "cublas" and "us" in r}
    for r in timings:
        c = cub.get((tuple(r["shape"]), r["T"]))
        if c and "us" in r:
            r["speedup"] = c["us"] / r["us"]
            if "graph_us" in r and "graph_us" in c:
                r["graph_speedup"] = c["graph_us"] / r["graph_us"]
    lines = [
        f"# PQ kernels: {meta['device']}, {meta['date']}, commit {meta['commit']}",
        "",
        f"copy bandwidth (read+write): {copy_gbs:.0f} GB/s; recipe d=2 n=64 k=4096, rank 1%, no bias",
        "",
        "## checks (rel. Frobenius error vs fp32 reference; tolerance 4e-3)",
        "",
        "| shape | d | n | k | T | variant | rel err | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in checks:
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r.get('d', '')} | {r.get('n', '')} | {r.get('k', '')} | {r['T']} "
            f"| {r['variant']} | {r.get('rel_err', float('nan')):.2e}"
            f"{' graph ' + format(r['graph_rel_err'], '.1e') if 'graph_rel_err' in r else ''} "
            f"| {'ok' if r['ok'] else 'FAIL ' + r.get('error', 'nan' if r.get('nan') else 'err')} |"
        )
    lines += [
        "",
        "## timings (do_bench median, µs; speedup = cuBLAS fp16 time / variant time; graph = CUDA-graph replay)",
        "",
        "| W [N x M] | T | variant | low-rank | µs | speedup | GB/s | % copy BW | graph µs | graph speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in timings:
        if "us" not in r:
            lines.append(
                f"| {r['shape'][0]}x{r['shape'][1]} | {r['T']} | {r['variant']} | {r.get('lowrank')} "
                f"| ERROR {r.get('error', '')} |||||"
            )
            continue
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['T']} | {r['variant']} | {r['lowrank']} | {r['us']:.1f} "
            f"| {r.get('speedup', float('nan')):.2f} | {r['gbs']:.0f} | {r['pct_copy_bw'] or float('nan'):.0f} "
            f"| {r.get('graph_us', float('nan')):.1f} | {r.get('graph_speedup', float('nan')):.2f} |"
        )
    return "\n".join(lines) + "\n"


def short_table(checks, timings):
    out = []
    bad = [r for r in checks if not r["ok"]]
    out.append(
        f"CHECKS: {len(checks) - len(bad)}/{len(checks)} ok; max rel err "
        f"{max((r.get('rel_err', 0) for r in checks), default=0):.2e}"
    )
    for r in bad[:12]:
        out.append(f"  FAIL {r['variant']} {r['shape']} T={r['T']} {r.get('rel_err', '')} {r.get('error', '')[:120]}")
    out.append("T     W[N x M]      variant                lr     us  speedup    GB/s  %copyBW  graph_us g_speedup")
    for r in timings:
        if "us" not in r or r["variant"] == "cublas":
            continue
        out.append(
            f"{r['T']:<5d} {r['shape'][0]:>5d}x{r['shape'][1]:<6d} {r['variant']:22s} {str(r['lowrank'])[0]} "
            f"{r['us']:8.1f} {r.get('speedup', float('nan')):7.2f} {r['gbs']:7.0f} "
            f"{r['pct_copy_bw'] or float('nan'):7.0f} "
            f"{r.get('graph_us', float('nan')):9.1f} {r.get('graph_speedup', float('nan')):7.2f}"
        )
    cub = [r for r in timings if r["variant"] == "cublas" and "us" in r]
    out.append(
        "cuBLAS fp16 us: "
        + " ".join(
            f"{r['shape'][0]}x{r['shape'][1]}@{r['T']}={r['us']:.1f}"
            + (f"/g{r['graph_us']:.1f}" if "graph_us" in r else "")
            for r in cub
        )
    )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for kernels.json / kernels.md / log")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-friendly (TRITON_INTERPRET=1)")
    ap.add_argument("--budget", type=float, default=390.0, help="seconds before the script wraps up")
    ap.add_argument("--commit", default="", help="git commit of the tree (the device copy has no .git)")
    ap.add_argument(
        "--plan",
        default="full",
        choices=("full", "focus", "t1", "mid", "summary", "frag", "prefill"),
        help="which timings (focus: decode launch with low-rank, dequantize + cuBLAS, 2-64 tokens; "
        "frag: 1-64 tokens, fragment-lookup kernel vs lookup table; "
        "prefill: 2048 tokens, Triton vs CUDA dequantize + cuBLAS, the dequantize kernels alone)",
    )
    ap.add_argument("--no-checks", action="store_true", help="skip the correctness checks")
    ap.add_argument("--shapes", default=None, help="W shapes NxM,NxM,... (default: the four 7B shapes)")
    ap.add_argument(
        "--family",
        default=None,
        help="instead of --shapes: the layer shapes of these model families "
        "(comma-separated bench.random_checkpoint.FAMILIES names, e.g. llama3-8b,qwen2.5-7b,mistral-7b,gemma3-12b)",
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    clock = Clock(args.budget)
    logf = open(os.path.join(args.out, "bench_log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # compile the CUDA kernels (NVRTC) in the background while the Triton kernels compile and run
    from athena_runtime.kernels import dequant, lut

    g7 = PQGeometry(4096, 4096, 2, 64, 4096)
    build, build_dq = {"ok": None, "err": None}, {"ok": None, "err": None}

    def _build(load, state):
        try:
            load()
            state["ok"], state["seconds"] = True, round(time.perf_counter() - t0, 2)  # first use: compile or cache
        except Exception as e:  # noqa: BLE001
            state["ok"], state["err"] = False, f"{type(e).__name__}: {e}"[-2000:]

    t0 = time.perf_counter()  # noqa: F841 - read by _build
    th = threading.Thread(target=_build, args=(lambda: lut._kernel(lut.kernel_name(1, 6, 4), 0), build), daemon=True)
    th_dq = threading.Thread(
        target=_build,
        args=(lambda: [dequant._kernel(f, n, 0, m) for f, n, m in dequant.kernel_names(g7, 48)], build_dq),
        daemon=True,
    )
    if dev.type == "cuda":
        th.start()
        th_dq.start()

    def built(thread, state):
        if dev.type != "cuda":
            return False
        if state["ok"] is None:
            thread.join(timeout=max(1.0, clock.left() - 120))
        return bool(state["ok"])

    def cuda_ok():
        return built(th, build)

    def cuda_dq_ok():
        return built(th_dq, build_dq)

    commit = (
        args.commit
        or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        or "unknown"
    )
    meta = dict(
        device=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
        torch=torch.__version__,
        command=" ".join(sys.argv),
    )
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) if dev.type == "cuda" else 1 << 20
    log(f"{clock} {meta}")
    V = variants(cuda_ok, cuda_dq_ok)
    copy_gbs = copy_bandwidth(dev)
    log(f"{clock} copy bandwidth {copy_gbs:.0f} GB/s (read+write)")

    checks, timings = [], []
    try:
        if args.no_checks:
            pass
        elif args.smoke:
            checks = run_checks(dev, V, clock, log, SMOKE_CHECK_CASES, linear_shape=(64, 40))
        else:
            checks = run_checks(dev, V, clock, log, cuda_dq_ok=cuda_dq_ok)
        log(
            f"{clock} checks done: {sum(r['ok'] for r in checks)}/{len(checks)} ok; cuda build: {build}, "
            f"dequantize build: {build_dq}"
        )
        shapes = [(64, 96), (128, 256)] if args.smoke else SHAPES
        if args.shapes:
            shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
        if args.family:
            shapes = family_shapes(args.family.split(","))
            log(f"{clock} shapes of {args.family}: {shapes}")
        timings = run_timings(dev, V, clock, log, shapes, args.smoke, copy_gbs, l2, args.plan)
    except Exception:  # noqa: BLE001 - report what we have
        log(traceback.format_exc())
    meta["cuda_build"] = {k: v for k, v in build.items()}
    meta["cuda_dequant_build"] = dict(build_dq)
    md = summarize(checks, timings, copy_gbs, meta)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(meta=meta, copy_gbs=copy_gbs, checks=checks, timings=timings), f, indent=1)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(md)
    log(f"{clock} done")
    print("\n" + short_table(checks, timings), flush=True)


if __name__ == "__main__":
    main()
