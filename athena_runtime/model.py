"""The decoder of every supported family (format/config.py: Llama, Mistral, Qwen2, Qwen3, Gemma 3), over a flat
batch of tokens and the paged KV cache.

Module names mirror Hugging Face's (`model.layers.3.self_attn.q_proj`, `lm_head`, ...), so checkpoint
tensors map 1:1 onto parameters. Every linear layer comes from a `LinearFactory(prefix, in, out, bias)`:
by default an `nn.Linear` on the meta device; the loader passes one that builds dense or `PQLinear`
layers from the checkpoint. Embeddings and norms are created on the meta device and materialized by
the loader.

Shapes: T tokens in the flat batch, H heads, Hkv KV heads, D head_dim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from athena_runtime.batch import AttentionMetadata
from athena_runtime.format.config import ModelConfig, RopeConfig, rope_inv_freq
from athena_runtime.kernels.fused_ops import GATED_ACTIVATIONS, add_rmsnorm, rope_
from athena_runtime.kernels.paged_attention import PagedAttention
from athena_runtime.log_once import log_once

log = logging.getLogger(__name__)

LinearFactory = Callable[[str, int, int, bool], nn.Module]  # (prefix, in_features, out_features, bias)


def meta_linear(prefix: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias, device="meta")


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, max_len: int | None = None, rope: RopeConfig | None = None):
        super().__init__()
        inv_freq = rope_inv_freq(rope or config.rope, config.head_dim, config.max_position_embeddings, max_len)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D / 2] float32

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset  # unit_offset (Gemma): the weight acts as (1 + w)
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(r), r) with r = x + residual (or x): the residual add and the norm as one kernel on the GPU.
        `out_dtype`: the norm's output dtype (default r's)."""
        return add_rmsnorm(x, residual, self.weight, self.eps, unit_offset=self.unit_offset, out_dtype=out_dtype)


class Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, prefix: str, linear: LinearFactory, paged_attention: PagedAttention
    ):
        super().__init__()
        c = config
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, c.num_heads, c.num_kv_heads, c.head_dim
        self.window = c.window(layer)
        self.scale, self.softcap = c.attn_scale, c.attn_softcap
        self.q_proj = linear(f"{prefix}.q_proj", c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias)
        self.k_proj = linear(f"{prefix}.k_proj", c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.v_proj = linear(f"{prefix}.v_proj", c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.o_proj = linear(f"{prefix}.o_proj", c.num_heads * c.head_dim, c.hidden_size, c.o_bias)
        self.qkv_proj = None  # set by split_linear.fuse_projections after loading (then q/k/v_proj are gone)
        if c.qk_norm:  # Qwen3, Gemma 3: each head of q and k RMS-normed before RoPE
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_unit_offset)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.norm_unit_offset)
        self.qk_norm = c.qk_norm
        self.paged_attention = paged_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x)  # views of one [T, (H + 2 Hkv) D] output
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        norm = (
            (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.q_norm.unit_offset) if self.qk_norm else None
        )
        q, k = rope_(
            q.view(T, self.num_heads, self.head_dim),  # [T, H, D]
            k.view(T, self.num_kv_heads, self.head_dim),
            cos,
            sin,
            qk_norm=norm,
        )  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        cache = attn.kv_cache
        cache.write(self.layer, k, v, attn.slot_mapping, attn.positions)
        # Attend in the cache's stored basis: the query moves in, the output back out (kv_cache.py).
        o = self.paged_attention(
            cache.query(self.layer, q),
            cache,
            self.layer,
            attn,
            self.scale,
            self.window,
            fresh_kv=(k, v),
            softcap=self.softcap,
        )
        return self.o_proj(cache.output(o).reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, prefix: str, linear: LinearFactory):
        super().__init__()
        c = config
        self.gate_proj = linear(f"{prefix}.gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.up_proj = linear(f"{prefix}.up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.down_proj = linear(f"{prefix}.down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)
        self.gate_up_proj = None  # set by split_linear.fuse_projections after loading
        self.act = c.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(self.gate_up_proj.gated(x, self.act))
        return self.down_proj(GATED_ACTIVATIONS[self.act](self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm residual block. Llama family: h + attn(norm(h)), then + mlp(norm(·)). Gemma ("sandwich"):
    the attention and MLP outputs are normed too (post_attention_layernorm, post_feedforward_layernorm)
    before the add, and the MLP's input norm is pre_feedforward_layernorm."""

    def __init__(self, config: ModelConfig, layer: int, linear: LinearFactory, paged_attention: PagedAttention):
        super().__init__()
        c = config
        prefix = f"model.layers.{layer}"
        norm = lambda: RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_unit_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(config, layer, f"{prefix}.self_attn", linear, paged_attention)
        self.post_attention_layernorm = norm()
        self.sandwich = c.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(config, f"{prefix}.mlp", linear)

    def forward(self, h, residual, cos, sin, attn):
        """h: the previous layer's output, residual: the stream before it (None at layer 0) -> (h, residual).
        Gemma: the stream (h, residual) may be float32 under float16 layers (CausalLM.forward); the pre-norms
        then hand the layers their own dtype, the post-norms the stream's."""
        if not self.sandwich:
            x, residual = self.input_layernorm(h, residual)
            x, residual = self.post_attention_layernorm(self.self_attn(x, cos, sin, attn), residual)
            return self.mlp(x), residual
        act = self.input_layernorm.weight.dtype
        x, residual = self.input_layernorm(h, residual, out_dtype=act)
        a = self.post_attention_layernorm(self.self_attn(x, cos, sin, attn), out_dtype=residual.dtype)[0]
        x, residual = self.pre_feedforward_layernorm(a, residual, out_dtype=act)
        return self.post_feedforward_layernorm(self.mlp(x), out_dtype=residual.dtype)[0], residual


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory, max_len: int | None):
        super().__init__()
        paged_attention = PagedAttention()  # one path chooser (and its log) for all layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device="meta")
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, i, linear, paged_attention) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.rotary_emb = RotaryEmbedding(config, max_len)
        # Gemma 3: sliding-window layers rotate with their own base (no buffers when every layer shares one RoPE)
        self.rotary_emb_local = (
            RotaryEmbedding(config, max_len, config.rope_local) if config.rope_local is not None else None
        )


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory = meta_linear, max_len: int | None = None):
        super().__init__()
        self.config = config
        self.model = Decoder(config, linear, max_len)
        self.lm_head = (
            None if config.tie_word_embeddings else linear("lm_head", config.hidden_size, config.vocab_size, False)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final-norm hidden states [T, hidden]; writes K/V of the T tokens."""
        h = self.model.embed_tokens(input_ids)  # [T, hidden]
        act = h.dtype  # the layers' dtype
        if self.config.embed_scale is not None:  # Gemma: the factor is rounded to the model dtype first (a host
            # scalar: the product is the same correctly rounded one, and nothing is copied inside a CUDA graph)
            h = h * torch.tensor(self.config.embed_scale, dtype=torch.float32).to(h.dtype).item()
        if self.config.sandwich_norms and h.dtype == torch.float16:
            # Gemma's residual stream outgrows float16 (Gemma-3-270M: |h| up to ~9e4 > 65504, all NaN after): it is
            # kept in float32, the layers' inputs and outputs (|x| < ~300 there) stay float16
            log_once(
                log,
                ("model", "fp32 residual"),
                logging.INFO,
                "Gemma in float16: the residual stream is "
                "kept in float32 (its values exceed float16's range), the layers run in float16",
            )
            h = h.float()
        rope = self.model.rotary_emb(positions, act)  # cos, sin [T, D]
        local = self.model.rotary_emb_local
        rope_local = local(positions, act) if local is not None else rope
        residual = None
        for i, layer in enumerate(self.model.layers):
            cos, sin = rope_local if self.config.sliding_layers[i] else rope
            h, residual = layer(h, residual, cos, sin, attn)
        return self.model.norm(h, residual, out_dtype=self.model.norm.weight.dtype)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, hidden] -> logits [R, vocab] (model dtype; Gemma's final soft-capping applied)."""
        if self.lm_head is None:
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
