"""Projections that read the same input, computed as one linear layer: q/k/v and gate/up.

A 7B decode step calls seven linear layers per decoder layer; fusing q, k, v into one and gate, up
into one leaves four calls, each a taller matrix (better for the PQ kernels, whose fixed cost per
call is several µs) and three fewer split-K epilogues. `SplitLinear(x)` returns the parts as views
of one output tensor (no copies; the fused element-wise kernels take strided rows).

`fuse_projections(model)` runs after loading: dense layers are concatenated as they are, PQ layers
with `PQLinear.concat` (which refuses, with a log line, parts that do not fit one layout).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from athena_runtime.kernels.fused_ops import GATED_ACTIVATIONS, silu_mul
from athena_runtime.log_once import log_once
from athena_runtime.pq_linear import PQLinear

log = logging.getLogger(__name__)


class SplitLinear(nn.Module):
    """One linear layer whose output rows [offsets[p], offsets[p] + sizes[p]) are part p."""

    def __init__(self, linear: nn.Module, offsets: list[int], sizes: list[int]):
        super().__init__()
        self.linear, self.offsets, self.sizes = linear, list(offsets), list(sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.linear(x)
        return tuple(y[..., o : o + n] for o, n in zip(self.offsets, self.sizes))

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(part 0) · part 1 (gate/up): a PQ layer does it in its split-K epilogue (one launch less per
        call, half the output written), other layers through `fused_ops.silu_mul`."""
        if len(self.sizes) != 2 or self.sizes[0] != self.sizes[1]:
            raise ValueError(f"silu_mul needs two parts of one size, got {self.sizes}")
        if isinstance(self.linear, PQLinear) and self.offsets[0] == 0:
            return self.linear(x, glu=(self.offsets[1], self.sizes[0]))
        gate, up = self(x)
        return silu_mul(gate, up)

    def gated(self, x: torch.Tensor, act: str) -> torch.Tensor:
        """act(part 0) · part 1 for the MLP's activation `act` (ModelConfig.hidden_act). SiLU goes through
        `silu_mul` (fused into the PQ epilogue); the PQ epilogues fuse SiLU only, so GELU-tanh (Gemma) takes the
        whole gate/up output and one `gelu_tanh_mul` launch more per layer (logged once)."""
        if act == "silu":
            return self.silu_mul(x)
        if isinstance(self.linear, PQLinear):
            log_once(
                log,
                ("gated", act),
                logging.WARNING,
                "fused gate/up: the PQ split-K epilogue fuses SiLU only; %s(gate) · up runs as its own kernel "
                "after the projection (one launch and the [T, 2F] output more per layer)",
                act,
            )
        gate, up = self(x)
        return GATED_ACTIVATIONS[act](gate, up)

    def extra_repr(self) -> str:
        return f"parts={self.sizes}"


def fuse(parts: list[nn.Module]) -> SplitLinear | None:
    """The fused layer, or None when the parts cannot share one (the reason is logged)."""
    sizes = [p.out_features for p in parts]
    if all(isinstance(p, PQLinear) for p in parts):
        fused = PQLinear.concat(parts)
        return None if fused is None else SplitLinear(fused[0], fused[1], sizes)
    if all(type(p) is nn.Linear for p in parts) and len({p.in_features for p in parts}) == 1:
        has_bias = any(p.bias is not None for p in parts)
        w = torch.cat([p.weight for p in parts])
        linear = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if has_bias:
            linear.bias = nn.Parameter(
                torch.cat([p.bias if p.bias is not None else w.new_zeros(p.out_features) for p in parts]),
                requires_grad=False,
            )
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        return SplitLinear(linear, offsets, sizes)
    log.info("not fusing %s: mixed layer types", [type(p).__name__ for p in parts])
    return None


def fuse_projections(model: nn.Module) -> int:
    """Replace each decoder layer's q/k/v by `qkv_proj` and gate/up by `gate_up_proj` where they fit.
    Returns how many fused layers were made (logged)."""
    made = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            attn.qkv_proj = qkv
            del attn.q_proj, attn.k_proj, attn.v_proj
            made += 1
        gate_up = fuse([mlp.gate_proj, mlp.up_proj])
        if gate_up is not None:
            mlp.gate_up_proj = gate_up
            del mlp.gate_proj, mlp.up_proj
            made += 1
    log.info("fused projections: %d of %d (q/k/v and gate/up per layer)", made, 2 * len(model.model.layers))
    return made
