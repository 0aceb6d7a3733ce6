"""The decoder architecture, read from a Hugging Face `config.json`.

Supported families: Llama, Mistral and Qwen2 (pre-norm decoders with RMSNorm, RoPE, GQA and a
SwiGLU MLP). Both the transformers-5 layout (`rope_parameters`) and the older one (`rope_theta` +
`rope_scaling`) are read.
"""
from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

_ARCHITECTURE_CLASSES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


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
    architecture: str  # "llama" | "mistral" | "qwen2"
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

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for full causal attention."""
        if self.sliding_window is None or not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        architecture = _architecture(hf)
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
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
            rope=_rope_config(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            sliding_window=window,
            sliding_layers=sliding_layers,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "qwen2" or attention_bias,
            o_bias=architecture == "llama" and attention_bias,
            mlp_bias=architecture == "llama" and bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _architecture(hf: dict) -> str:
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type in SUPPORTED_ARCHITECTURES:
        return model_type
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
    if architecture == "qwen2" and not hf.get("use_sliding_window", False):
        return None, (False,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        sliding = tuple(t == "sliding_attention" for t in layer_types)
    elif architecture == "qwen2":  # transformers: layers i >= max_window_layers use the window
        first = int(hf.get("max_window_layers", num_layers))
        sliding = tuple(i >= first for i in range(num_layers))
    else:
        sliding = (True,) * num_layers
    if len(sliding) != num_layers:
        raise ValueError(f"layer_types has {len(sliding)} entries for {num_layers} layers")
    return int(window), sliding


def _rope_config(hf: dict) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
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
