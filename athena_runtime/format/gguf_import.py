"""Convert a GGUF file (llama.cpp) into a Hugging Face model folder (config, fp16 safetensors, tokenizer).

The quantizer and the runtime then treat it like any Hugging Face checkpoint. GGUF block-quantized
tensors are dequantized with `gguf.quants`; the dequantized model is the fp16 reference.

Architectures: `llama` (q/k rows un-permuted: llama.cpp interleaves the rotary halves), `qwen2`, and
`gemma3` (-> `gemma3_text`): llama.cpp stores Gemma's RMSNorm weights as 1 + w (it multiplies by the
weight), so 1 is subtracted again; the settings GGUF does not carry are llama.cpp's fixed ones for
Gemma 3 (every 6th layer global, local RoPE base 10000, query scale 1/sqrt(head_dim) except for 27B).
A GGUF without a chat template gets its family's (`athena_runtime.format.chat_templates`), logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "gemma3")
_HF_CLASSES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
GEMMA3_SLIDING_PATTERN = 6  # llama.cpp: layers 6, 12, ... (1-based) are global, the others sliding
GEMMA3_LOCAL_ROPE_THETA = 10000.0

# GGUF tensor name (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.")
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA3_LAYER_NAMES = {  # Gemma 3's norms: sandwich around attention and MLP, q/k norms
    **LAYER_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves in q/k projections. w: [n_head*hd, M]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_config(reader, arch: str, tied: bool) -> dict:
    def a(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    n_head = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    vocab = a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    head_dim = int(a("attention.key_length", a("rope.dimension_count", hidden // n_head)))
    hf_class, model_type = _HF_CLASSES[arch]
    cfg = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(a("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(a("context_length", 4096)),
        "tie_word_embeddings": tied,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float16",
    }
    if arch == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    if arch == "gemma3":
        cfg.update(_gemma3_config(reader, a, cfg))
    return cfg


def _gemma3_config(reader, a, cfg: dict) -> dict:
    n_layers = cfg["num_hidden_layers"]
    # llama.cpp's query scale: 1/sqrt(hidden / heads) for the 27B model (62 layers), else 1/sqrt(head_dim)
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if n_layers == 62 else cfg["head_dim"]
    glob = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    if a("rope.scaling.type") == "linear" and a("rope.scaling.factor"):
        glob.update(rope_type="linear", factor=float(a("rope.scaling.factor")))
    eos = cfg["eos_token_id"]
    end_of_turn = _token_id(reader, "<end_of_turn>")  # the chat turn's end: generation stops there too
    eos_ids = [eos] if end_of_turn is None or end_of_turn == eos else [eos, end_of_turn]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(a("attention.sliding_window")),
        "layer_types": [
            "full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention" for i in range(n_layers)
        ],
        "rope_parameters": {
            "full_attention": glob,
            "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_THETA},
        },
        "final_logit_softcapping": a("final_logit_softcapping"),
        "attn_logit_softcapping": a("attn_logit_softcapping"),
        "eos_token_id": eos_ids,
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


# (low_freq_factor, high_freq_factor, original_max_position_embeddings) of the released Llama 3.1 / 3.2 / 3.3
LLAMA3_ROPE_CANDIDATES = ((1.0, 4.0, 8192),)


def llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """config.json's llama3 `rope_scaling` from llama.cpp's rope_freqs (inv_freq is divided by factors[i]): the
    released parameters that reproduce them, with factor = the largest divisor. Anything else is refused (a
    silently unscaled RoPE would be wrong past 8k tokens)."""
    from athena_runtime.format.config import RopeConfig, rope_inv_freq

    if factors.shape != (head_dim // 2,):
        raise ValueError(f"rope_freqs has {factors.shape[0]} entries, head_dim {head_dim} needs {head_dim // 2}")
    base = rope_inv_freq(RopeConfig(theta=theta), head_dim, 0).double().numpy()
    factor = round(float(factors.max()), 3)  # llama.cpp stores float32 divisors
    for low, high, original in LLAMA3_ROPE_CANDIDATES:
        rope = RopeConfig(
            theta=theta,
            rope_type="llama3",
            factor=factor,
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=original,
        )
        scaled = rope_inv_freq(rope, head_dim, 0).double().numpy()
        if np.allclose(base / scaled, factors, rtol=1e-3, atol=0):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    raise ValueError(
        f"rope_freqs (max {factor}) match no llama3 RoPE scaling with (low, high, original) in "
        f"{LLAMA3_ROPE_CANDIDATES}: not supported"
    )


def _token_id(reader, token: str) -> int | None:
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return None
    for i, idx in enumerate(field.data):
        if bytes(field.parts[idx]) == token.encode():
            return i
    return None


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, tokenizer: bool = True) -> Path:
    """Write a Hugging Face folder for `gguf_path` into `out_dir` and return it. `tokenizer=False` leaves the
    tokenizer out (config and weights only: enough to score token ids, e.g. bench.quality_ablation's llama.cpp
    rows, and minutes quicker for a 262k-token vocabulary)."""
    import gguf
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as exc:  # gguf raises assorted errors on foreign/truncated files
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_ARCHS)})"
        )
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    cfg = _hf_config(reader, arch, tied)
    layer_names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else LAYER_NAMES

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            hf = _GLOBAL_NAMES[t.name]
        elif t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in layer_names:
                raise ValueError(f"{gguf_path}: unexpected tensor {t.name!r} for architecture {arch}")
            hf = f"model.layers.{idx}.{layer_names[rest]}"
        elif t.name == "rope_freqs.weight":  # Llama 3.1+: the llama3 RoPE scaling as per-frequency divisors
            factors = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
            cfg["rope_scaling"] = llama3_rope_scaling(factors, cfg["rope_theta"], cfg["head_dim"])
            log.info("%s: rope_freqs -> llama3 RoPE scaling %s", gguf_path.name, cfg["rope_scaling"])
            continue
        else:
            raise ValueError(f"{gguf_path}: unexpected tensor {t.name!r}")
        shape = [int(s) for s in reversed(t.shape)]  # GGUF lists the fastest dim first
        w = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if arch == "llama" and rest_is(t.name, "attn_q.weight"):
            w = _unpermute_rope(w, cfg["num_attention_heads"])
        elif arch == "llama" and rest_is(t.name, "attn_k.weight"):
            w = _unpermute_rope(w, cfg["num_key_value_heads"])
        elif arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stored 1 + w
        tensors[hf] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.float16)

    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        _save_tokenizer(gguf_path, out_dir, cfg["model_type"])
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], **_sampling_defaults(reader)}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    log.info("converted %s -> %s (%d tensors, arch %s)", gguf_path.name, out_dir, len(tensors), arch)
    return out_dir


def _save_tokenizer(gguf_path: Path, out_dir: Path, model_type: str) -> None:
    """The GGUF's tokenizer (transformers builds it from the file) into out_dir, with its family's chat template
    where the file has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not getattr(tokenizer, "chat_template", None):
        from athena_runtime.format.chat_templates import family_chat_template

        template = family_chat_template(model_type)
        if template is not None:
            log.info("%s has no chat template: using the %s family's", gguf_path.name, model_type)
            tokenizer.chat_template = template
        else:
            log.warning(
                "%s has no chat template and its family has none here: chat requests get plain text", gguf_path.name
            )
    tokenizer.save_pretrained(out_dir)


# GGUF's recommended-sampling keys -> generation_config.json names (the server and `athena chat` use them as defaults)
_GGUF_SAMPLING = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def _sampling_defaults(reader) -> dict:
    """The file's recommended sampling settings, where it has them (invalid ones are left out, logged)."""
    from athena_runtime.format.generation_defaults import check_knob

    found = {}
    for key, name in _GGUF_SAMPLING.items():
        value = _field(reader, key)
        if value is None:
            continue
        try:
            found[name] = check_knob(name, value)
        except ValueError as exc:
            log.warning("GGUF %s: %s; left out", key, exc)
    return found


def rest_is(gguf_name: str, suffix: str) -> bool:
    return gguf_name.startswith("blk.") and gguf_name.endswith("." + suffix)
