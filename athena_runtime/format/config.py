"""The decoder architecture, read from a Hugging Face `config.json`.

Supported families (pre-norm decoders with RMSNorm, RoPE, GQA and a gated MLP):
- Llama (1-3.x), Mistral, Qwen2: SwiGLU, optional biases and sliding windows;
- Qwen3: Qwen2 without the q/k/v bias, plus an RMSNorm over each head of q and k before RoPE;
- Gemma 3 (text, `gemma3_text`): RMSNorm weights applied as (1 + w), embeddings scaled by sqrt(hidden),
  GELU-tanh gated MLP, q/k norms, norms around attention and MLP outputs too ("sandwich"), interleaved
  sliding-window / global layers with their own RoPE, a query scale of query_pre_attn_scalar^-1/2 and
  optional tanh soft-capping of attention scores and final logits.
Both the transformers-5 layout (`rope_parameters`, per layer type for Gemma 3) and the older one
(`rope_theta` + `rope_scaling`, Gemma's `rope_local_base_freq`) are read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# config.json's activation name -> ours (both gate activations of a gated MLP: act(gate) · up)
SUPPORTED_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}

_ARCHITECTURE_CLASSES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
}
_GEMMA_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # transformers' defaults


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters`)."""

    theta: float = 10000.0
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0  # linear / dynamic / llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    sliding_window: int | None = None  # keys at positions > p - sliding_window are visible from p
    sliding_layers: tuple[bool, ...] = ()  # per layer: does the window apply there
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    mlp_bias: bool = False  # Llama with mlp_bias
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"  # "silu" | "gelu_tanh": the MLP's act(gate) · up
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k (weights [D]) before RoPE
    norm_unit_offset: bool = False  # Gemma: every RMSNorm multiplies by (1 + w), in float32, rounded once
    sandwich_norms: bool = False  # Gemma: attention and MLP outputs are normed before the residual add
    embed_scale: float | None = None  # Gemma: embeddings · sqrt(hidden), that factor rounded to the model dtype
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale query_pre_attn_scalar^-1/2 (else D^-1/2)
    attn_softcap: float | None = None  # scores -> c·tanh(scores / c) before the softmax (Gemma 2's; no supported
    # family sets it from config.json: Gemma 3 dropped it for q/k norms. The attention paths implement it.)
    final_softcap: float | None = None  # logits -> c·tanh(logits / c)
    rope_local: RopeConfig | None = None  # Gemma 3: the RoPE of sliding-window layers (None: `rope` everywhere)

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for full causal attention."""
        if self.sliding_window is None or not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> RopeConfig:
        """The RoPE parameters of `layer` (Gemma 3's sliding layers have their own)."""
        if self.rope_local is not None and self.sliding_layers[layer]:
            return self.rope_local
        return self.rope

    @property
    def attn_scale(self) -> float:
        """The softmax scale of q·k."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        architecture = _architecture(hf)
        gemma = architecture == "gemma3_text"
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden activation {act!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if gemma and hf.get("attn_logit_softcapping") is not None:
            log.warning(
                "config.json sets attn_logit_softcapping=%s, which Gemma 3 does not use (transformers' "
                "Gemma3Attention ignores it too): attention scores are not soft-capped",
                hf["attn_logit_softcapping"],
            )
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention (an embedding model) is not supported: causal decoders only")
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        num_layers = int(hf["num_hidden_layers"])
        window, sliding_layers = _sliding_window(architecture, hf, num_layers)
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            architecture=architecture,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_config(hf, "full_attention" if gemma else None),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            sliding_window=window,
            sliding_layers=sliding_layers,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "qwen2" or attention_bias,
            o_bias=architecture in ("llama", "qwen3", "gemma3_text") and attention_bias,
            mlp_bias=architecture == "llama" and bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hidden_act=SUPPORTED_ACTIVATIONS[act],
            qk_norm=architecture in ("qwen3", "gemma3_text"),
            norm_unit_offset=gemma,
            sandwich_norms=gemma,
            embed_scale=hidden**0.5 if gemma else None,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma else None,
            final_softcap=_optional_float(hf.get("final_logit_softcapping")) if gemma else None,
            rope_local=_rope_config(hf, "sliding_attention") if gemma else None,
        )


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _architecture(hf: dict) -> str:
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type in SUPPORTED_ARCHITECTURES:
        return model_type
    if model_type == "gemma3":
        raise ValueError(
            "model_type 'gemma3' is the multimodal Gemma 3 (Gemma3ForConditionalGeneration, the "
            "4B/12B/27B releases): only its text model is supported (model_type 'gemma3_text', "
            "Gemma3ForCausalLM, e.g. gemma-3-1b and gemma-3-270m, or a gemma3 GGUF)"
        )
    if model_type is None:
        for name in architectures:
            if name in _ARCHITECTURE_CLASSES:
                return _ARCHITECTURE_CLASSES[name]
    raise ValueError(
        f"unsupported model: model_type={model_type!r}, architectures={architectures!r}; "
        f"supported model types: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _sliding_window(architecture: str, hf: dict, num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = hf.get("sliding_window")
    if architecture == "llama" or window is None:
        return None, (False,) * num_layers
    if architecture in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        return None, (False,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        sliding = tuple(t == "sliding_attention" for t in layer_types)
    elif architecture == "gemma3_text":  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
        sliding = tuple(bool((i + 1) % pattern) for i in range(num_layers))
    elif architecture in ("qwen2", "qwen3"):  # transformers: layers i >= max_window_layers use the window
        first = int(hf.get("max_window_layers", num_layers))
        sliding = tuple(i >= first for i in range(num_layers))
    else:
        sliding = (True,) * num_layers
    if len(sliding) != num_layers:
        raise ValueError(f"layer_types has {len(sliding)} entries for {num_layers} layers")
    return int(window), sliding


def _rope_config(hf: dict, layer_type: str | None = None) -> RopeConfig:
    """The RoPE of all layers, or (Gemma 3, `layer_type` given) of that layer type: transformers 5 keeps
    one `rope_parameters` dict per type; older configs have rope_theta + rope_scaling for the global layers
    and rope_local_base_freq for the sliding ones."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    default_theta = 10000.0
    if layer_type is not None:
        default_theta = _GEMMA_DEFAULT_THETA[layer_type]
        if any(k in params for k in _GEMMA_DEFAULT_THETA):  # transformers 5: per layer type
            params = dict(params.get(layer_type) or {})
        elif layer_type == "sliding_attention":  # older: local layers are unscaled, with their own base
            params, legacy = {"rope_theta": hf.get("rope_local_base_freq", default_theta)}, {}
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    original = params.get("original_max_position_embeddings")
    if rope_type == "llama3" and original is None:
        raise ValueError("llama3 rope scaling needs original_max_position_embeddings")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=None if original is None else int(original),
    )


def rope_inv_freq(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, max_len: int | None = None
) -> torch.Tensor:
    """Inverse frequencies [D / 2] float32, computed as transformers does for each rope type.

    "dynamic" (NTK) is exact for contexts up to max_position_embeddings (where it equals "default");
    for a longer `max_len` the base is stretched once for max_len (static, as vLLM does), whereas
    transformers re-stretches as the sequence grows.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [D / 2]
    base = rope.theta
    if rope.rope_type == "dynamic":
        seq_len = max(max_len or max_position_embeddings, max_position_embeddings)
        if seq_len > max_position_embeddings:
            log.warning(
                "dynamic NTK rope: frequencies fixed for %d positions (transformers rescales per sequence length)",
                seq_len,
            )
        stretch = rope.factor * seq_len / max_position_embeddings - (rope.factor - 1)
        base = base * stretch ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq
