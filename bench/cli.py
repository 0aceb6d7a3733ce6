"""`athena bench WHAT [ARGS...]`: the benchmark scripts of `bench/`, reachable from the console script.

Each benchmark is a module with `main(argv) -> int`; arguments after WHAT are passed through.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "kernels": ("bench.kernels", "PQ decode/prefill kernels vs cuBLAS fp16 at 7B shapes (GPU)"),
    "quantize-7b": ("bench.quantize_7b", "seconds and peak memory to quantize a 7B-shaped layer (GPU)"),
    "quality": (
        "bench.quantize_quality",
        "perplexity vs bits: reference, RTN, GPTQ, Athena, llama.cpp's quants (llama-quantize + imatrix, built "
        "here) on both real models (SmolLM2-135M, Gemma-3-270M)",
    ),
    "decode": ("bench.decode", "end-to-end batch-1 decode tok/s: PQ vs fp16 vs HF transformers (GPU)"),
    "attention": ("bench.attention", "paged decode attention µs per call: KV format x batch x context x splits (GPU)"),
    "engine": ("bench.engine", "engine throughput vs concurrent streams per KV format (GPU)"),
    "prefix-cache": ("bench.prefix_cache", "time to first token of a chat's second turn, prefix cache on vs off"),
    "serve": ("bench.serve", "load test of an OpenAI-compatible server: TTFT, TPOT, throughput vs concurrency"),
    "kv-quality": ("bench.kv_quality", "held-out perplexity and bytes per token for each KV-cache format"),
    "cpu-decode": ("bench.cpu_decode", "CPU decode ms per step: reference vs fast path, A/B in one process"),
    "peers": (
        "bench.peers",
        "batch-1 decode tok/s, % of bandwidth limit, bits/weight: Athena vs llama.cpp (built here) vs torch int4 "
        "tinygemm, same GPU (GPU; --shape tiny --device cpu checks the plumbing)",
    ),
    "serve-peers": (
        "bench.serve_peers",
        "bench serve against athena serve and llama.cpp llama-server on the CPU, same model",
    ),
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (athena bench WHAT --help)")
    p.add_argument("what", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of that benchmark")
    p.set_defaults(func=_run)


def _run(args) -> int:
    module = importlib.import_module(BENCHMARKS[args.what][0])
    return int(module.main(args.args) or 0)
