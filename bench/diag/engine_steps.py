"""Where the admission of many streams goes: per-step wall times of an engine level and a GPU kernel
profile of its prefill/mixed steps (7B-shaped random checkpoint, H100 diagnosis).

    python -m bench.diag.engine_steps --workdir /tmp/w [--streams 64] [--prompt 128] [--profile-steps 4]
        [--kv-cache int4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--kv-cache", default="fp16", choices=("fp16", "int8", "int4"))
    ap.add_argument(
        "--cprofile",
        default=None,
        metavar="FILE",
        help="also write cProfile stats (Python side) of 10 admission steps of the same level to FILE",
    )
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from athena_runtime.engine import EngineCore
    from athena_runtime.engine_settings import EngineSettings
    from athena_runtime.model_runner import ModelRunner
    from athena_runtime.sampling_params import SamplingParams

    ckpt = Path(args.workdir) / "llama7b-athena"
    tok = AutoTokenizer.from_pretrained(ckpt)
    need = args.streams * (-(-(args.prompt + args.new) // 16)) + 8
    runner = ModelRunner.from_path(
        ckpt, kv_format=args.kv_cache, block_size=16, num_blocks=need, device="cuda", max_model_len=4096
    )
    core = EngineCore(
        runner,
        tok,
        EngineSettings(
            kv_cache=args.kv_cache,
            max_num_seqs=args.streams,
            num_blocks=need,
            max_num_batched_tokens=max(args.budget, args.streams),
        ),
        eos_token_ids=(),
    )
    runner.capture_graphs(args.streams)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.new, ignore_eos=True)

    def add_level(tag):
        for i in range(args.streams):
            core.add_request(
                f"{tag}{i}", torch.randint(3, runner.config.vocab_size, (args.prompt,), generator=g).tolist(), params
            )

    def timed_level(tag):
        """Wall ms of every step of one level (device-synchronized around each step)."""
        add_level(tag)
        times = []
        while core.has_work():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            core.step()
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        return times

    timed_level("warm")  # compiles, first-use allocations
    times = timed_level("run")
    head, rest = times[:12], sorted(times[12:])
    print(
        f"{args.streams} streams x {args.prompt}-token prompts, budget {args.budget}: step ms "
        + " ".join(f"{t:.1f}" for t in head)
        + (f" ... (median of the rest {rest[len(rest) // 2]:.1f})" if rest else "")
    )
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    )
    add_level("p")
    with prof:
        for _ in range(args.profile_steps):
            core.step()
        torch.cuda.synchronize()
    while core.has_work():
        core.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    if args.cprofile:
        import cProfile
        import io
        import pstats

        pr = cProfile.Profile()
        for r in range(10):  # one admission (first) step per round, the rest of the level unprofiled
            add_level(f"c{r}-")
            torch.cuda.synchronize()
            pr.enable()
            core.step()
            torch.cuda.synchronize()
            pr.disable()
            while core.has_work():
                core.step()
        buf = io.StringIO()
        for key in ("tottime", "cumulative"):
            pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(45)
        Path(args.cprofile).write_text(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
