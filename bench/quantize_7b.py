"""Quantization time and peak GPU memory for one Llama-2-7B-shaped decoder layer (random weights,
random calibration activations), projected to the whole 32-layer model.

    python -m bench.quantize_7b [--nsamples 128 --seqlen 2048] [--codebook 2,64,4096] [--json]

Runs the real driver code path (Hessians from hooks, Athena on every linear, propagation through the
quantized layer). Speed does not depend on the weights' values, so random weights are fine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--codebook", default="2,64,4096")
    ap.add_argument("--codebook-bits", type=int, default=8)
    ap.add_argument("--lowrank", type=float, default=0.01)
    ap.add_argument("--method", default="athena", choices=("athena", "gptq", "rtn"))
    ap.add_argument("--layers", type=int, default=32, help="layers of the projected model")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from quantize.driver import LayerContext, QuantizeJob, quantize_layer, run_layer
    from quantize.recipe import AthenaRecipe, ScalarRecipe

    if not torch.cuda.is_available():
        raise SystemExit("bench.quantize_7b needs a CUDA GPU")
    dev = torch.device("cuda")
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=32,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(dev, torch.float32)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    inps = torch.randn(args.nsamples, args.seqlen, 4096, device=dev, dtype=torch.float16)
    pos = torch.arange(args.seqlen, device=dev)[None]
    cos, sin = LlamaRotaryEmbedding(cfg).to(dev)(inps[:1].float(), pos)
    i = torch.arange(args.seqlen, device=dev)
    mask = torch.where(i[:, None] >= i[None, :], 0.0, torch.finfo(torch.float32).min)[None, None]
    ctx = LayerContext(pos, {"full_attention": (cos, sin)}, {"full_attention": mask}, ["full_attention"])
    d, n, k = (int(v) for v in args.codebook.split(","))
    job = QuantizeJob(
        model="random-7b-layer",
        out="",
        method=args.method,
        athena=AthenaRecipe(d=d, n=n, k=k, codebook_bits=args.codebook_bits, lowrank=args.lowrank),
        scalar=ScalarRecipe(method=args.method if args.method != "athena" else "gptq", bits=3, group_size=128),
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tensors, stats = quantize_layer(layer, 0, "model.layers.0", inps, ctx, job)
    torch.cuda.synchronize()
    t_quant = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_layer(layer, 0, inps, ctx, job.batch_size)
    torch.cuda.synchronize()
    t_prop = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    per_layer = t_quant + t_prop
    result = {
        "device": torch.cuda.get_device_name(),
        "method": args.method,
        "recipe": job.recipe_dict(),
        "calibration_tokens": args.nsamples * args.seqlen,
        "seconds_quantize_layer": t_quant,
        "seconds_propagate_layer": t_prop,
        "projected_minutes": per_layer * args.layers / 60,
        "peak_gpu_gib": peak,
        "per_linear": {
            k.split(".")[-1]: {
                "seconds": round(v["seconds"], 2),
                "bits_per_weight": round(v["bits_per_weight"], 3),
                "proxy_loss": v["proxy_loss"],
            }
            for k, v in stats.items()
        },
    }
    print(
        f"{result['device']}: {args.method} layer {t_quant:.1f}s + propagate {t_prop:.1f}s -> "
        f"{result['projected_minutes']:.1f} min for {args.layers} layers; peak GPU {peak:.1f} GiB"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
