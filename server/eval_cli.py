"""`athena eval ppl`: perplexity of a source model or compressed checkpoint, through the reference model
(`quantize.evaluate`) or through the Athena runtime with a paged KV cache (`athena_runtime.perplexity`).

An application command beside `athena serve` and `athena chat`: it may use both the quantizer (the embedded
default model is quantized on first use) and the runtime, which never import each other.
"""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", metavar="WHAT")
    p = esub.add_parser("ppl", help="perplexity on held-out text")
    p.add_argument(
        "model", nargs="?", help="source model or compressed checkpoint (default: the embedded compressed model)"
    )
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="held-out text files (.txt or .jsonl)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument(
        "--kv-cache",
        choices=("none", "fp16", "int8", "int4"),
        default="none",
        help="evaluate through the Athena runtime with this paged KV-cache format (default: none = reference model)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.set_defaults(func=cmd_eval_ppl)


def cmd_eval_ppl(args) -> int:
    from quantize.embedded import resolve_model_arg

    if getattr(args, "eval_command", None) != "ppl":
        print("usage: athena eval ppl [MODEL] --data FILE...", file=sys.stderr)
        return 2
    model = resolve_model_arg(args.model)
    if args.kv_cache != "none":
        from athena_runtime.perplexity import eval_ppl_runtime

        result = eval_ppl_runtime(model, args.data, args.seqlen, args.max_tokens, args.kv_cache)
    else:
        from quantize.evaluate import eval_ppl

        result = eval_ppl(model, args.data, args.seqlen, args.max_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        bpw = result["bits_per_weight"]
        print(
            f"{result['model']}: perplexity {result['ppl']:.4f} over {result['tokens']} tokens"
            + (f" at {bpw:.3f} bits/weight" if bpw else "")
        )
    return 0
