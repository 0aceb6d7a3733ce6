"""The CPU execution path's linear layers: weights stored compact, multiplied by a compiled kernel.

On the CPU the reference path (pq_linear.py) keeps every layer dequantized as float32 and calls
`x @ Wᵀ`: a SmolLM2-135M decode step then streams ~0.5 GB of weights (memory-bound). Here each
layer's effective weight W_eff = Ŵ + A·B (PQ reconstruction plus the low-rank term, as the reference
computes it) is stored as

    int8   per output channel:  W_eff[n, :] ≈ scale[n] · q[n, :],  q in [-127, 127],
           scale[n] = max|W_eff[n, :]| / 127, so |W_eff - scale·q| <= scale / 2 element-wise;
    fp16   W_eff rounded to float16 (relative error <= 2^-11);

and `y = x W_effᵀ + bias` runs in `kernels/cpu_linear.c` (fp32 activations and accumulation, the
weight converted in registers; 1 or 2 bytes a weight instead of 4). Layers that read the same input
(q/k/v, gate/up) are concatenated into one (no PQ codebook-block padding here: the weights are
dense). The tied or separate lm_head becomes one more such layer.

`convert_model(model, weights)` rewrites a loaded CausalLM in place; `cpu_path.py` decides whether
to (and logs it).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from athena_runtime.kernels.cpu_build import CPUKernels
from athena_runtime.pq_linear import PQLinear
from athena_runtime.split_linear import SplitLinear

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("int8", "fp16")
KERNELS = CPUKernels()  # built on first use, shared by every layer of the process


def effective_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_eff float32 [N, M], bias float32 [N] or None) of a PQLinear or dense nn.Linear, as the
    reference path computes them."""
    if isinstance(layer, PQLinear):
        return layer.effective_weight(), None if layer.bias is None else layer.bias.float()
    if isinstance(layer, nn.Linear):
        return layer.weight.float(), None if layer.bias is None else layer.bias.float()
    if isinstance(layer, CPULinear):
        return layer.dequantize(), layer.bias
    raise TypeError(f"no CPU weights for a {type(layer).__name__}")


def quantize_rows_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W float32 [N, M] -> (q int8 [N, M], scale float32 [N]) with W ≈ scale[:, None] · q."""
    amax = W.abs().amax(1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(W / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.float().contiguous()


class CPULinear(nn.Module):
    """y = x W_effᵀ + bias with W_eff stored as int8 (+ per-row scale) or fp16; x and y float32."""

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None, weights: str = "int8"):
        super().__init__()
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"unknown CPU weight format {weights!r}; choose one of {WEIGHT_FORMATS}")
        self.weights = weights
        self.out_features, self.in_features = W.shape
        W = W.float()
        if weights == "int8":
            q, scale = quantize_rows_int8(W)
        else:
            q, scale = W.half().contiguous(), None
        self.register_buffer("qweight", q, persistent=False)  # int8 / float16 [N, M]
        self.register_buffer("scale", scale, persistent=False)  # float32 [N] or None
        self.register_buffer("bias", None if bias is None else bias.float().contiguous(), persistent=False)
        self._lib = KERNELS.load()
        self._fn = self._lib.i8_linear if weights == "int8" else self._lib.f16_linear

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel multiplies by, float32 [N, M]."""
        if self.scale is None:
            return self.qweight.float()
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        T = x2.shape[0]
        y = torch.empty(T, self.out_features, dtype=torch.float32)
        if T:
            self._fn(x2.data_ptr(), T, self.in_features, self.qweight.data_ptr(),
                     None if self.scale is None else self.scale.data_ptr(),
                     None if self.bias is None else self.bias.data_ptr(), y.data_ptr(), self.out_features,
                     torch.get_num_threads())
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}"


def fused(parts: list[nn.Module], weights: str) -> SplitLinear:
    """One CPULinear over the concatenated rows of `parts` (same input), split back into views."""
    Ws, biases = zip(*(effective_weight(p) for p in parts))
    sizes = [W.shape[0] for W in Ws]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else W.new_zeros(W.shape[0]) for W, b in zip(Ws, biases)])
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return SplitLinear(CPULinear(torch.cat(Ws), bias, weights), offsets, sizes)


def _parts(module: nn.Module, fused_name: str, names: tuple[str, ...]) -> list[nn.Module]:
    """The unfused layers of q/k/v or gate/up, whether split_linear fused them (PQ or dense) or not."""
    split = getattr(module, fused_name, None)
    if split is None:
        return [getattr(module, n) for n in names]
    W, bias = effective_weight(split.linear)
    out = []
    for off, size in zip(split.offsets, split.sizes):
        part = nn.Linear(W.shape[1], size, bias=bias is not None, device="meta")
        part.weight = nn.Parameter(W[off:off + size], requires_grad=False)
        if bias is not None:
            part.bias = nn.Parameter(bias[off:off + size], requires_grad=False)
        out.append(part)
    return out


@torch.inference_mode()
def convert_model(model: nn.Module, weights: str = "int8", lm_head_weights: str | None = None) -> dict:
    """Rewrite every decoder linear layer (and the lm_head) of a loaded CausalLM as CPULinear, in place.
    Returns {"layers": count, "weight_bytes": bytes now streamed per token, "reference_bytes": fp32 bytes}."""
    lm_head_weights = lm_head_weights or weights
    made, nbytes, ref_bytes = 0, 0, 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = fused(_parts(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")), weights)
        for name in ("q_proj", "k_proj", "v_proj"):
            if hasattr(attn, name):
                delattr(attn, name)
        attn.o_proj = CPULinear(*effective_weight(attn.o_proj), weights)
        mlp.gate_up_proj = fused(_parts(mlp, "gate_up_proj", ("gate_proj", "up_proj")), weights)
        for name in ("gate_proj", "up_proj"):
            if hasattr(mlp, name):
                delattr(mlp, name)
        mlp.down_proj = CPULinear(*effective_weight(mlp.down_proj), weights)
        for lin in (attn.qkv_proj.linear, attn.o_proj, mlp.gate_up_proj.linear, mlp.down_proj):
            made += 1
            nbytes += lin.qweight.numel() * lin.qweight.element_size()
            ref_bytes += lin.qweight.numel() * 4
    if model.lm_head is None:
        W, bias = model.model.embed_tokens.weight.float(), None  # tied: the embedding matrix
    else:
        W, bias = effective_weight(model.lm_head)
    model.lm_head = CPULinear(W, bias, lm_head_weights)  # compute_logits uses lm_head when it is set
    made += 1
    nbytes += model.lm_head.qweight.numel() * model.lm_head.qweight.element_size()
    ref_bytes += model.lm_head.qweight.numel() * 4
    return {"layers": made, "weight_bytes": nbytes, "reference_bytes": ref_bytes}
