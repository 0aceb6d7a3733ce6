"""Engine throughput vs concurrent streams, per KV-cache format, on the 7B-shaped compressed model
(random weights), plus how many 2K-token sequences each format fits in a 24 GB card.

    python -m bench.engine [--streams 1,8,32,64,128] [--formats fp16,int4] [--prompt 128 --new 128] [--json]

Drives `EngineCore` directly (the same scheduler, runner, CUDA graphs and sampler the server uses).
Per level: output tok/s, mean per-token latency (time between a stream's tokens), speed-up over one
stream, and errors (requests that did not finish with 'length').
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

log = logging.getLogger("bench.engine")
CARD_BYTES = 24 * 10**9  # an RTX 4090's 24 GB


def run_level(core, streams: int, prompt_len: int, new: int, vocab: int, seed: int) -> dict:
    from athena_runtime.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    for i in range(streams):
        core.add_request(f"r{seed}-{i}", torch.randint(3, vocab, (prompt_len,), generator=g).tolist(), params)
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    finished: dict[str, str] = {}
    while core.has_work():
        outs = core.step()
        now = time.perf_counter()
        for o in outs:
            n = len(o.token_ids)
            if n:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                counts[o.request_id] = counts.get(o.request_id, 0) + n
            if o.finished:
                finished[o.request_id] = o.finish_reason
    wall = time.perf_counter() - t0
    total = sum(counts.values())
    per_token = [(last[r] - first[r]) / max(1, counts[r] - 1) for r in counts if counts[r] > 1]
    errors = sum(1 for r in finished.values() if r != "length") + (streams - len(finished))
    return {
        "streams": streams,
        "output_tokens": total,
        "seconds": wall,
        "tok_s": total / wall,
        "per_token_ms": 1e3 * statistics.mean(per_token) if per_token else float("nan"),
        "errors": errors,
        "kv_blocks_used_after": core.block_manager.num_used,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,8,32,64,128")
    ap.add_argument("--formats", default="fp16,int4")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench.engine needs a CUDA GPU")
    from transformers import AutoTokenizer

    from athena_runtime.engine import EngineCore
    from athena_runtime.engine_settings import EngineSettings
    from athena_runtime.model_runner import ModelRunner
    from bench.decode import weight_bytes
    from bench.random_checkpoint import checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="athena-engine-"))
    ckpt = checkpoint(work, layers=args.layers)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    levels = [int(s) for s in args.streams.split(",")]
    result = {"device": torch.cuda.get_device_name(), "prompt": args.prompt, "new_tokens": args.new, "formats": {}}
    for fmt in args.formats.split(","):
        need = max(levels) * (-(-(args.prompt + args.new) // 16)) + 8
        runner = ModelRunner.from_path(
            ckpt, kv_format=fmt, block_size=16, num_blocks=need, device="cuda", max_model_len=4096
        )
        settings = EngineSettings(
            kv_cache=fmt, max_num_seqs=max(levels), max_num_batched_tokens=max(2048, max(levels)), num_blocks=need
        )
        core = EngineCore(runner, tokenizer, settings, eos_token_ids=())
        runner.capture_graphs(max(levels))  # every decode graph, before any timing
        run_level(core, 2, args.prompt, 4, runner.config.vocab_size, seed=0)  # warm-up: the prefill kernels
        run_level(core, 2, 16, 4, runner.config.vocab_size, seed=0)  # and the few-token ones
        rows = [run_level(core, s, args.prompt, args.new, runner.config.vocab_size, seed=s) for s in levels]
        base = rows[0]["tok_s"]
        for r in rows:
            r["speedup_vs_1"] = r["tok_s"] / base
        wbytes = weight_bytes(runner.model)
        per_tok = runner.kv_cache.bytes_per_token()
        reserve = 1.5 * 10**9  # activations, CUDA graphs, allocator slack
        fits = int((CARD_BYTES - wbytes - reserve) // (2048 * per_tok))
        result["formats"][fmt] = {
            "rows": rows,
            "kv_bytes_per_token": per_tok,
            "weights_gb": wbytes / 1e9,
            "max_2k_seqs_in_24gb": fits,
        }
        del core, runner
        torch.cuda.empty_cache()
    print(f"\n{result['device']}: prompt {args.prompt}, {args.new} new tokens per stream (greedy, EOS ignored)")
    print(f"{'KV':5s} {'streams':>7s} {'tok/s':>9s} {'x 1 stream':>10s} {'ms/token':>9s} {'errors':>6s}")
    for fmt, f in result["formats"].items():
        for r in f["rows"]:
            print(
                f"{fmt:5s} {r['streams']:7d} {r['tok_s']:9.1f} {r['speedup_vs_1']:10.1f} "
                f"{r['per_token_ms']:9.1f} {r['errors']:6d}"
            )
    for fmt, f in result["formats"].items():
        print(
            f"{fmt}: {f['kv_bytes_per_token']} KV bytes/token; {f['max_2k_seqs_in_24gb']} concurrent 2K-token "
            f"sequences in 24 GB next to {f['weights_gb']:.2f} GB of weights"
        )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
