"""Paged decode attention on a Llama-2-7B-shaped KV cache: µs per layer call of `paged_attention_decode`
for each KV format, batch size, context length and split count (flash-decoding), one GPU.

    python -m bench.attention [--formats fp16,int8,int4] [--batches 1,16,64] [--contexts 256,1024,4096]
                              [--splits 1,auto] [--tile-tokens 64] [--num-warps 4] [--json]
    TRITON_INTERPRET=1 python -m bench.attention --smoke      (CPU: the plumbing only, tiny shapes)

Set-up: one layer of 32 KV heads x head_dim 128 (32 query heads: MHA; --heads for GQA), 16-token
pages, random K/V written through `KVCache.write` (int4 with a random key basis, as the model runner
calibrates one), the blocks shuffled. Every sequence of a batch holds `context` keys; block tables are
--table-width pages wide (default: the largest context, as the runner's CUDA graphs take
max_model_len), so "auto" gives the split count the runner would get.

Timing: the calls over `sets` disjoint groups of sequences are captured in one CUDA graph, enough
groups that their K/V exceed twice the L2 cache (a decode step's layers each read K/V no one read just
before), and triton.testing.do_bench times replays of the graph (median); µs per call = replay time /
sets. --no-graph times plain calls instead (Python launch overhead included). GB/s = bytes of K/V
(scales included) read per call / time. Every configuration is also checked against
`paged_attention_reference` (max |error|, output in fp16).

--tile-tokens and --num-warps override Tuning.decode_tile_tokens and decode_warps (kernels/tuning.py) for a
sweep (several values: every combination is timed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

MAX_SETS = 64  # at most this many disjoint sequence groups in one graph


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _splits(text: str) -> list[int | None]:
    return [None if v == "auto" else int(v) for v in text.split(",") if v]


def random_basis(num_kv_heads: int, head_dim: int, seed: int):
    """A random key basis like the tests': offsets of the keys' size, channel scales in [0.5, 1.5]."""
    from athena_runtime.kv_cache import KeyBasis

    gen = torch.Generator().manual_seed(seed)
    shape = (1, num_kv_heads, head_dim)
    return KeyBasis(
        offset=torch.randn(shape, generator=gen) * 2,
        scale=torch.rand(shape, generator=gen) + 0.5,
        sink=torch.randn(shape, generator=gen) * 3,
    )


def build_cache(fmt: str, tokens: int, args, dev):
    """One layer holding `tokens` random keys and values (every block written), in `fmt`."""
    from athena_runtime.kv_cache import KVCache

    num_blocks = -(-tokens // args.block_size)
    cache = KVCache.create(fmt, 1, num_blocks, args.block_size, args.kv_heads, args.head_dim, dev)
    if cache.needs_key_basis:
        cache.set_key_basis(random_basis(args.kv_heads, args.head_dim, seed=1))
    gen = torch.Generator(device=dev).manual_seed(0)
    total, chunk = num_blocks * args.block_size, 8192
    for start in range(0, total, chunk):
        slots = torch.arange(start, min(total, start + chunk), device=dev)
        k = torch.randn(len(slots), args.kv_heads, args.head_dim, generator=gen, device=dev) * 2
        v = torch.randn(len(slots), args.kv_heads, args.head_dim, generator=gen, device=dev)
        cache.write(0, k, v, slots, slots % 4096 + 1)  # positions > 0: no sink rows among the stored keys
    return cache


def block_tables(cache, batch: int, context: int, sets: int, width: int, dev, seed: int) -> list[torch.Tensor]:
    """`sets` tables [batch, width], their blocks disjoint and shuffled over the cache, null-padded."""
    pages = -(-context // cache.block_size)
    need = sets * batch * pages
    if need > cache.num_blocks:
        raise ValueError(f"cache of {cache.num_blocks} blocks holds no {sets} x {batch} x {pages} blocks")
    perm = torch.randperm(cache.num_blocks, generator=torch.Generator().manual_seed(seed))[:need]
    perm = perm.view(sets, batch, pages).to(torch.int32)
    tables = torch.full((sets, batch, width), cache.null_block, dtype=torch.int32)
    tables[:, :, :pages] = perm
    return list(tables.to(dev).unbind(0))


def time_calls(calls, use_graph: bool) -> float:
    """µs per call: replays of one CUDA graph of all `calls` (do_bench median) or plain calls in turn."""
    import triton

    if not torch.cuda.is_available():  # --smoke on CPU: one interpreted pass
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e6 / len(calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up off the capture
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3 / len(calls)
    i = [0]

    def call():
        calls[i[0] % len(calls)]()
        i[0] += 1

    return triton.testing.do_bench(call, warmup=10, rep=100, return_mode="median") * 1e3


def run(args, dev, log) -> list[dict]:
    from athena_runtime.kernels import paged_attention as pa
    from athena_runtime.kernels.tuning import Tuning
    from athena_runtime.kv_cache import head_bytes

    tuning = Tuning.for_device(dev)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20) if dev.type == "cuda" else 0
    width = args.table_width or -(-max(args.contexts) // args.block_size)
    if width * args.block_size < max(args.contexts):
        raise ValueError(f"--table-width {width} pages holds no {max(args.contexts)}-token context")
    sm_scale = args.head_dim**-0.5
    rows = []
    for fmt in args.formats:
        token_bytes = 2 * args.kv_heads * head_bytes(fmt, args.head_dim)  # K and V of one token, one layer
        plan = []
        for batch in args.batches:
            for context in args.contexts:
                sets = max(1, min(MAX_SETS, math.ceil(2 * l2 / (batch * context * token_bytes))))
                plan.append((batch, context, sets))
        blocks = max(s * b * -(-c // args.block_size) for b, c, s in plan)
        cache = build_cache(fmt, blocks * args.block_size, args, dev)
        log(f"{fmt}: cache of {cache.num_blocks} blocks built")
        for batch, context, sets in plan:
            tables = block_tables(cache, batch, context, sets, width, dev, seed=batch * 7919 + context)
            seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
            qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
            dtype = torch.float16 if dev.type == "cuda" else torch.float32
            q = cache.query(0, torch.randn(batch, args.heads, args.head_dim, device=dev).to(dtype))
            want = pa.paged_attention_reference(q, cache, 0, tables[0], seq_lens, qsl, sm_scale).float()
            for tile in args.tile_tokens:
                for warps in args.num_warps:
                    tun = dataclasses.replace(tuning, decode_tile_tokens=tile, decode_warps=warps)
                    for splits in args.splits:
                        actual = splits or pa.decode_num_splits(batch, args.kv_heads, width, args.block_size, tile, tun)
                        row = dict(
                            fmt=fmt,
                            batch=batch,
                            context=context,
                            splits="auto" if splits is None else splits,
                            num_splits=actual,
                            tile_tokens=tile,
                            num_warps=warps,
                            sets=sets,
                        )
                        try:
                            got = pa.paged_attention_decode(
                                q, cache, 0, tables[0], seq_lens, qsl, sm_scale, num_splits=splits, tuning=tun
                            ).float()
                            row["max_err"] = float((got - want).abs().max())
                            row["nan"] = bool(torch.isnan(got).any())
                            calls = [
                                lambda t=t, c=cache, n=splits, q=q, sl=seq_lens, qs=qsl, u=tun: (
                                    pa.paged_attention_decode(q, c, 0, t, sl, qs, sm_scale, num_splits=n, tuning=u)
                                )
                                for t in tables
                            ]
                            row["us"] = time_calls(calls, not args.no_graph)
                            row["gb_s"] = batch * context * token_bytes / (row["us"] * 1e-6) / 1e9
                        except Exception as ex:  # noqa: BLE001 - report it in the table, go on
                            row["error"] = f"{type(ex).__name__}: {ex}"[:300]
                        rows.append(row)
                        log(format_row(row))
        del cache
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


HEADER = (
    f"{'fmt':5s} {'batch':>5s} {'context':>7s} {'splits':>6s} {'n':>3s} {'tile':>4s} {'warps':>5s} "
    f"{'µs':>8s} {'GB/s':>7s} {'max_err':>8s}"
)


def format_row(r: dict) -> str:
    head = (
        f"{r['fmt']:5s} {r['batch']:5d} {r['context']:7d} {str(r['splits']):>6s} {r['num_splits']:3d} "
        f"{r['tile_tokens']:4d} {r['num_warps']:5d}"
    )
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    return f"{head} {r['us']:8.1f} {r['gb_s']:7.0f} {r['max_err']:8.1e}" + (" NaN!" if r["nan"] else "")


def summary(rows: list[dict]) -> str:
    """µs of one split against the automatic choice, per format, batch, context, tile and warps."""
    timed = {
        (r["fmt"], r["batch"], r["context"], r["tile_tokens"], r["num_warps"], r["splits"]): r
        for r in rows
        if "us" in r
    }
    lines = [
        f"{'fmt':5s} {'batch':>5s} {'context':>7s} {'tile':>4s} {'warps':>5s} {'1 split µs':>10s} "
        f"{'auto µs':>8s} {'n':>3s} {'speedup':>7s}"
    ]
    for key, one in timed.items():
        auto = timed.get(key[:-1] + ("auto",))
        if key[-1] == 1 and auto is not None:
            lines.append(
                f"{key[0]:5s} {key[1]:5d} {key[2]:7d} {key[3]:4d} {key[4]:5d} {one['us']:10.1f} "
                f"{auto['us']:8.1f} {auto['num_splits']:3d} {one['us'] / auto['us']:6.2f}x"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", type=lambda s: s.split(","), default=["fp16", "int8", "int4"], help="KV formats")
    ap.add_argument("--batches", type=_ints, default=[1, 16, 64], help="sequences per call")
    ap.add_argument("--contexts", type=_ints, default=[256, 1024, 4096], help="keys per sequence")
    ap.add_argument("--splits", type=_splits, default=[1, None], help="split counts: integers or 'auto'")
    ap.add_argument("--tile-tokens", type=_ints, default=None, help="keys per loop step (default: the module's)")
    ap.add_argument("--num-warps", type=_ints, default=None, help="warps per program (default: the module's)")
    ap.add_argument("--heads", type=int, default=32, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=32, help="KV heads")
    ap.add_argument("--head-dim", type=int, default=128, help="head dimension")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV page")
    ap.add_argument("--table-width", type=int, default=0, help="block-table pages (0: the largest context's)")
    ap.add_argument("--no-graph", action="store_true", help="time plain calls, not CUDA-graph replays")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--json", action="store_true", help="print every row as one JSON object at the end")
    args = ap.parse_args(argv)
    if args.smoke:  # tiny shapes (batches and contexts as given, if given)
        args.heads, args.kv_heads, args.head_dim = 4, 2, 64
        args.batches = args.batches if "--batches" in (argv or sys.argv) else [1, 3]
        args.contexts = args.contexts if "--contexts" in (argv or sys.argv) else [40, 100]
    if not torch.cuda.is_available():
        if not args.smoke:
            print(
                "bench.attention needs a CUDA GPU (--smoke runs tiny shapes on CPU under TRITON_INTERPRET=1)",
                file=sys.stderr,
            )
            return 1
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels module imports Triton
    from athena_runtime.kernels import paged_attention as pa
    from athena_runtime.kernels.tuning import Tuning

    if pa.triton is None:
        print("bench.attention needs Triton", file=sys.stderr)
        return 1
    args.tile_tokens = args.tile_tokens or [Tuning().decode_tile_tokens]
    args.num_warps = args.num_warps or [Tuning().decode_warps]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    how = "interpreted calls" if dev.type != "cuda" else "plain calls" if args.no_graph else "CUDA-graph replays"
    print(
        f"{device}; {args.heads} heads, {args.kv_heads} KV heads, head_dim {args.head_dim}, "
        f"{args.block_size}-token pages; {how}",
        flush=True,
    )
    print(HEADER, flush=True)
    rows = run(args, dev, lambda msg: print(msg, flush=True))
    print("\n" + summary(rows), flush=True)
    if args.json:
        import triton

        print(
            json.dumps(
                dict(
                    device=device,
                    torch=torch.__version__,
                    triton=triton.__version__,
                    graph=not args.no_graph,
                    heads=args.heads,
                    kv_heads=args.kv_heads,
                    head_dim=args.head_dim,
                    block_size=args.block_size,
                    rows=rows,
                )
            )
        )
    bad = [r for r in rows if "error" in r or r.get("nan") or r.get("max_err", 0) > 1e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
