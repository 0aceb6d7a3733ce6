"""Quality of compressed checkpoints against the reference, token by token: perplexity (and its ratio to the
reference's), KL(reference ‖ quantized) of the next-token distributions and top-1 agreement, on the first
`--max-tokens` of the held-out Python documentation (`bench.quantize_quality.heldout_file`: never the
calibration text), with bits per linear weight from the checkpoints' stored bytes.

    python -m bench.quality_ablation reference --out out/abl            # once: the reference's log-probs
    python -m bench.quality_ablation eval out/abl/A out/abl/B ... --out out/abl   # one JSON line per checkpoint
    python -m bench.quality_ablation table --out out/abl                # rows.jsonl -> table.md

The reference's log-probabilities are cached (fp16, `ref_logprobs.pt`) so every checkpoint is compared with
the same numbers and evaluations of different checkpoints can run in separate processes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def _windows(tokenizer, out: Path, max_tokens: int, seqlen: int) -> torch.Tensor:
    from bench.quantize_quality import heldout_file
    from quantize.calibration import read_text_files, tokenize_text

    ids = tokenize_text(tokenizer, read_text_files([str(heldout_file(out))]))[:max_tokens]
    nwin = ids.numel() // seqlen
    return ids[: nwin * seqlen].view(nwin, seqlen)


@torch.no_grad()
def _logprobs(model, x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)  # [b, S, V]


@torch.no_grad()
def cache_reference(out: Path, max_tokens: int, seqlen: int, batch: int) -> dict:
    from athena_runtime.format.source import load_hf_model, load_tokenizer
    from quantize.embedded import reference_model_path

    path = reference_model_path()
    model, tok = load_hf_model(path), load_tokenizer(path)
    windows = _windows(tok, out, max_tokens, seqlen)
    logp = torch.cat([_logprobs(model, windows[s : s + batch]).half() for s in range(0, len(windows), batch)])
    torch.save({"windows": windows, "logprobs": logp}, out / "ref_logprobs.pt")
    return {"name": "reference", "path": str(path), **_scores(logp, logp, windows), "bits": 16.0}


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
def evaluate(ckpt: Path, out: Path, batch: int) -> dict:
    from quantize.evaluate import load_compressed_as_hf

    cache = torch.load(out / "ref_logprobs.pt")
    windows, ref = cache["windows"], cache["logprobs"]
    model, meta = load_compressed_as_hf(ckpt)
    t0 = time.perf_counter()
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
    recipe = meta.get("recipe", {})
    return {
        "name": ckpt.name,
        "path": str(ckpt),
        "method": meta["method"],
        "recipe": recipe,
        "bits": meta["bits_per_weight"]["linear"],
        "bytes_linear": meta["bytes"]["linear"],
        "ppl": math.exp(acc["nll"] / n),
        "kl": acc["kl"] / n,
        "top1": acc["top1"] / n,
        "tokens": n,
        "quantize_seconds": meta["seconds"],
        "eval_seconds": time.perf_counter() - t0,
    }


def table(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()]
    ref = next(r for r in rows if r["name"] == "reference")
    lines = [
        f"held-out tokens {ref['tokens']}, reference perplexity {ref['ppl']:.3f}",
        "",
        "| run | bits/linear weight (stored) | perplexity | ratio to reference | KL (nats/token) | top-1 agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["name"] == "reference":
            continue
        lines.append(
            f"| {r.get('label', r['name'])} | {r['bits']:.3f} | {r['ppl']:.3f} | {r['ppl'] / ref['ppl']:.3f}x | "
            f"{r['kl']:.4f} | {r['top1']:.2%} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("reference", "eval", "table"))
    ap.add_argument("checkpoints", nargs="*")
    ap.add_argument("--out", default="out/abl")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "table":
        print(table(out))
        return 0
    rows = (
        [cache_reference(out, args.max_tokens, args.seqlen, args.batch)]
        if args.what == "reference"
        else [evaluate(Path(c), out, args.batch) for c in args.checkpoints]
    )
    with open(out / "rows.jsonl", "a") as f:
        for r in rows:
            print(json.dumps(r), flush=True)
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
