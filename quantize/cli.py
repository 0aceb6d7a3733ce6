"""`athena quantize`: flags map 1:1 onto QuantizeJob / recipe fields."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _codebook(text: str) -> tuple[int, int, int]:
    try:
        d, n, k = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected d,n,k (three integers), got {text!r}") from None
    return d, n, k


def register(sub) -> None:
    from quantize.calibration import CalibConfig
    from quantize.finetune import FinetuneConfig
    from quantize.recipe import AthenaRecipe, ScalarRecipe

    a, s, c, f = AthenaRecipe(), ScalarRecipe(), CalibConfig(), FinetuneConfig()
    q = sub.add_parser("quantize", help="compress a model (HF folder or GGUF) into an Athena checkpoint")
    q.add_argument(
        "model", nargs="?", help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)"
    )
    q.add_argument("--out", help="output folder (default for the embedded model: the cache)")
    q.add_argument(
        "--method", choices=("athena", "gptq", "rtn"), default="athena", help="athena (default) or a scalar baseline"
    )
    q.add_argument(
        "--codebook",
        type=_codebook,
        default=(a.d, a.n, a.k),
        metavar="d,n,k",
        help=f"Athena vector dim, centroids per codebook, rows per codebook (default {a.d},{a.n},{a.k})",
    )
    q.add_argument(
        "--codebook-bits",
        type=int,
        choices=(8, 16),
        default=a.codebook_bits,
        help="codebook storage: uint8 with scales, or fp16",
    )
    q.add_argument(
        "--target-bits",
        type=float,
        default=None,
        metavar="B",
        help="bit budget: pick each linear layer's codebook shape (d, n) so that the stored bits per linear "
        "weight average at most B (Fisher-trace sensitivity, greedy knapsack); --codebook's k and the "
        "other recipe flags apply to every layer",
    )
    q.add_argument(
        "--lowrank",
        type=float,
        default=None,
        metavar="FRACTION",
        help=f"low-rank residual rank as a fraction of min(N, M); 0 = off "
        f"(default {a.lowrank}, or 0 with --target-bits)",
    )
    q.add_argument(
        "--row-scale",
        action="store_true",
        help="one fp16 scale per output row; rows are clustered normalized (format version 2, +16/M bits)",
    )
    q.add_argument(
        "--finetune",
        action="store_true",
        help="after each layer is quantized, train its codebooks, low-rank factors, row scales and norms (indices "
        "fixed) to reproduce the unquantized layer's outputs on the calibration windows (athena only; off by default)",
    )
    q.add_argument("--finetune-steps", type=int, default=f.steps, help="--finetune: Adam steps per layer")
    q.add_argument("--finetune-lr", type=float, default=f.lr, help="--finetune: Adam learning rate")
    q.add_argument("--kmeans-iters", type=int, default=a.kmeans_iters, help="k-means iterations per column group")
    q.add_argument("--damp", type=float, default=a.damp, help="Hessian dampening, fraction of mean(diag H)")
    q.add_argument("--bits", type=int, default=s.bits, help="rtn/gptq: bits per weight")
    q.add_argument("--group-size", type=int, default=s.group_size, help="rtn/gptq: columns per scale/zero group")
    q.add_argument(
        "--calib",
        nargs="+",
        default=[],
        metavar="FILE",
        help="calibration text files (.txt, or .jsonl with a 'text' field); default: pydoc_data.topics",
    )
    q.add_argument(
        "--nsamples", type=int, default=c.nsamples, help="calibration windows (default: 128 on a GPU, 32 on CPU)"
    )
    q.add_argument(
        "--seqlen",
        type=int,
        default=c.seqlen,
        help="tokens per calibration window (default: 2048 on a GPU, 512 on CPU)",
    )
    q.add_argument("--seed", type=int, default=c.seed, help="calibration sampling and k-means seed")
    q.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    q.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from athena_runtime.format.checkpoint import read_meta
    from quantize.allocate import BitBudget
    from quantize.calibration import CalibConfig
    from quantize.driver import QuantizeJob, run
    from quantize.embedded import default_model_path, embedded_gguf_path
    from quantize.finetune import FinetuneConfig
    from quantize.recipe import AthenaRecipe, ScalarRecipe

    d, n, k = args.codebook
    base = AthenaRecipe()
    budget = BitBudget(target_bits=args.target_bits) if args.target_bits is not None else None
    if budget is not None and args.method != "athena":
        raise ValueError("--target-bits picks Athena recipes: it cannot be combined with --method " + args.method)
    if args.lowrank is None:
        args.lowrank = 0.0 if budget is not None else base.lowrank
    athena = AthenaRecipe(
        d=d,
        n=n,
        k=k,
        codebook_bits=args.codebook_bits,
        lowrank=args.lowrank,
        row_scale=args.row_scale,
        kmeans_iters=args.kmeans_iters,
        damp=args.damp,
        seed=args.seed,
        block_size=base.block_size,
    )
    scalar = ScalarRecipe(
        method=args.method if args.method != "athena" else "gptq",
        bits=args.bits,
        group_size=args.group_size,
        damp=args.damp,
    )
    calib = CalibConfig(files=tuple(args.calib), nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    finetune = FinetuneConfig(steps=args.finetune_steps, lr=args.finetune_lr, seed=args.seed) if args.finetune else None
    model = args.model or str(embedded_gguf_path())
    if args.out is None:
        if args.model is not None:
            raise ValueError("--out is required when MODEL is given")
        job = QuantizeJob(
            model=model,
            out="",
            method=args.method,
            athena=athena,
            scalar=scalar,
            calib=calib,
            budget=budget,
            finetune=finetune,
        )
        if job != QuantizeJob(model=model, out="", calib=calib) or args.calib or args.device:
            raise ValueError("--out is required for non-default settings")
        out = default_model_path()
        meta = read_meta(out)
    else:
        job = QuantizeJob(
            model=model,
            out=args.out,
            method=args.method,
            athena=athena,
            scalar=scalar,
            calib=calib,
            device=args.device,
            resume=args.resume,
            budget=budget,
            finetune=finetune,
        )
        meta = run(job)
        out = Path(args.out)
    summary = {
        "out": str(out),
        "method": meta["method"],
        "bits_per_weight": meta["bits_per_weight"]["linear"],
        "bits_per_weight_file": meta["bits_per_weight"].get("file"),
        "seconds": meta["seconds"],
        "device": meta.get("device"),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {out}: {summary['bits_per_weight']:.3f} bits/weight (linear layers), "
            f"{summary['bits_per_weight_file']:.3f} (whole file), {summary['seconds']:.1f} s"
        )
    return 0
