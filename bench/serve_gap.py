"""Issue 17's three serving goals on one GPU, in one table: the engine alone against the same engine behind
the HTTP server, on the random 7B checkpoint.

    python -m bench.serve_gap [--workdir /tmp/w] [--kv-cache int4] [--streams 64] [--new 128] [--prompt 128]
                              [--ttft-prompt 170] [--repeats 5] [--json]

One ModelRunner (CUDA graphs captured up front) serves both halves, in this order:
1. engine alone: `bench.engine.run_level` (EngineCore, no threads, no HTTP) at 1 and `--streams` streams,
   greedy, EOS ignored; TPOT is its mean time between a stream's tokens. TTFT: a `--ttft-prompt`-token
   prompt (random ids, max_tokens 1) added to the idle engine until its output, median of `--repeats`;
2. server: `athena serve`'s app and uvicorn on 127.0.0.1 around `AsyncEngine` on the same runner
   (`bench.serve_overhead.ServerThread`); TTFT: the same prompt as token ids, streamed, until the first
   event, from a client in a child process, median of `--repeats`; then `athena bench serve` in a child process,
   completions, temperature 0,
   `--prompt`/`--new` tokens, at concurrency 1 (8 requests) and `--streams` (`--streams` requests), the latter
   again with each `--prefill-chunks` value, with every step's outputs handed to the event loop at once (not held
   for the next step's launch) and with each `--switch-intervals-ms` (a new AsyncEngine on the same runner).
Goals (issue 17): server tok/s >= 90% of the engine's at `--streams`; ITL p50 <= 1.5x TPOT at one stream;
TTFT of the `--ttft-prompt`-token prompt <= 30 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.ttft_client import engine_ttft_ms, server_ttft_in_child

log = logging.getLogger("bench.serve_gap")


def bench_serve(url: str, model: str, concurrency: int, requests: int, prompt: int, new: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "bench",
        "serve",
        "--base-url",
        url,
        "--model",
        model,
        "--endpoint",
        "completions",
        "--concurrency",
        str(concurrency),
        "--num-prompts",
        str(requests),
        "--input-len",
        str(prompt),
        "--output-len",
        str(new),
        "--no-progress",
        "--json",
        "--extra-body",
        '{"temperature": 0}',
    ]  # greedy, as bench.engine samples
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    if done.returncode != 0:
        raise RuntimeError(f"athena bench serve exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["levels"][0]


def _variant_row(what: str, r: dict, engine_n: dict) -> tuple:
    """A table row for the many-stream server level run again with one setting changed."""
    tok_s = r["output_tokens_per_s"]
    return (
        f"  the same, {what}",
        "",
        f"server {tok_s:.0f} ({100 * tok_s / engine_n['tok_s']:.0f}%; TTFT p50 {r['ttft_ms']['p50']:.0f} ms)",
        ">= 90%",
        tok_s >= 0.9 * engine_n["tok_s"],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/w")
    ap.add_argument("--kv-cache", default="int4")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--ttft-prompt", type=int, default=170)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--prefill-chunks",
        default="512",
        help="also run the many-stream server level with these --prefill-chunk-tokens (comma-separated)",
    )
    ap.add_argument(
        "--switch-intervals-ms",
        default="0.5",
        help="also run the many-stream server level with these sys.setswitchinterval values, ms (comma-separated): "
        "how long the engine thread and the event loop wait for each other's GIL",
    )
    ap.add_argument(
        "--family", default="llama2-7b", help="bench.random_checkpoint family (tiny-llama: a CPU smoke run)"
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--step-trace",
        default="",
        metavar="FILE",
        help="write one line per engine step (shape, wall ms) of the many-stream server levels to FILE",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench.serve_gap measures on a CUDA GPU (--device cpu --family tiny-llama: a smoke run; "
            "bench.serve_overhead: the CPU stand-in)"
        )
    from athena_runtime.engine import AsyncEngine, EngineCore
    from athena_runtime.engine_settings import EngineSettings
    from athena_runtime.model_runner import ModelRunner
    from bench.engine import run_level
    from bench.random_checkpoint import open_checkpoint
    from bench.serve_overhead import ServerThread

    ckpt, tokenizer, vocab = open_checkpoint(args.workdir, args.family)
    blocks = 2 * args.streams * -(-(max(args.prompt, args.ttft_prompt) + args.new + 64) // 16) + 8
    runner = ModelRunner.from_path(
        ckpt, kv_format=args.kv_cache, block_size=16, num_blocks=blocks, device=args.device, max_model_len=4096
    )
    runner.capture_graphs(args.streams)
    settings = EngineSettings(
        kv_cache=args.kv_cache,
        max_num_seqs=args.streams,
        max_num_batched_tokens=max(2048, args.streams),
        num_blocks=blocks,
        max_queue=max(256, args.streams),
        prefix_cache=False,
    )
    core = EngineCore(runner, tokenizer, settings, eos_token_ids=())
    run_level(core, 2, args.prompt, 4, vocab, seed=0)  # warm-up: the prefill kernels
    run_level(core, 2, 16, 4, vocab, seed=0)  # and the few-token ones
    engine_ttft_ms(core, args.ttft_prompt, vocab, 2)
    result: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "kv_cache": args.kv_cache,
        "args": vars(args),
    }
    result["engine_ttft_ms"] = engine_ttft_ms(core, args.ttft_prompt, vocab, args.repeats)
    result["engine_1"] = run_level(core, 1, args.prompt, args.new, vocab, seed=1)
    result["engine_n"] = run_level(core, args.streams, args.prompt, args.new, vocab, seed=2)
    del core
    if args.step_trace:  # only the server levels below are traced
        Path(args.step_trace).write_text("")
        # mode "a": uvicorn's dictConfig closes every handler; a closed "a" handler reopens on its next record
        trace = logging.FileHandler(args.step_trace, mode="a")
        trace.setFormatter(logging.Formatter("%(relativeCreated).1f %(threadName)s %(message)s"))
        step_log = logging.getLogger("athena_runtime.engine.steps")
        step_log.setLevel(logging.DEBUG)
        step_log.addHandler(trace)
        step_log.propagate = False
    engine = AsyncEngine(runner, tokenizer, settings, ckpt.name, eos_token_ids=())
    with ServerThread(engine, None) as server:
        # (the first 2 of the child's requests warm up the server: dropped)
        result["server_ttft_ms"] = server_ttft_in_child(
            server.url, ckpt.name, args.ttft_prompt, vocab, args.repeats + 2
        )[2:]
        result["server_1"] = bench_serve(server.url, ckpt.name, 1, 8, args.prompt, args.new)
        result["server_n"] = bench_serve(server.url, ckpt.name, args.streams, args.streams, args.prompt, args.new)
    result["server_n_by_prefill_chunk"] = {}
    for chunk in [int(c) for c in args.prefill_chunks.split(",") if c]:
        # the same level with another --prefill-chunk-tokens: in the server the first requests decode while the
        # rest arrive, so their prompts are fed at most this many tokens a step (the engine alone admits all at once)
        engine = AsyncEngine(
            runner, tokenizer, dataclasses.replace(settings, prefill_chunk_tokens=chunk), ckpt.name, eos_token_ids=()
        )
        with ServerThread(engine, None) as server:
            result["server_n_by_prefill_chunk"][chunk] = bench_serve(
                server.url, ckpt.name, args.streams, args.streams, args.prompt, args.new
            )
    # A/B: the many-stream level with every step's outputs handed to the event loop at once (AsyncEngine._run holds
    # them for the next step's launch by default)
    engine = AsyncEngine(runner, tokenizer, settings, ckpt.name, eos_token_ids=())
    engine.hold_outputs_above = 1 << 30
    with ServerThread(engine, None) as server:
        result["server_n_immediate_handover"] = bench_serve(
            server.url, ckpt.name, args.streams, args.streams, args.prompt, args.new
        )
    result["server_n_by_switch_interval_ms"] = {}
    default_interval = sys.getswitchinterval()
    for ms in [float(v) for v in args.switch_intervals_ms.split(",") if v]:
        sys.setswitchinterval(ms / 1e3)
        try:
            engine = AsyncEngine(runner, tokenizer, settings, ckpt.name, eos_token_ids=())
            with ServerThread(engine, None) as server:
                result["server_n_by_switch_interval_ms"][ms] = bench_serve(
                    server.url, ckpt.name, args.streams, args.streams, args.prompt, args.new
                )
        finally:
            sys.setswitchinterval(default_interval)
    e1, en, s1, sn = result["engine_1"], result["engine_n"], result["server_1"], result["server_n"]
    ttft_e, ttft_s = statistics.median(result["engine_ttft_ms"]), statistics.median(result["server_ttft_ms"])
    ratio = sn["output_tokens_per_s"] / en["tok_s"]
    itl, tpot = s1["itl_ms"]["p50"], e1["per_token_ms"]
    rows = [
        (
            f"output tok/s at {args.streams} streams",
            f"engine {en['tok_s']:.0f}",
            f"server {sn['output_tokens_per_s']:.0f} ({100 * ratio:.0f}%; TTFT p50 {sn['ttft_ms']['p50']:.0f} ms)",
            ">= 90%",
            ratio >= 0.9,
        ),
        *(
            _variant_row(f"--prefill-chunk-tokens {chunk}", r, en)
            for chunk, r in result["server_n_by_prefill_chunk"].items()
        ),
        _variant_row("outputs handed over at once", result["server_n_immediate_handover"], en),
        *(
            _variant_row(f"switch interval {ms:g} ms", r, en)
            for ms, r in result["server_n_by_switch_interval_ms"].items()
        ),
        (
            "1 stream: ITL p50 vs TPOT, ms",
            f"engine TPOT {tpot:.2f}",
            f"server ITL p50 {itl:.2f} ({itl / tpot:.2f}x; server TPOT p50 {s1['tpot_ms']['p50']:.2f})",
            "<= 1.5x",
            itl <= 1.5 * tpot,
        ),
        (
            f"TTFT of a {args.ttft_prompt}-token prompt, ms (median of {args.repeats})",
            f"engine {ttft_e:.1f}",
            f"server {ttft_s:.1f}",
            "<= 30",
            ttft_s <= 30,
        ),
    ]
    print(
        f"\n{result['device']}, random {args.family}, {args.kv_cache} KV, prompt {args.prompt}, "
        f"{args.new} new tokens, greedy"
    )
    print(f"{'measure':44s} {'engine alone':>16s}   {'behind the server':44s} {'goal':>7s}  met")
    for name, eng, srv, goal, met in rows:
        print(f"{name:44s} {eng:>16s}   {srv:44s} {goal:>7s}  {'yes' if met else 'NO'}")
    levels = [
        *result["server_n_by_prefill_chunk"].values(),
        result["server_n_immediate_handover"],
        *result["server_n_by_switch_interval_ms"].values(),
    ]
    failed = [sn["failed"], s1["failed"], *(r["failed"] for r in levels)]
    print(f"failed server requests: {sum(failed)}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
