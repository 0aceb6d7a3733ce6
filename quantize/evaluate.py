"""Perplexity on held-out text, for a source model or a compressed one.

A compressed checkpoint is evaluated through the PyTorch reference dequantization: the Hugging Face
model is rebuilt from the copied config with every quantized linear replaced by its W_eff.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from athena_runtime.format import checkpoint
from athena_runtime.format.source import load_hf_model, load_tokenizer, resolve_source
from athena_runtime.format.text import read_text_files, tokenize_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    tokens: int
    seconds: float


def load_compressed_as_hf(path: Path, dtype: torch.dtype = torch.float32):
    """A transformers model whose weights are the checkpoint's reference dequantization."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from athena_runtime.format.layers import layer_from_tensors

    meta, tensors = checkpoint.read_checkpoint(path)
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    state: dict[str, torch.Tensor] = {}
    for prefix, layer_meta in meta["layers"].items():
        layer = layer_from_tensors(prefix, tensors, layer_meta)
        state[f"{prefix}.weight"] = layer.dequantize().to(dtype)
        if layer.bias is not None:
            state[f"{prefix}.bias"] = layer.bias.to(dtype)
    quantized_keys = {k for p in meta["layers"] for k in tensors if k.startswith(p + ".")}
    for name, t in tensors.items():
        if name not in quantized_keys:
            state[name] = t.to(dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    # Buffers (rotary inv_freq; Gemma's embedding scale) were created on meta: build them again on CPU.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    embed = model.model.embed_tokens
    if hasattr(embed, "scalar_embed_scale"):  # Gemma: embeddings · sqrt(hidden)
        embed.embed_scale = torch.tensor(embed.scalar_embed_scale, dtype=torch.float32)
    on_meta = [name for name, b in model.named_buffers() if b.is_meta]
    if on_meta:
        raise ValueError(f"{path}: buffers left unbuilt for {type(model).__name__}: {on_meta[:5]}")
    model.eval()
    model.config.use_cache = False
    return model, meta


def load_for_eval(model_path: str | Path):
    """(model, tokenizer, athena meta or None) for a source model or a compressed checkpoint."""
    p = Path(model_path)
    if checkpoint.is_checkpoint(p):
        model, meta = load_compressed_as_hf(p)
        return model, load_tokenizer(p), meta
    src = resolve_source(p)
    return load_hf_model(src.path), load_tokenizer(src.path), None


@torch.no_grad()
def perplexity(
    model, ids: torch.Tensor, seqlen: int, max_tokens: int | None = None, batch_size: int = 4
) -> PerplexityResult:
    """exp(mean NLL) over non-overlapping windows of `seqlen` tokens of ids [T] (first token of each
    window is context only)."""
    if seqlen < 2:
        raise ValueError("--seqlen must be >= 2")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    nwin = ids.numel() // seqlen
    if nwin == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    windows = ids[: nwin * seqlen].view(nwin, seqlen)
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    for s in range(0, nwin, batch_size):
        x = windows[s : s + batch_size]
        logits = model(input_ids=x, use_cache=False).logits.float()  # [b, S, V]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += x[:, 1:].numel()
    return PerplexityResult(ppl=math.exp(nll / count), tokens=count, seconds=time.perf_counter() - t0)


def eval_ppl(model_path: str | Path, data: list[str], seqlen: int, max_tokens: int | None) -> dict:
    model, tokenizer, meta = load_for_eval(model_path)
    ids = tokenize_text(tokenizer, read_text_files(data))
    res = perplexity(model, ids, seqlen, max_tokens)
    bpw = meta["bits_per_weight"] if meta else None
    return {
        "model": str(model_path),
        "ppl": res.ppl,
        "tokens": res.tokens,
        "seqlen": seqlen,
        "seconds": res.seconds,
        "bits_per_weight": bpw["linear"] if bpw else None,
        "bits_per_weight_file": bpw.get("file") if bpw else None,
        "method": meta["method"] if meta else None,
        "recipe": meta["recipe"] if meta else None,
    }
