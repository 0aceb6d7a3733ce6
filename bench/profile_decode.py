"""Where a batch-1 decode step's GPU time goes: the torch profiler over CUDA-graph replays of the
7B-shaped random checkpoint (bench.random_checkpoint), kernels grouped by name.

    python -m bench.profile_decode [--workdir DIR] [--steps 20] [--kv-cache fp16]
    python -m bench.profile_decode --breakdown [--fp16] [--steps 20] [--json FILE]

Prints wall ms per step, summed GPU kernel ms per step, and the kernels by total time. With --breakdown, the
model is built in memory instead (bench.decode.random_runner, Llama-2-7B shape, random weights; --fp16: our fp16
path) and the step is split by part of the model (linear layers, attention, KV write, norms, RoPE, activation,
lm_head, embedding, sampling, gaps inside the graph, host time between replays: bench.decode_breakdown), each
with its bytes read and GB/s where that applies.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.random_checkpoint import checkpoint


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kv-cache", default="fp16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true", help="the step by part of the model (batch 1, in memory)")
    ap.add_argument("--fp16", action="store_true", help="with --breakdown: our fp16 path instead of PQ")
    ap.add_argument("--json", default=None, help="with --breakdown: write the result here too")
    args = ap.parse_args(argv)
    if args.breakdown:
        return run_breakdown(args)
    from torch.profiler import ProfilerActivity, profile

    from athena_runtime.batch import SequenceChunk
    from athena_runtime.model_runner import ModelRunner

    work = Path(args.workdir or tempfile.mkdtemp(prefix="athena-prof-"))
    ckpt = checkpoint(work)
    bs, prompt_len = 16, 128
    runner = ModelRunner.from_path(
        ckpt,
        kv_format=args.kv_cache,
        block_size=bs,
        num_blocks=args.batch * 32,
        device=torch.device("cuda"),
        max_model_len=512,
    )
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


def _scopes(model) -> list:
    """Wrap every categorized module's forward in a profiler scope `cat::<category>` (bench.decode_breakdown)."""
    from bench.decode_breakdown import module_category

    stack, handles = [], []

    def pre(cat):
        def hook(mod, args):
            rf = torch.profiler.record_function("cat::" + cat)
            rf.__enter__()
            stack.append(rf)

        return hook

    def post(mod, args, out):
        stack.pop().__exit__(None, None, None)

    for qualname, m in model.named_modules():
        cat = module_category(qualname, type(m).__name__)
        if cat is not None:
            handles += [m.register_forward_pre_hook(pre(cat)), m.register_forward_hook(post)]
    return handles


def _kernel_categories(prof) -> list[tuple[str, str | None]]:
    """(name, category) of each GPU event of an eager profile, in start order: the innermost `cat::` scope around
    the CPU op that launched it (the profiler's correlation ids), or None when there is none."""
    from torch.autograd import DeviceType

    evs = list(prof.events())
    cpu = [e for e in evs if e.device_type == DeviceType.CPU]
    scopes = [e for e in cpu if e.name.startswith("cat::")]
    by_id = {e.id: e for e in cpu if not getattr(e, "linked_correlation_id", 0)}
    out = []
    for k in sorted((e for e in evs if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start):
        f = by_id.get(getattr(k, "linked_correlation_id", -1))
        cat = None
        if f is not None:
            inside = [
                s for s in scopes if s.time_range.start <= f.time_range.start and f.time_range.end <= s.time_range.end
            ]
            if inside:
                cat = max(inside, key=lambda s: s.time_range.start).name[len("cat::") :]
        out.append((k.name, cat))
    return out


def _gpu_events(prof) -> list:
    from torch.autograd import DeviceType

    from bench.decode_breakdown import GpuEvent

    cuda = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    return [GpuEvent(e.name, e.time_range.start, e.time_range.end) for e in cuda]  # the order _kernel_categories uses


def _bytes(model, runner, context: int) -> dict[str, float]:
    """Bytes one step reads per category where that is defined (weights of the linears, of the lm_head, the KV)."""
    from bench.decode_breakdown import module_category

    out = {"linear layers": 0.0, "lm_head": 0.0}
    for qualname, m in model.named_modules():
        cat = module_category(qualname, type(m).__name__)
        if cat in out:
            out[cat] += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    out["attention"] = runner.kv_cache.bytes_per_token() * context
    return out


@torch.inference_mode()
def run_breakdown(args) -> int:
    import json

    from torch.profiler import ProfilerActivity, profile, record_function

    from athena_runtime.batch import SequenceChunk
    from bench.decode import copy_bandwidth, random_runner
    from bench.decode_breakdown import breakdown
    from bench.random_checkpoint import LLAMA2_7B

    dev = torch.device("cuda")
    cfg = dict(LLAMA2_7B)
    t0 = time.perf_counter()
    runner, mc = random_runner(cfg, dev, 1024, args.kv_cache, dense=args.fp16)
    print(f"built the {'fp16' if args.fp16 else 'PQ'} model in {time.perf_counter() - t0:.1f} s", flush=True)
    bs, prompt_len = runner.block_size, 128
    table = list(range(-(-(prompt_len + 3 * args.steps + 16) // bs)))
    runner.execute([SequenceChunk(torch.randint(3, 30000, (prompt_len,)).tolist(), 0, table)])
    pos = prompt_len

    def step():
        nonlocal pos
        logits = runner.execute([SequenceChunk([5], pos, table)])
        pos += 1
        return int(logits[0].argmax())

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall_us = (time.perf_counter() - t0) / args.steps * 1e6
    # One profiler session (a second session after graph capture may record nothing): first the captured function
    # run eagerly under module scopes, which names the graph's kernels; a marker kernel; then the timed replays.
    handles = _scopes(runner.model)
    runner._fill([SequenceChunk([5], pos, table)], 1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("cat::other (forward, outside modules)"):
            runner._graph_forward(1)
        torch.cuda.synchronize()
        for h in handles:
            h.remove()
        torch.cuda._sleep(1000)  # the marker between the eager pass and the replays
        torch.cuda.synchronize()
        pos += 1
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    named = _kernel_categories(prof)  # every GPU event of the session, in start order
    if not named:
        raise SystemExit("the profiler recorded no GPU events (CUPTI unavailable?): nothing to break down")
    marker = next((i for i, (n, _) in enumerate(named) if "spin" in n.lower()), None)
    replays_from = None if marker is None else marker + 1
    if marker is None:  # no marker seen: the eager pass is the events under a scope (the replays have none)
        marker = replays_from = next((i for i, (_, c) in enumerate(named) if c is None), len(named))
        print("marker kernel not found: the eager pass taken as the GPU events under a module scope")
    sequence = named[:marker]
    events = _gpu_events(prof)[replays_from:]
    res = breakdown(events, sequence, args.steps, wall_us)
    context = pos - args.steps // 2
    nbytes = _bytes(runner.model, runner, context)
    bw = copy_bandwidth(dev)
    from bench.peers import _git_commit

    res.update(
        commit=_git_commit(),
        path="fp16" if args.fp16 else "pq",
        kv_cache=args.kv_cache,
        device=torch.cuda.get_device_name(),
        copy_bandwidth_gb_s=bw / 1e9,
        bytes=nbytes,
        context=context,
        unscoped_kernels=sorted({n for n, c in sequence if c is None}),
    )
    print(
        f"\n{res['device']} (commit {res['commit']}), {res['path']} path, batch 1, kv {args.kv_cache}, "
        f"context ~{context}: wall "
        f"{wall_us / 1e3:.3f} ms/step ({1e6 / wall_us:.1f} tok/s), graph span {res['graph_span_us'] / 1e3:.3f} ms; "
        f"{res['steps_matched']} of {args.steps} replays matched ({res['kernels_per_replay']} kernels each; "
        f"categories from: {res['method']})"
    )
    print(f"{'part':62s} {'us/step':>9s} {'% wall':>7s} {'calls':>6s} {'MB/step':>8s} {'GB/s':>7s} {'% copy bw':>9s}")
    for cat, r in sorted(res["rows"].items(), key=lambda kv: -kv[1]["us"]):
        b = nbytes.get(cat)
        gbs = b / r["us"] / 1e3 if b and r["us"] > 0 else None
        print(
            f"{cat[:62]:62s} {r['us']:9.1f} {100 * r['us'] / wall_us:6.1f}% {r['calls']:6.0f} "
            f"{b / 1e6 if b else float('nan'):8.1f} {gbs or float('nan'):7.0f} "
            f"{100 * gbs * 1e9 / bw if gbs else float('nan'):8.0f}%"
        )
    if res["unscoped_kernels"]:
        print("kernels outside any module scope (classified by name):", ", ".join(res["unscoped_kernels"])[:2000])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
