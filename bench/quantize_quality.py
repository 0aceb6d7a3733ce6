"""Perplexity vs bits per weight on the embedded model: reference, RTN, GPTQ and Athena recipes,
all quantized by the same driver with the same calibration and evaluated on the same held-out text.

    python -m bench.quantize_quality --out out/quality [--max-tokens 32768] [--only NAME ...]

Held-out text: the .rst.txt sources of Python's documentation from Debian's python3.11-doc
(tutorial/, howto/, faq/), never the calibration text (pydoc_data.topics is cut from reference/ and
library/). The script reports the share of held-out 8-word shingles that also occur in the
calibration text, so the separation is checked, not assumed.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
HELDOUT_DIRS = ("tutorial", "howto", "faq")

# name -> (method, options)
CONFIGS: dict[str, tuple[str, dict]] = {
    "rtn-4b-g128": ("rtn", {"bits": 4, "group_size": 128}),
    "rtn-3b-g128": ("rtn", {"bits": 3, "group_size": 128}),
    "rtn-2b-g128": ("rtn", {"bits": 2, "group_size": 128}),
    "gptq-4b-g128": ("gptq", {"bits": 4, "group_size": 128}),
    "gptq-3b-g128": ("gptq", {"bits": 3, "group_size": 128}),
    "gptq-2b-g128": ("gptq", {"bits": 2, "group_size": 128}),
    "athena-2,64,4096-cb8-lr1%": ("athena", {"d": 2, "n": 64, "k": 4096, "codebook_bits": 8, "lowrank": 0.01}),
    "athena-2,64,4096-cb16-lr0": ("athena", {"d": 2, "n": 64, "k": 4096, "codebook_bits": 16, "lowrank": 0.0}),
    "athena-2,64,4096-cb8-lr0": ("athena", {"d": 2, "n": 64, "k": 4096, "codebook_bits": 8, "lowrank": 0.0}),
    "athena-2,32,4096-cb8-lr1%": ("athena", {"d": 2, "n": 32, "k": 4096, "codebook_bits": 8, "lowrank": 0.01}),
    "athena-1,8,4096-cb8-lr1%": ("athena", {"d": 1, "n": 8, "k": 4096, "codebook_bits": 8, "lowrank": 0.01}),
    "athena-2,16,4096-cb8-lr1%": ("athena", {"d": 2, "n": 16, "k": 4096, "codebook_bits": 8, "lowrank": 0.01}),
    "athena-2,16,4096-cb8-lr0": ("athena", {"d": 2, "n": 16, "k": 4096, "codebook_bits": 8, "lowrank": 0.0}),
    "athena-3,64,4096-cb8-lr1%": ("athena", {"d": 3, "n": 64, "k": 4096, "codebook_bits": 8, "lowrank": 0.01}),
}


def heldout_file(out: Path) -> Path:
    files = sorted(p for d in HELDOUT_DIRS for p in (DOC_ROOT / d).glob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no held-out text under {DOC_ROOT}: apt-get install python3.11-doc")
    path = out / "heldout.txt"
    path.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in files))
    return path


def shingle_overlap(heldout: str, calib: str, n: int = 8) -> float:
    def shingles(text):
        w = text.split()
        return {" ".join(w[i : i + n]) for i in range(0, len(w) - n)}

    h = shingles(heldout)
    return len(h & shingles(calib)) / max(1, len(h))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/quality")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-reference", action="store_true", help="skip the reference model's perplexity")
    args = ap.parse_args(argv)

    from quantize.calibration import CalibConfig, default_calibration_text
    from quantize.driver import QuantizeJob, run
    from quantize.embedded import embedded_gguf_path, reference_model_path
    from quantize.evaluate import eval_ppl
    from quantize.recipe import AthenaRecipe, ScalarRecipe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = heldout_file(out)
    overlap = shingle_overlap(held.read_text(), default_calibration_text())
    print(f"held-out {held.stat().st_size / 1e6:.1f} MB; 8-word shingle overlap with calibration: {overlap:.2%}")
    rows = []
    ref = {"ppl": float("nan"), "tokens": 0}
    if not args.no_reference:
        ref = eval_ppl(reference_model_path(), [str(held)], args.seqlen, args.max_tokens)
        rows.append({"name": "reference (fp16)", "bits": 16.0, "ppl": ref["ppl"], "tokens": ref["tokens"], "seconds": 0.0})
        print(json.dumps(rows[-1]))
    for name, (method, opts) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        qdir = out / name
        if method == "athena":
            job = QuantizeJob(model=str(embedded_gguf_path()), out=str(qdir), method="athena",
                              athena=AthenaRecipe(**opts), calib=CalibConfig(), device=args.device,
                              resume=qdir.exists())
        else:
            job = QuantizeJob(model=str(embedded_gguf_path()), out=str(qdir), method=method,
                              scalar=ScalarRecipe(method=method, **opts), calib=CalibConfig(), device=args.device,
                              resume=qdir.exists())
        if (qdir / "athena.json").exists():
            meta = json.loads((qdir / "athena.json").read_text())
        else:
            meta = run(job)
        r = eval_ppl(qdir, [str(held)], args.seqlen, args.max_tokens)
        rows.append({"name": name, "bits": meta["bits_per_weight"]["linear"], "bits_file": meta["bits_per_weight"]["file"],
                     "ppl": r["ppl"], "tokens": r["tokens"], "seconds": meta["seconds"], "device": meta["device"]})
        print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({platform.processor() or platform.machine()}), "
        f"commit {commit}; held-out tokens {ref['tokens']}, seqlen {args.seqlen}; calibration overlap {overlap:.2%}.",
        "",
        "| model | bits/weight (linear, stored) | bits/weight (file) | perplexity | Δ vs ref | quantize s | device |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        d = (r["ppl"] / ref["ppl"] - 1) * 100
        lines.append(f"| {r['name']} | {r['bits']:.3f} | {r.get('bits_file', float('nan')):.3f} | {r['ppl']:.3f} | "
                     f"{d:+.1f}% | {r['seconds']:.0f} | {r.get('device', '')} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
