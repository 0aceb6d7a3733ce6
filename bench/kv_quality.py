"""Held-out perplexity and bytes per token for each KV-cache format, through the runtime (our decoder,
PQLinear, the paged cache), on the compressed embedded model.

    python -m bench.kv_quality [--model DIR] [--max-tokens 16384] [--seqlen 512]

Each window is prefilled in 64-token chunks that attend to the earlier chunks through the quantized
cache (athena_runtime.perplexity), so the cache format's error reaches every later token.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FORMATS = (("fp16", False), ("int8", False), ("int4", False))  # (format, --kv-hadamard); int4 always rotates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="compressed checkpoint (default: the embedded one)")
    ap.add_argument("--out", default="out/kv_quality")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from athena_runtime.perplexity import eval_ppl_runtime
    from bench.quantize_quality import heldout_file
    from quantize.embedded import resolve_model_arg

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = heldout_file(out)
    model = resolve_model_arg(args.model)
    rows = []
    for fmt, hadamard in FORMATS:
        r = eval_ppl_runtime(
            model, [str(held)], args.seqlen, args.max_tokens, fmt, kv_hadamard=hadamard, device=args.device
        )
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = rows[0]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {args.device}, model {Path(model).name}, "
        f"{base['tokens']} held-out tokens, seqlen {args.seqlen}, 64-token prefill chunks.",
        "",
        "| KV cache | bytes/token (all layers) | vs fp16 | perplexity | Δ vs fp16 KV |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        name = (
            r["kv_cache"] + (" + Hadamard" if r["kv_hadamard"] else "") + (" + key basis" if r["kv_key_basis"] else "")
        )
        lines.append(
            f"| {name} | {r['kv_bytes_per_token']} | {base['kv_bytes_per_token'] / r['kv_bytes_per_token']:.2f}x | "
            f"{r['ppl']:.4f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
