"""Where a batch-1 decode step's GPU time goes: the torch profiler over CUDA-graph replays of the
7B-shaped random checkpoint (bench.random_checkpoint), kernels grouped by name.

    python -m bench.profile_decode [--workdir DIR] [--steps 20] [--kv-cache fp16]

Prints wall ms per step, summed GPU kernel ms per step, and the kernels by total time.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.random_checkpoint import build


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kv-cache", default="fp16")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from athena_runtime.batch import SequenceChunk
    from athena_runtime.model_runner import ModelRunner

    work = Path(args.workdir or tempfile.mkdtemp(prefix="athena-prof-"))
    ckpt = work / "llama7b-athena"
    if not (ckpt / "athena.json").exists():
        build(ckpt)
    bs, prompt_len = 16, 128
    runner = ModelRunner.from_path(ckpt, kv_format=args.kv_cache, block_size=bs, num_blocks=args.batch * 32,
                                   device=torch.device("cuda"), max_model_len=512)
    tables = [list(range(i * 32, (i + 1) * 32)) for i in range(args.batch)]
    prompt = torch.randint(3, 30000, (prompt_len,)).tolist()
    for t in tables:
        runner.execute([SequenceChunk(prompt, 0, t)])
    pos = prompt_len

    def step():
        nonlocal pos
        logits = runner.execute([SequenceChunk([5], pos, t) for t in tables])
        pos += 1
        return int(logits[0].argmax())

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - t0) / args.steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    events.sort(key=lambda e: -getattr(e, key))
    gpu_ms = sum(getattr(e, key) for e in events) / 1e3 / args.steps
    print(f"batch {args.batch}, kv {args.kv_cache}: wall {wall * 1e3:.2f} ms/step, GPU kernels {gpu_ms:.2f} ms/step")
    print(f"{'kernel':80s} {'calls/step':>10s} {'us/step':>9s} {'us/call':>8s}")
    for e in events[:30]:
        us = getattr(e, key) / args.steps
        print(f"{e.key[:80]:80s} {e.count / args.steps:10.1f} {us:9.1f} {us / max(1, e.count / args.steps):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
