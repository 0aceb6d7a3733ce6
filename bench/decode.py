"""End-to-end batch-1 decode on a Llama-2-7B-shaped model with random weights: our PQ path, our fp16
path and HF transformers fp16, in one run on one GPU, each against its memory-bandwidth limit.

    python -m bench.decode [--prompt 128 --new 256] [--layers 32] [--json]
    python -m bench.decode --family llama2-7b,llama3-8b,qwen2.5-7b,mistral-7b,gemma3-12b [--paths pq,fp16]

With --family, each family's shape (bench.random_checkpoint.FAMILIES) is built in memory on the device and
decoded at batch 1; besides tok/s against the bandwidth limit the table gives GB/s = tok/s x bytes read per
token and that rate relative to llama2-7b's (a family as fast per byte as Llama-2-7B shows 1.0). Runs on the
CPU too (--device cpu, tiny shapes: the tests).

tok/s counts decode steps only (after the prompt's prefill), greedy, EOS ignored. The bandwidth limit
is (bytes that must be read per token) / (measured device-to-device copy bandwidth): every weight
byte once (packed indices, codebooks, low-rank factors, fp16 lm_head, norms) plus the KV cache so far.
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

from bench.random_checkpoint import LLAMA2_7B, checkpoint

log = logging.getLogger("bench.decode")


def copy_bandwidth(device) -> float:
    """bytes/s of a large copy on `device` (bytes read + bytes written), median of 20 (CUDA: 1 GiB, events;
    CPU: 64 MiB, wall clock)."""
    if device.type != "cuda":
        x = torch.empty(1 << 26, dtype=torch.uint8)
        y = torch.empty_like(x)
        times = []
        for _ in range(25):
            t0 = time.perf_counter()
            y.copy_(x)
            times.append(time.perf_counter() - t0)
        return 2 * x.numel() / statistics.median(times[5:])
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * x.numel() / statistics.median(times[5:])


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer read per decode token (embedding: one row, unless the lm_head is tied
    to it: then all of it, once)."""
    tied = getattr(model, "lm_head", "untied") is None
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name and not tied:
            total += t.shape[1] * t.element_size()
        elif "inv_freq" not in name:
            total += t.numel() * t.element_size()
    return total


def kv_bytes_read(config, kv_cache, context: float) -> float:
    """Bytes of K/V one decode token reads at an average `context`: each layer's keys within its sliding window."""
    per_layer = kv_cache.bytes_per_token() / config.num_layers
    return sum(per_layer * min(context, config.window(i) or context) for i in range(config.num_layers))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def decode_runner(runner, prompt: list[int], new: int) -> tuple[float, list[int]]:
    """Prefill, then `new` greedy decode steps through runner.execute (CUDA graphs). Returns tok/s."""
    from athena_runtime.batch import SequenceChunk

    bs = runner.block_size
    table = list(range(-(-(len(prompt) + new) // bs)))
    logits = runner.execute([SequenceChunk(prompt, 0, table)])
    tok = int(logits.argmax(-1))
    out = [tok]
    # one warm-up step captures the graph for batch 1
    runner.execute([SequenceChunk([tok], len(prompt), table)])
    _sync(runner.device)
    t0 = time.perf_counter()
    pos = len(prompt)
    for _ in range(new):
        logits = runner.execute([SequenceChunk([tok], pos, table)])
        tok = int(logits.argmax(-1))
        out.append(tok)
        pos += 1
    _sync(runner.device)
    return new / (time.perf_counter() - t0), out


@torch.inference_mode()
def decode_hf(cfg: dict, prompt: list[int], new: int, device) -> tuple[float, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).half().eval()
    for p in model.parameters():
        p.normal_(0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    ids = torch.tensor([prompt], device=device)
    kw = dict(do_sample=False, min_new_tokens=new, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    model.generate(ids, **dict(kw, min_new_tokens=4, max_new_tokens=4))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, **dict(kw, min_new_tokens=1, max_new_tokens=1))
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    wbytes = weight_bytes(model)
    del model
    torch.cuda.empty_cache()
    return (new - 1) / max(1e-9, total - prefill), wbytes


def random_runner(cfg: dict, device, context: int, kv_format: str, dense: bool, seed: int = 0):
    """A ModelRunner over a random model of `cfg` built in memory on `device` (bench.random_checkpoint's tensors,
    made as the loader asks for them): athena layers with the default recipe, or fp16 linears with `dense`.
    The KV cache is not calibrated (an int4 cache keeps the identity basis: the same work per token)."""
    from athena_runtime.format.config import ModelConfig
    from athena_runtime.kv_cache import KVCache
    from athena_runtime.loader import build_model
    from athena_runtime.model_runner import ModelRunner
    from bench.random_checkpoint import random_tensors

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    mc = ModelConfig.from_hf_config(cfg)
    tensors, layers = random_tensors(cfg, device=device, seed=seed, dense_linears=dense)
    model = build_model(mc, tensors, layers, device, dtype, context, source=f"random {cfg['model_type']}")
    bs = 16
    kv = KVCache.create(kv_format, mc.num_layers, -(-context // bs), bs, mc.num_kv_heads, mc.head_dim, device)
    return ModelRunner(model, mc, kv, device, max_model_len=context), mc


def run_families(args, device) -> dict:
    """Batch-1 decode of each family's shape (random weights), with its rate against the bandwidth limit and
    its bytes-per-token-adjusted rate (tok/s x bytes read per token) relative to the Llama-2-7B shape's."""
    from bench.random_checkpoint import FAMILIES

    names = [n for n in FAMILIES if not n.startswith("tiny")] if args.family == "all" else args.family.split(",")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown --family {unknown}; choose from {', '.join(FAMILIES)} or all")
    paths = args.paths.split(",")
    bw = copy_bandwidth(device)
    rows = []
    for name in names:
        cfg = dict(FAMILIES[name])
        if args.layers:
            cfg["num_hidden_layers"] = args.layers
            if "layer_types" in cfg:
                cfg["layer_types"] = cfg["layer_types"][: args.layers]
        g = torch.Generator().manual_seed(int(time.time()))
        prompt = torch.randint(3, cfg["vocab_size"], (args.prompt,), generator=g).tolist()
        for path in paths:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            runner, mc = random_runner(cfg, device, args.context, args.kv_cache, dense=path == "fp16")
            built = time.perf_counter() - t0
            rates = [decode_runner(runner, prompt, args.new)[0] for _ in range(args.rounds)]
            wb = weight_bytes(runner.model)
            per_token = wb + kv_bytes_read(mc, runner.kv_cache, args.prompt + args.new / 2)
            tps = statistics.median(rates)
            rows.append(
                {
                    "family": name,
                    "path": path,
                    "tok_s": tps,
                    "rounds": rates,
                    "weight_gb": wb / 1e9,
                    "bytes_per_token": per_token,
                    "limit_tok_s": bw / per_token,
                    "gb_s": tps * per_token / 1e9,
                    "build_s": built,
                    "peak_gib": (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")),
                }
            )
            log.info("%s %s: %.1f tok/s (%s)", name, path, tps, ", ".join(f"{r:.1f}" for r in rates))
            del runner
    base = {r["path"]: r["gb_s"] for r in rows if r["family"] == args.baseline}
    for r in rows:
        r["vs_baseline"] = r["gb_s"] / base[r["path"]] if r["path"] in base else None
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "copy_bandwidth_gb_s": bw / 1e9,
        "prompt": args.prompt,
        "new_tokens": args.new,
        "kv_cache": args.kv_cache,
        "baseline": args.baseline,
        "rows": rows,
    }


def print_families(result: dict) -> None:
    print(
        f"\n{result['device']}, copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s, prompt {result['prompt']}, "
        f"{result['new_tokens']} new tokens, {result['kv_cache']} KV"
    )
    print(
        f"{'family':12s} {'path':5s} {'tok/s':>8s} {'limit':>8s} {'% lim':>6s} {'MB/token':>9s} {'GB/s':>7s} "
        f"{'vs ' + result['baseline']:>14s} {'peak GiB':>9s}"
    )
    for r in result["rows"]:
        rel = f"{r['vs_baseline']:.3f}" if r["vs_baseline"] is not None else "-"
        print(
            f"{r['family']:12s} {r['path']:5s} {r['tok_s']:8.1f} {r['limit_tok_s']:8.1f} "
            f"{100 * r['tok_s'] / r['limit_tok_s']:5.0f}% {r['bytes_per_token'] / 1e6:9.1f} {r['gb_s']:7.1f} "
            f"{rel:>14s} {r['peak_gib']:9.2f}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default: the shape's own; 32 for Llama-2-7B)"
    )
    ap.add_argument("--context", type=int, default=4096, help="KV cache sized for this many tokens (memory figure)")
    ap.add_argument("--kv-cache", default="fp16")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--family",
        default=None,
        help="comma-separated shapes of bench.random_checkpoint.FAMILIES (llama2-7b, llama3-8b, qwen2.5-7b, "
        "mistral-7b, gemma3-12b; tiny-llama, tiny-gemma3 for CPU tests) or 'all': random models built in memory "
        "on the device, "
        "their rates against llama2-7b's per byte read (include llama2-7b for that column)",
    )
    ap.add_argument("--paths", default="pq", help="with --family: pq and/or fp16 (comma-separated)")
    ap.add_argument("--rounds", type=int, default=2, help="with --family: decode runs per model (median)")
    ap.add_argument("--baseline", default="llama2-7b", help="with --family: the shape the GB/s column is compared to")
    ap.add_argument("--device", default=None, help="with --family: cuda (default when present) or cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.family is not None:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        result = run_families(args, device)
        print_families(result)
        if args.json:
            print(json.dumps(result))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench.decode needs a CUDA GPU (or --family ... --device cpu)")
    args.layers = args.layers or LLAMA2_7B["num_hidden_layers"]
    from athena_runtime.model_runner import ModelRunner

    dev = torch.device("cuda")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="athena-decode-"))
    t0 = time.perf_counter()
    ckpt = checkpoint(work, layers=args.layers)
    log.info("random checkpoint ready in %.1fs", time.perf_counter() - t0)
    cfg = dict(LLAMA2_7B, num_hidden_layers=args.layers)
    bw = copy_bandwidth(dev)
    g = torch.Generator().manual_seed(int(time.time()))
    prompt = torch.randint(3, cfg["vocab_size"], (args.prompt,), generator=g).tolist()
    kv_tok_fp16 = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    rows = []

    # --- our PQ path
    torch.cuda.reset_peak_memory_stats()
    bs = 16
    runner = ModelRunner.from_path(
        ckpt,
        kv_format=args.kv_cache,
        block_size=bs,
        num_blocks=args.context // bs,
        device=dev,
        max_model_len=args.context,
    )
    tps, _ = decode_runner(runner, prompt, args.new)
    tps2, _ = decode_runner(runner, prompt, args.new)
    peak = torch.cuda.max_memory_allocated() / 2**30
    wb = weight_bytes(runner.model)
    kv_read = runner.kv_cache.bytes_per_token() * (args.prompt + args.new / 2)
    rows.append(
        {
            "path": f"athena PQ ({args.kv_cache} KV)",
            "tok_s": statistics.median([tps, tps2]),
            "weight_gb": wb / 1e9,
            "limit_tok_s": bw / (wb + kv_read),
            "peak_gib": peak,
        }
    )
    del runner
    torch.cuda.empty_cache()

    # --- our fp16 path: same model, dense fp16 weights (built in memory, random)
    from athena_runtime.format.config import ModelConfig
    from athena_runtime.kv_cache import KVCache
    from athena_runtime.loader import LinearBuilder, _materialize
    from athena_runtime.model import CausalLM

    mc = ModelConfig.from_hf_config(cfg)
    gen = torch.Generator(device=dev).manual_seed(1)

    class RandomTensors(dict):
        """Creates each requested fp16 tensor on the GPU on first access (no 13 GB file)."""

        def __init__(self, shapes):
            super().__init__()
            self.shapes = shapes

        def get(self, name, default=None):
            if name not in self.shapes:
                return default
            if not dict.__contains__(self, name):
                self[name] = torch.randn(self.shapes[name], generator=gen, device=dev, dtype=torch.float16) * 0.02
            return dict.__getitem__(self, name)

        def __contains__(self, name):
            return name in self.shapes

        def __iter__(self):
            return iter(self.shapes)

        def __getitem__(self, name):
            return self.get(name)

    with torch.device("meta"):
        shapes_model = CausalLM(mc)
    shapes = {n: tuple(p.shape) for n, p in shapes_model.named_parameters()}
    del shapes_model
    torch.cuda.reset_peak_memory_stats()
    tensors = RandomTensors(shapes)
    model = CausalLM(mc, LinearBuilder(tensors, {}, dev, torch.float16), args.context)
    _materialize(model, tensors, dev, torch.float16, ckpt)
    model.to(dev).eval()
    del tensors
    kv = KVCache.create(args.kv_cache, mc.num_layers, args.context // bs, bs, mc.num_kv_heads, mc.head_dim, dev)
    runner = ModelRunner(model, mc, kv, dev, max_model_len=args.context)
    tps, _ = decode_runner(runner, prompt, args.new)
    tps2, _ = decode_runner(runner, prompt, args.new)
    wb = weight_bytes(model)
    rows.append(
        {
            "path": f"athena fp16 ({args.kv_cache} KV)",
            "tok_s": statistics.median([tps, tps2]),
            "weight_gb": wb / 1e9,
            "limit_tok_s": bw / (wb + kv_read),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
    )
    del runner, model, kv
    torch.cuda.empty_cache()

    # --- HF transformers fp16 (eager generate, dynamic cache)
    if not args.skip_hf:
        torch.cuda.reset_peak_memory_stats()
        tps, wb = decode_hf(cfg, prompt, min(args.new, 64), dev)
        rows.append(
            {
                "path": "HF transformers fp16 (eager)",
                "tok_s": tps,
                "weight_gb": wb / 1e9,
                "limit_tok_s": bw / (wb + kv_tok_fp16 * (args.prompt + 32)),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
        )

    result = {
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_gb_s": bw / 1e9,
        "prompt": args.prompt,
        "new_tokens": args.new,
        "layers": args.layers,
        "context_for_memory": args.context,
        "rows": rows,
    }
    print(f"\n{result['device']}, copy bandwidth {bw / 1e9:.0f} GB/s, prompt {args.prompt}, {args.new} new tokens")
    print(f"{'path':34s} {'tok/s':>8s} {'limit':>8s} {'% lim':>6s} {'weights GB':>10s} {'peak GiB':>9s}")
    for r in rows:
        print(
            f"{r['path']:34s} {r['tok_s']:8.1f} {r['limit_tok_s']:8.1f} {100 * r['tok_s'] / r['limit_tok_s']:5.0f}% "
            f"{r['weight_gb']:10.2f} {r['peak_gib']:9.2f}"
        )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
