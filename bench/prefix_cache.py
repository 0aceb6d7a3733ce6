"""Time to first token of a chat's second turn, with the prefix cache on and off.

    python -m bench.prefix_cache [--model embedded|random-7b|PATH] [--context 2048] [--answer 64] [--new 32]
                                 [--repeats 3] [--device cpu|cuda] [--kv-cache fp16] [--json]

Turn 1 is a prompt of `context - answer - new` random tokens answered with `answer` greedy tokens; turn 2
is turn 1's prompt, its answer and `new` more tokens: the whole conversation, `context` tokens. Its time
to first token is timed (from add_request to the step that returns the token): with the cache on it starts
on turn 1's KV blocks and computes only the tail. Each repeat is a fresh conversation. Drives EngineCore
directly: the scheduler, runner and sampler the server uses, without HTTP.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("bench.prefix_cache")


def model_path(name: str, workdir: str | None) -> Path:
    if name == "embedded":
        from quantize.embedded import default_model_path

        return default_model_path()
    if name == "random-7b":
        from bench.random_checkpoint import checkpoint

        return checkpoint(workdir or tempfile.mkdtemp(prefix="athena-prefix-"))
    return Path(name)


def time_to_first_token(core, rid: str, prompt: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
    """Seconds from add_request to the first token (wall, and this process's CPU time: less sensitive to
    other load on a shared machine), and all `max_tokens` greedy tokens."""
    from athena_runtime.sampling_params import SamplingParams

    t0, c0 = time.perf_counter(), time.process_time()
    core.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    ttft, cpu, tokens = None, None, []
    while core.has_work():
        for out in core.step():
            if out.request_id == rid and out.token_ids:
                if ttft is None:
                    ttft, cpu = time.perf_counter() - t0, time.process_time() - c0
                tokens += out.token_ids
    return ttft, cpu, tokens


def conversation(core, vocab: int, args, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(3, vocab, (args.context - args.answer - args.new,), generator=g).tolist()
    ttft1, _, answer = time_to_first_token(core, f"c{seed}-t1", first, args.answer)
    turn2 = first + answer + torch.randint(3, vocab, (args.new,), generator=g).tolist()
    stats = core.stats()
    ttft2, cpu2, _ = time_to_first_token(core, f"c{seed}-t2", turn2, 1)
    hits = core.stats().prefix_cache_hits_total - stats.prefix_cache_hits_total
    return {
        "turn1_ttft_s": ttft1,
        "turn2_ttft_s": ttft2,
        "turn2_ttft_cpu_s": cpu2,
        "turn2_prompt_tokens": len(turn2),
        "turn2_cached_tokens": hits,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded (the compressed default), random-7b, or a folder")
    ap.add_argument("--context", type=int, default=2048, help="tokens of the whole conversation at turn 2")
    ap.add_argument("--answer", type=int, default=64, help="tokens of turn 1's answer")
    ap.add_argument("--new", type=int, default=32, help="tokens turn 2 adds after the answer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--kv-cache", default="fp16", choices=["fp16", "int8", "int4"])
    ap.add_argument("--workdir", default=None, help="where random-7b is built")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.context - args.answer - args.new < 1 or args.answer < 1 or args.new < 1:
        ap.error("--context must exceed --answer + --new, both >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    from athena_runtime.engine import EngineCore
    from athena_runtime.engine_settings import EngineSettings
    from athena_runtime.model_runner import ModelRunner

    path = model_path(args.model, args.workdir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks = 2 * (-(-(args.context + 1) // 16)) + 8  # both turns of one conversation
    runner = ModelRunner.from_path(
        path,
        kv_format=args.kv_cache,
        block_size=16,
        num_blocks=blocks,
        device=device,
        max_model_len=args.context + args.answer,
    )
    runner.capture_graphs(1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = runner.config.vocab_size
    result = {
        "model": str(path),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "kv_cache": args.kv_cache,
        "context": args.context,
        "answer": args.answer,
        "new": args.new,
        "modes": {},
    }
    for on in (True, False):
        settings = EngineSettings(kv_cache=args.kv_cache, max_num_seqs=1, prefix_cache=on)
        core = EngineCore(runner, tokenizer, settings, eos_token_ids=())
        time_to_first_token(core, "warm-up", list(range(3, 40)), 2)  # first-call costs (allocator, kernels)
        runs = []
        for seed in range(args.repeats):
            runs.append(conversation(core, vocab, args, seed))
            r = runs[-1]
            log.info(
                "prefix cache %s, conversation %d: first token of turn 1 after %.3f s, of turn 2 after %.3f s "
                "(CPU %.3f s; %d tokens cached)",
                "on" if on else "off",
                seed,
                r["turn1_ttft_s"],
                r["turn2_ttft_s"],
                r["turn2_ttft_cpu_s"],
                r["turn2_cached_tokens"],
            )
        result["modes"]["on" if on else "off"] = {
            "runs": runs,
            "turn2_ttft_s_median": statistics.median(r["turn2_ttft_s"] for r in runs),
            "turn2_ttft_cpu_s_median": statistics.median(r["turn2_ttft_cpu_s"] for r in runs),
        }
    on, off = (result["modes"][m]["turn2_ttft_s_median"] for m in ("on", "off"))
    result["speedup"] = off / on
    print(
        f"\n{result['device']}, {path.name}, KV {args.kv_cache}: turn 2 of a {args.context}-token conversation "
        f"({args.repeats} repeats, median)"
    )
    for mode, m in result["modes"].items():
        cached = m["runs"][0]["turn2_cached_tokens"]
        print(
            f"  prefix cache {mode:3s}: time to first token {1e3 * m['turn2_ttft_s_median']:9.1f} ms "
            f"(CPU time {1e3 * m['turn2_ttft_cpu_s_median']:9.1f} ms; {cached} of {args.context} tokens cached)"
        )
    print(f"  {result['speedup']:.1f}x faster with the prefix cache")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
