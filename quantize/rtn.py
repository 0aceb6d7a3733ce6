"""Round-to-nearest scalar baseline, and the asymmetric min-max grid it shares with GPTQ.

Grid per row and group of ``g`` input columns: the range [min(w, 0), max(w, 0)] split into
``2^bits - 1`` steps; ``scale`` is stored fp16 and ``zero`` (in steps) is an integer, so
``W = (q - zero) * scale`` reproduces exactly what was used while quantizing.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from athena_runtime.format.layers import ScalarLayer

from .hessian import proxy_loss
from .recipe import ScalarRecipe

_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)


def grid_params(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """w [..., g] -> (scale fp32 [...] with fp16-representable values, zero fp32 [...] integers in 0..2^bits-1)."""
    maxq = (1 << bits) - 1
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    both_zero = (lo == 0) & (hi == 0)
    lo = torch.where(both_zero, -torch.ones_like(lo), lo)
    hi = torch.where(both_zero, torch.ones_like(hi), hi)
    scale = ((hi - lo) / maxq).to(torch.float16).float().clamp(min=_FP16_TINY)
    zero = (-lo / scale).round().clamp(0, maxq)
    return scale, zero


def quantize_to_grid(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """w [...], broadcastable scale/zero -> integer codes (as fp32) in 0..2^bits-1."""
    return (w / scale).round().add(zero).clamp(0, (1 << bits) - 1)


def _check_weight(W: Tensor, H: Tensor | None, name: str) -> None:
    if not isinstance(W, Tensor) or W.dim() != 2 or W.shape[0] < 1 or W.shape[1] < 1 or not W.dtype.is_floating_point:
        raise ValueError(f"{name}: W must be a non-empty 2-D float tensor, got {getattr(W, 'shape', type(W).__name__)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name}: W contains NaN or inf")
    if H is not None:
        M = W.shape[1]
        if not isinstance(H, Tensor) or tuple(H.shape) != (M, M):
            raise ValueError(f"{name}: H must be [{M}, {M}], got {getattr(H, 'shape', type(H).__name__)}")
        if not bool(torch.isfinite(H).all()):
            raise ValueError(f"{name}: H contains NaN or inf")


@torch.no_grad()
def quantize_rtn(W: Tensor, recipe: ScalarRecipe, H: Tensor | None = None) -> tuple[ScalarLayer, dict]:
    """Round every weight to its group's grid. W [N, M]; H (optional, undamped) only for the proxy loss."""
    if not isinstance(recipe, ScalarRecipe):
        raise ValueError(f"quantize_rtn needs a ScalarRecipe, got {type(recipe).__name__}")
    _check_weight(W, H, "quantize_rtn")
    t0 = time.perf_counter()
    N, M = W.shape
    g, bits = recipe.group_size, recipe.bits
    groups = -(-M // g)
    Wf = W.to(torch.float32)
    Wg = torch.nn.functional.pad(Wf, (0, groups * g - M)).view(N, groups, g)  # zero padding: 0 is in every range
    scale, zero = grid_params(Wg, bits)  # [N, groups]
    q = quantize_to_grid(Wg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).reshape(N, groups * g)[:, :M]
    layer = ScalarLayer(
        shape=(N, M),
        bits=bits,
        group_size=g,
        method="rtn",
        q=q.to(torch.uint8),
        scales=scale.to(torch.float16),
        zeros=zero.to(torch.float16),
    )
    stats = {
        "proxy_loss": None if H is None else proxy_loss(Wf, layer.dequantize(), H.to(Wf)),
        "proxy_loss_hessian": "undamped",
        "seconds": time.perf_counter() - t0,
    }
    return layer, stats
