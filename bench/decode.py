"""End-to-end batch-1 decode on a Llama-2-7B-shaped model with random weights: our PQ path, our fp16
path and HF transformers fp16, in one run on one GPU, each against its memory-bandwidth limit.

    python -m bench.decode [--prompt 128 --new 256] [--layers 32] [--json]

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

from bench.random_checkpoint import LLAMA2_7B, build

log = logging.getLogger("bench.decode")


def copy_bandwidth(device) -> float:
    """bytes/s of a large device-to-device copy (bytes read + bytes written), median of 20."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); y.copy_(x); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * x.numel() / statistics.median(times[5:])


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer read per decode token (embedding: one row)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name:
            total += t.shape[1] * t.element_size()
        elif "inv_freq" not in name:
            total += t.numel() * t.element_size()
    return total


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
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pos = len(prompt)
    for _ in range(new):
        logits = runner.execute([SequenceChunk([tok], pos, table)])
        tok = int(logits.argmax(-1))
        out.append(tok)
        pos += 1
    torch.cuda.synchronize()
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=4096, help="KV cache sized for this many tokens (memory figure)")
    ap.add_argument("--kv-cache", default="fp16")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench.decode needs a CUDA GPU")
    from athena_runtime.model_runner import ModelRunner

    dev = torch.device("cuda")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="athena-decode-"))
    ckpt = work / "llama7b-athena"
    t0 = time.perf_counter()
    if not (ckpt / "athena.json").exists():
        build(ckpt, layers=args.layers)
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
    runner = ModelRunner.from_path(ckpt, kv_format=args.kv_cache, block_size=bs, num_blocks=args.context // bs,
                                   device=dev, max_model_len=args.context)
    tps, _ = decode_runner(runner, prompt, args.new)
    tps2, _ = decode_runner(runner, prompt, args.new)
    peak = torch.cuda.max_memory_allocated() / 2**30
    wb = weight_bytes(runner.model)
    kv_read = runner.kv_cache.bytes_per_token() * (args.prompt + args.new / 2)
    rows.append({"path": f"athena PQ ({args.kv_cache} KV)", "tok_s": statistics.median([tps, tps2]),
                 "weight_gb": wb / 1e9, "limit_tok_s": bw / (wb + kv_read), "peak_gib": peak})
    del runner
    torch.cuda.empty_cache()

    # --- our fp16 path: same model, dense fp16 weights (built in memory, random)
    from athena_runtime.kv_cache import KVCache
    from athena_runtime.loader import LinearBuilder, _materialize
    from athena_runtime.config import ModelConfig
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
                self[name] = (torch.randn(self.shapes[name], generator=gen, device=dev, dtype=torch.float16) * 0.02)
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
    rows.append({"path": f"athena fp16 ({args.kv_cache} KV)", "tok_s": statistics.median([tps, tps2]),
                 "weight_gb": wb / 1e9, "limit_tok_s": bw / (wb + kv_read),
                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
    del runner, model, kv
    torch.cuda.empty_cache()

    # --- HF transformers fp16 (eager generate, dynamic cache)
    if not args.skip_hf:
        torch.cuda.reset_peak_memory_stats()
        tps, wb = decode_hf(cfg, prompt, min(args.new, 64), dev)
        rows.append({"path": "HF transformers fp16 (eager)", "tok_s": tps, "weight_gb": wb / 1e9,
                     "limit_tok_s": bw / (wb + kv_tok_fp16 * (args.prompt + 32)),
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30})

    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": bw / 1e9, "prompt": args.prompt,
              "new_tokens": args.new, "layers": args.layers, "context_for_memory": args.context, "rows": rows}
    print(f"\n{result['device']}, copy bandwidth {bw / 1e9:.0f} GB/s, prompt {args.prompt}, {args.new} new tokens")
    print(f"{'path':34s} {'tok/s':>8s} {'limit':>8s} {'% lim':>6s} {'weights GB':>10s} {'peak GiB':>9s}")
    for r in rows:
        print(f"{r['path']:34s} {r['tok_s']:8.1f} {r['limit_tok_s']:8.1f} {100 * r['tok_s'] / r['limit_tok_s']:5.0f}% "
              f"{r['weight_gb']:10.2f} {r['peak_gib']:9.2f}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
