"""Per-output-row scales of an Athena layer (FORMAT.md version 2; read and checked in athena_runtime.format.layers):
the epilogue that applies them.

    y = s ⊙ (x Ŵᵀ + (x Bᵀ) Aᵀ) + bias        s fp16 [N]

The PQ kernels compute the bracket (they get no bias); this epilogue scales their output, adds the bias and,
for a fused gate/up layer, applies silu(gate) · up afterwards (the kernels' fused SiLU epilogue would run
before the scale). On CPU the reference path folds s into its cached W_eff instead.
"""

from __future__ import annotations

import torch

from athena_runtime.kernels.fused_ops import silu_mul


def row_scale_epilogue(
    y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, glu: tuple[int, int] | None
) -> torch.Tensor:
    """y [T, N] (kernel output, no bias) -> s ⊙ y + bias [T, N], or silu(gate) · up [T, F] with glu=(offset, F)."""
    y = y * scale
    if bias is not None:
        y = y + bias
    if glu is None:
        return y
    up0, F = glu
    return silu_mul(y[:, :F].contiguous(), y[:, up0 : up0 + F].contiguous())
