"""CPU decode step time of the reference and fast paths, A/B in one process (athena_runtime/cpu/path.py).

    python -m bench.cpu_decode [MODEL] [--paths reference,fast,fast:fp16] [--streams 1,4] [--steps 16] [--rounds 5]
                               [--threads N] [--profile]

MODEL defaults to the compressed embedded default. For each path ("fast:FORMAT" picks the fast path's
weight format, "fast" takes --weights) a runner is loaded; each round then
prefills `--streams` prompts of 64 tokens per path and times `--steps` decode steps, the paths
alternating round by round (the machine may be shared: medians over rounds are printed, and
--profile prints the torch profiler's op table for one round of each path).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _round(runner, streams: int, steps: int, prompt_len: int = 64, feed: list | None = None):
    """(prefill seconds for all streams, median decode ms per step, logits of every step [steps + 1][S, V],
    the tokens fed, median process CPU ms per step). `feed`: the tokens to feed at each step (another path's, so
    logits compare). CPU time (all threads of the process) is the figure to compare on a machine shared with
    other jobs: wall time there includes waiting for a core."""
    from athena_runtime.batch import SequenceChunk

    bs = runner.block_size
    per = -(-(prompt_len + steps + 1) // bs)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(streams)]
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    first = []
    for t in tables:
        prompt = torch.randint(3, 1000, (prompt_len,), generator=g).tolist()
        first.append(runner.execute([SequenceChunk(prompt, 0, t)])[0])
    prefill = time.perf_counter() - t0
    all_logits, fed, times, cpu = [torch.stack(first)], [], [], []
    for i in range(steps):
        last = feed[i] if feed is not None else all_logits[-1].argmax(-1).tolist()
        fed.append(last)
        t0, c0 = time.perf_counter(), time.process_time()
        all_logits.append(runner.execute([SequenceChunk([tok], prompt_len + i, t) for tok, t in zip(last, tables)]))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return prefill, statistics.median(times) * 1e3, all_logits, fed, statistics.median(cpu) * 1e3


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--paths", default="reference,fast")
    ap.add_argument("--weights", default="auto", help="the fast path's weight format: auto | fp16 | int8")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    from athena_runtime.cpu.path import CPUPathSettings
    from athena_runtime.model_runner import ModelRunner
    from quantize.embedded import resolve_model_arg

    model = resolve_model_arg(args.model)
    streams = [int(s) for s in args.streams.split(",")]
    runners = {}
    for path in args.paths.split(","):  # "reference", "fast" (--weights) or "fast:FORMAT"
        t0 = time.perf_counter()
        kind, _, weights = path.partition(":")
        runners[path] = ModelRunner.from_path(
            model,
            num_blocks=64 * max(streams),
            device="cpu",
            max_model_len=1024,
            cpu_path=CPUPathSettings(kind, weights or args.weights, args.threads),
        )
        print(f"{path}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    for s in streams:
        res = {p: [] for p in runners}
        for _ in range(args.rounds):
            feed = None
            for p, r in runners.items():
                res[p].append(_round(r, s, args.steps, feed=feed))
                feed = res[p][-1][3]
        base = next(iter(runners))
        for p in list(runners)[1:]:
            want, got = res[base][-1][2], res[p][-1][2]
            rng = max(w.abs().max().item() for w in want)
            err = max((g - w).abs().max().item() for g, w in zip(got, want))
            agree = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want))
            print(
                f"{s} stream(s), {p} vs {base}: max |logit diff| {err:.4f} ({err / rng:.2e} of the max |logit| "
                f"{rng:.2f}); argmax agrees on {agree} of {sum(w.shape[0] for w in want)} rows",
                flush=True,
            )
        for p, rs in res.items():
            pre = statistics.median(x[0] for x in rs)
            ms = statistics.median(x[1] for x in rs)
            cms = statistics.median(x[4] for x in rs)
            print(
                f"{s} stream(s), {p:10s}: decode {ms:7.1f} ms/step wall, {cms:7.1f} ms/step CPU (medians of "
                f"{args.rounds} rounds x {args.steps} steps; wall per round {', '.join(f'{x[1]:.1f}' for x in rs)}), "
                f"prefill {pre * 1e3:.0f} ms for {s} x 64 tokens",
                flush=True,
            )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for p, r in runners.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                _round(r, streams[0], args.steps)
            print(f"--- {p}, {streams[0]} stream(s), 64-token prefill + {args.steps} decode steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
