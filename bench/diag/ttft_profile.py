"""Where the time to first token of a lone prompt goes on the GPU (issue 17: a 170-token prompt, 7B shape).

    python -m bench.diag.ttft_profile [--workdir /tmp/w] [--kv-cache int4] [--prompt 170] [--repeats 7]
                                      [--profile out/ttft_host.txt] [--trace out/ttft_kernels.txt]

EngineCore on the random 7B checkpoint (bench.random_checkpoint), as bench.serve_gap builds it. Reports the
median wall ms of add_request -> output, the GPU kernel ms of the same step (torch profiler, summed kernel time),
and the host's cProfile of a few such steps (cumulative ms per step, top entries): the gap between wall and
kernel time is the host's. Also an A/B of the step with the lone-prompt prefill CUDA graph (prefill_graphs.py)
and without it (eager), alternating rounds in one process.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/w")
    ap.add_argument("--kv-cache", default="int4")
    ap.add_argument("--prompt", type=int, default=170)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", default="", help="cProfile stats of 3 steps, written here")
    ap.add_argument("--trace", default="", help="the torch profiler's kernel table, written here")
    args = ap.parse_args(argv)
    from athena_runtime.engine import EngineCore
    from athena_runtime.engine_settings import EngineSettings
    from athena_runtime.model_runner import ModelRunner
    from bench.random_checkpoint import open_checkpoint
    from bench.ttft_client import engine_ttft_ms

    ckpt, tokenizer, vocab = open_checkpoint(args.workdir)
    runner = ModelRunner.from_path(
        ckpt, kv_format=args.kv_cache, block_size=16, num_blocks=512, device="cuda", max_model_len=4096
    )
    runner.capture_graphs(8)
    settings = EngineSettings(kv_cache=args.kv_cache, max_num_seqs=8, num_blocks=512, prefix_cache=False)
    core = EngineCore(runner, tokenizer, settings, eos_token_ids=())
    engine_ttft_ms(core, args.prompt, vocab, 3)  # warm-up: kernels compiled and loaded
    wall = engine_ttft_ms(core, args.prompt, vocab, args.repeats)
    graphs, ab = runner.prefill_graphs, {"graph": [], "eager": []}
    for _ in range(3):  # alternating rounds: the host's noise falls on both
        for name in ab:
            runner.prefill_graphs = graphs if name == "graph" else None
            ab[name] += engine_ttft_ms(core, args.prompt, vocab, args.repeats)
    runner.prefill_graphs = graphs
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine_ttft_ms(core, args.prompt, vocab, 3)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / 3
    launches = sum(e.count for e in events) / 3
    if args.trace:
        Path(args.trace).write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60))
    pr = cProfile.Profile()
    pr.enable()
    engine_ttft_ms(core, args.prompt, vocab, 3)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(60)
    if args.profile:
        Path(args.profile).write_text(s.getvalue())
    print(
        f"TTFT {args.prompt} tokens, {args.kv_cache} KV: wall p50 {statistics.median(wall):.1f} ms "
        f"(min {min(wall):.1f}); GPU kernels {gpu_ms:.1f} ms in {launches:.0f} launches per step "
        f"({torch.cuda.get_device_name()})"
    )
    g50, e50 = statistics.median(ab["graph"]), statistics.median(ab["eager"])
    print(f"A/B, 3 alternating rounds: prefill CUDA graph p50 {g50:.1f} ms, eager p50 {e50:.1f} ms")
    print("\n".join(s.getvalue().splitlines()[:45]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
