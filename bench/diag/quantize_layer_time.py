"""Seconds to quantize one decoder layer of the embedded SmolLM2-135M with the default job, the way
`athena serve` does on first use (CPU, default recipe, default calibration windows), and where they go.

    python -m bench.diag.quantize_layer_time --layers 0,15 [--repeat 2] [--profile 25] [--threads 1]
    python -m bench.diag.quantize_layer_time --layers 0,15 --repeat 2 --baseline /tmp/base   # A/B

``--baseline DIR``: DIR holds another version's ``quantize/`` package (e.g. ``git archive <commit> quantize |
tar -x -C DIR``); its ``quantize_athena`` and this checkout's run alternately on the same layer, in one
process (A/B interleaved, so machine load hits both alike).

The calibration activations reach each layer through the unquantized layers before it (no error
propagation: timing does not depend on it). Reports per layer: Hessian collection, each linear group's
quantization, the propagation through the quantized layer, and the proxy loss of every linear layer
(so a faster quantizer can be checked for unchanged results). ``--profile N`` prints cProfile's top N
functions by own time for the first timed layer.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads outside the quantizer (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline", default=None, help="folder holding another version's quantize/ package")
    ap.add_argument(
        "--thread-counts", default="", help="e.g. 2,1: each variant once per torch thread count (the whole layer)"
    )
    args = ap.parse_args(argv)

    import quantize.driver as driver
    from athena_runtime.format.source import load_hf_model, load_tokenizer
    from quantize.calibration import calibration_batch
    from quantize.driver import QuantizeJob, build_context, embed, quantize_layer, run_layer
    from quantize.embedded import reference_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    job = QuantizeJob(model="embedded", out="")
    job = QuantizeJob(model="embedded", out="", calib=job.calib.resolved(dev.type))
    path = reference_model_path()
    model, tok = load_hf_model(path), load_tokenizer(path)
    ids = calibration_batch(tok, job.calib)
    ctx = build_context(model, ids.shape[1], dev, torch.float32)
    inps = embed(model, ids, dev, torch.float32)
    variants = {"current": driver.quantize_athena}
    if args.baseline:
        variants = {"baseline": _baseline_quantizer(Path(args.baseline)), **variants}
    counts = [int(v) for v in args.thread_counts.split(",") if v] or [torch.get_num_threads()]
    variants = {(f"{k}@{t}t" if len(counts) > 1 else k): (v, t) for k, v in variants.items() for t in counts}
    wanted = sorted(int(v) for v in args.layers.split(","))
    print(f"load {os.getloadavg()}, threads {torch.get_num_threads()}, calibration {tuple(ids.shape)}", flush=True)
    for i in range(wanted[-1] + 1):
        layer = model.model.layers[i].to(dev, torch.float32)
        if i in wanted:
            for rep, (label, (quantizer, threads)) in ((r, v) for r in range(args.repeat) for v in variants.items()):
                driver.quantize_athena = quantizer
                torch.set_num_threads(threads)
                work = copy.deepcopy(layer)
                prof = cProfile.Profile() if args.profile and i == wanted[0] and rep == 0 else None
                t0 = time.perf_counter()
                if prof:
                    prof.enable()
                _, stats = quantize_layer(work, i, f"model.layers.{i}", inps, ctx, job)
                t1 = time.perf_counter()
                run_layer(work, i, inps, ctx, job.batch_size)
                t2 = time.perf_counter()
                if prof:
                    prof.disable()
                    s = io.StringIO()
                    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.profile)
                    print(s.getvalue())
                row = {
                    "layer": i,
                    "rep": rep,
                    "variant": label,
                    "quantize_s": round(t1 - t0, 2),
                    "propagate_s": round(t2 - t1, 2),
                    "per_linear_s": {k.split(".", 3)[-1]: round(v["seconds"], 2) for k, v in stats.items()},
                    "proxy_loss": {k.split(".", 3)[-1]: v["proxy_loss"] for k, v in stats.items()},
                    "load": os.getloadavg()[0],
                }
                print(json.dumps(row), flush=True)
        inps = run_layer(layer, i, inps, ctx, job.batch_size)
    return 0


def _baseline_quantizer(folder: Path):
    """``quantize_athena`` of the ``quantize/`` package under `folder`, imported as ``quantize_baseline``."""
    pkg = folder / "quantize"
    spec = importlib.util.spec_from_file_location(
        "quantize_baseline", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["quantize_baseline"] = module
    spec.loader.exec_module(module)
    quantize_athena = importlib.import_module("quantize_baseline.athena").quantize_athena
    Recipe = importlib.import_module("quantize_baseline.recipe").AthenaRecipe

    def run(weights, H, recipe, **kw):  # the baseline package checks for its own recipe class
        return quantize_athena(weights, H, Recipe(**dataclasses.asdict(recipe)), **kw)

    return run


if __name__ == "__main__":
    raise SystemExit(main())
