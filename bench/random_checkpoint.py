"""A 7B-shaped Athena checkpoint with random contents, for speed benchmarks (speed does not depend on
the values). Written in the real format (FORMAT.md) through `quantize.qlayers`, so the runtime loads it
through its normal path; also writes an fp16 Hugging Face folder of the same shape for the baselines.

    python -m bench.random_checkpoint --out /tmp/llama7b [--fp16-out /tmp/llama7b-fp16] [--layers 32]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

LLAMA2_7B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=4096,
    intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float16",
)
LINEARS = {
    "self_attn.q_proj": ("hidden_size", "hidden_size"), "self_attn.k_proj": ("kv", "hidden_size"),
    "self_attn.v_proj": ("kv", "hidden_size"), "self_attn.o_proj": ("hidden_size", "hidden_size"),
    "mlp.gate_proj": ("intermediate_size", "hidden_size"), "mlp.up_proj": ("intermediate_size", "hidden_size"),
    "mlp.down_proj": ("hidden_size", "intermediate_size"),
}


def _tokenizer(out: Path, vocab: int) -> None:
    """A byte-level BPE trained offline on pydoc_data.topics (a stand-in for the real tokenizer)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 8000), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant] {% endif %}")
    fast.save_pretrained(out)


def _dims(cfg: dict) -> dict:
    return {"hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
            "kv": cfg["num_key_value_heads"] * cfg["head_dim"]}


def build(out: Path, d: int = 2, n: int = 64, k: int = 4096, rank_frac: float = 0.01, layers: int | None = None,
          fp16_out: Path | None = None, seed: int = 0) -> dict:
    from safetensors.torch import save_file

    from quantize.pack import packed_width
    from quantize.recipe import AthenaRecipe

    cfg = dict(LLAMA2_7B, num_hidden_layers=layers or LLAMA2_7B["num_hidden_layers"])
    g = torch.Generator().manual_seed(seed)
    dims = _dims(cfg)
    recipe = AthenaRecipe(d=d, n=n, k=k, lowrank=rank_frac)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    dense = {
        "model.embed_tokens.weight": (torch.randn(V, H, generator=g) * 0.02).half(),
        "model.norm.weight": torch.ones(H, dtype=torch.float16),
        "lm_head.weight": (torch.randn(V, H, generator=g) * 0.02).half(),
    }
    packed: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    fp16: dict[str, torch.Tensor] = dict(dense)
    for i in range(cfg["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            dense[f"model.layers.{i}.{norm}.weight"] = torch.ones(H, dtype=torch.float16)
            fp16[f"model.layers.{i}.{norm}.weight"] = dense[f"model.layers.{i}.{norm}.weight"]
        for name, (rows, cols) in LINEARS.items():
            N, M = dims[rows], dims[cols]
            G, Nb, r = -(-M // d), -(-N // k), recipe.rank(N, M)
            b = recipe.index_bits
            prefix = f"model.layers.{i}.{name}"
            # Random packed bytes are valid indices (every b-bit pattern is < n = 2^b); clear the
            # padding bits of the last byte as FORMAT.md requires.
            idx = torch.randint(0, 256, (N, packed_width(G, b)), generator=g, dtype=torch.uint8)
            if (G * b) % 8:
                idx[:, -1] &= (1 << ((G * b) % 8)) - 1
            layer = {
                f"{prefix}.indices": idx,
                f"{prefix}.codebook": torch.randint(0, 256, (Nb, G, n, d), generator=g, dtype=torch.uint8),
                f"{prefix}.codebook_scale": torch.full((Nb, G, d), 0.04 / 255, dtype=torch.float16),
                f"{prefix}.codebook_min": torch.full((Nb, G, d), -0.02, dtype=torch.float16),
            }
            if r:
                layer[f"{prefix}.lowrank_a"] = (torch.randn(N, r, generator=g) * 0.01).half()
                layer[f"{prefix}.lowrank_b"] = (torch.randn(r, M, generator=g) * 0.01).half()
            packed.update(layer)
            meta = {"method": "athena", "shape": [N, M], "d": d, "n": n, "k": k, "codebook_bits": 8, "rank": r}
            nbytes = sum(t.numel() * t.element_size() for t in layer.values())
            stats[prefix] = dict(meta, bits_per_weight=8 * nbytes / (N * M), proxy_loss=None, seconds=0.0)
            if fp16_out is not None:
                fp16[f"{prefix}.weight"] = (torch.randn(N, M, generator=g) * 0.02).half()
    out.mkdir(parents=True, exist_ok=True)
    save_file({**dense, **packed}, str(out / "model.safetensors"), metadata={"format": "athena", "format_version": "1"})
    nparams = sum(dims[r] * dims[c] for r, c in LINEARS.values()) * cfg["num_hidden_layers"] + 2 * V * H
    linear_bytes = sum(t.numel() * t.element_size() for t in packed.values())
    linear_params = sum(s["shape"][0] * s["shape"][1] for s in stats.values())
    meta = {
        "format": "athena", "format_version": 1, "architecture": "llama",
        "source": {"path": "random (bench.random_checkpoint)", "kind": "random"},
        "method": "athena", "recipe": {"d": d, "n": n, "k": k, "codebook_bits": 8, "lowrank": rank_frac},
        "layers": stats, "num_layers": cfg["num_hidden_layers"], "source_parameters": nparams,
        "bytes": {"linear": linear_bytes, "file": (out / "model.safetensors").stat().st_size},
        "bits_per_weight": {"linear": 8 * linear_bytes / linear_params,
                            "file": 8 * (out / "model.safetensors").stat().st_size / nparams},
        "complete": True,
    }
    (out / "athena.json").write_text(json.dumps(meta, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    _tokenizer(out, cfg["vocab_size"])
    if fp16_out is not None:
        fp16_out.mkdir(parents=True, exist_ok=True)
        save_file(fp16, str(fp16_out / "model.safetensors"), metadata={"format": "pt"})
        (fp16_out / "config.json").write_text(json.dumps(cfg, indent=1))
        _tokenizer(fp16_out, cfg["vocab_size"])
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fp16-out", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--codebook", default="2,64,4096")
    ap.add_argument("--lowrank", type=float, default=0.01)
    args = ap.parse_args(argv)
    d, n, k = (int(v) for v in args.codebook.split(","))
    meta = build(args.out, d, n, k, args.lowrank, args.layers, args.fp16_out)
    print(f"wrote {args.out}: {meta['bits_per_weight']['linear']:.3f} bits/weight (linear)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
