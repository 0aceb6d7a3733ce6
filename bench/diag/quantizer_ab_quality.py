"""Two versions of the Athena quantizer on the same layers of the embedded SmolLM2-135M: the relative output error
of each linear layer on HELD-OUT activations, tr(E H_h Eᵀ) / tr(W H_h Wᵀ) (Hessians for quantizing from the
calibration text, H_h from the held-out Python docs), as bench/diag/row_scale_proxy.py does for row scales.
For checking that a faster quantizer gives the same quality.

    python -m bench.diag.quantizer_ab_quality --baseline /tmp/base --layers 0,15,29 [--codebook 2,64,4096]

``--baseline DIR``: DIR holds the other version's ``quantize/`` package (``git archive <commit> quantize | tar -x
-C DIR``). Both versions get the same Hessians (this checkout's HessianAccumulator).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--codebook", default="2,64,4096")
    ap.add_argument("--lowrank", type=float, default=0.01)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default="out/quantizer_ab")
    ap.add_argument("--noise-seed", type=int, default=None, help="also the current version with this k-means seed")
    args = ap.parse_args(argv)

    from athena_runtime.format.source import load_hf_model, load_tokenizer
    from bench.diag.quantize_layer_time import _baseline_quantizer
    from bench.quantize_quality import heldout_file
    from quantize.athena import quantize_athena
    from quantize.calibration import CalibConfig, calibration_batch, read_text_files, tokenize_text
    from quantize.driver import LINEAR_GROUPS, _submodule
    from quantize.embedded import reference_model_path
    from quantize.hessian import HessianAccumulator
    from quantize.recipe import AthenaRecipe

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = reference_model_path()
    model, tok = load_hf_model(path), load_tokenizer(path)
    calib = calibration_batch(tok, CalibConfig(nsamples=args.windows, seqlen=args.seqlen, seed=0))
    held = tokenize_text(tok, read_text_files([str(heldout_file(out))]))[: args.windows * args.seqlen]
    held = held.view(-1, args.seqlen)
    layers = [int(v) for v in args.layers.split(",")]
    d, n, k = (int(v) for v in args.codebook.split(","))
    recipe = AthenaRecipe(d=d, n=n, k=k, lowrank=args.lowrank)
    versions = {"baseline": _baseline_quantizer(Path(args.baseline)), "current": quantize_athena}
    if args.noise_seed is not None:  # the spread a k-means seed makes: what "equal within noise" means

        def reseeded(weights, H, r):
            return quantize_athena(weights, H, dataclasses.replace(r, seed=args.noise_seed))

        versions[f"current-seed{args.noise_seed}"] = reseeded

    def hessians(ids):
        accs, hooks = {}, []
        for i in layers:
            for group in LINEAR_GROUPS:
                name = f"model.layers.{i}.{group[0]}"
                mod = _submodule(model, name)
                acc = accs[name] = HessianAccumulator(mod.in_features)
                hooks.append(mod.register_forward_hook(lambda m, a, o, acc=acc: acc.add_batch(a[0])))
        with torch.no_grad():
            for row in ids:
                model(input_ids=row.unsqueeze(0), use_cache=False)
        for h in hooks:
            h.remove()
        return {name: acc.hessian(0.0) for name, acc in accs.items()}

    Hc, Hh = hessians(calib), hessians(held)
    rows, cpu_total = [], dict.fromkeys(versions, 0.0)
    for i in layers:
        for group in LINEAR_GROUPS:
            key = f"model.layers.{i}.{group[0]}"
            Ws = [_submodule(model, f"model.layers.{i}.{g}").weight.detach().float() for g in group]
            for label, quantizer in versions.items():
                t0 = time.process_time()
                results = quantizer(Ws, Hc[key], recipe)
                cpu_s = time.process_time() - t0
                cpu_total[label] += cpu_s
                for g, W, (layer, stats) in zip(group, Ws, results):
                    E = W - layer.dequantize()
                    rows.append(
                        {
                            "layer": f"{i}.{g}",
                            "version": label,
                            "heldout_rel_err": float(((E @ Hh[key]) * E).sum() / ((W @ Hh[key]) * W).sum()),
                            "calib_proxy_loss": stats["proxy_loss"],
                            "cpu_s_group": cpu_s,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    for label in versions:
        mine = [r for r in rows if r["version"] == label]
        gm = float(torch.tensor([r["heldout_rel_err"] for r in mine]).log().mean().exp())
        print(
            f"{label}: geometric-mean held-out relative error {gm:.6f} over {len(mine)} layers; "
            f"{cpu_total[label]:.0f} CPU s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
