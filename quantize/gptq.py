"""GPTQ scalar baseline: column-by-column rounding with optimal error feedback, lazy block updates.

Same asymmetric min-max grid as RTN (per row, per group of ``g`` columns), computed from the
current (error-updated) weights when the group is reached; columns in natural order (no act-order).
With H⁻¹ = Uᵀ U (U upper), quantizing column c with error e updates the later columns by
``W[:, F] -= (e / U[c, c]) U[c, F]``.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from athena_runtime.format.layers import ScalarLayer

from .hessian import inverse_cholesky_upper, proxy_loss
from .recipe import ScalarRecipe
from .rtn import _check_weight, grid_params, quantize_to_grid


@torch.no_grad()
def quantize_gptq(W: Tensor, H: Tensor, recipe: ScalarRecipe) -> tuple[ScalarLayer, dict]:
    """W [N, M], H [M, M] the UNdamped calibration Hessian (the recipe's damping is applied here).

    Returns the layer and stats ``proxy_loss`` (relative, on the undamped H), ``damp`` (used), ``seconds``.
    """
    if not isinstance(recipe, ScalarRecipe):
        raise ValueError(f"quantize_gptq needs a ScalarRecipe, got {type(recipe).__name__}")
    if H is None:
        raise ValueError("quantize_gptq: H is required (use quantize_rtn without calibration data)")
    _check_weight(W, H, "quantize_gptq")
    t0 = time.perf_counter()
    N, M = W.shape
    g, bits, bs = recipe.group_size, recipe.bits, recipe.block_size
    H = H.to(device=W.device, dtype=torch.float32)
    H = 0.5 * (H + H.T)
    dead = torch.diagonal(H) == 0
    W0 = W.to(torch.float32).masked_fill(dead, 0.0)
    _, U, damp_used = inverse_cholesky_upper(H, recipe.damp)  # H_damped⁻¹ = Uᵀ U   [M, M]

    Wk = W0.clone()  # working copy, error-updated   [N, M]
    q = torch.empty(N, M, device=W.device, dtype=torch.uint8)
    groups = -(-M // g)
    scales = torch.empty(N, groups, device=W.device, dtype=torch.float32)
    zeros = torch.empty(N, groups, device=W.device, dtype=torch.float32)
    for b0 in range(0, M, bs):
        b1 = min(b0 + bs, M)
        W1 = Wk[:, b0:b1].clone()  # [N, bw], updated at once inside the block
        Err1 = torch.zeros(N, b1 - b0, device=W.device, dtype=torch.float32)
        for i in range(b1 - b0):
            c = b0 + i
            if c % g == 0:  # the group starts here: grid from its current weights
                e = min(c + g, M)
                cols = W1[:, i : min(e, b1) - b0]
                if e > b1:  # tail beyond the block still lacks this block's lazy update
                    tail = Wk[:, b1:e] - Err1[:, :i] @ U[b0:c, b1:e]
                    cols = torch.cat([cols, tail], 1)
                s, z = grid_params(cols, bits)
                scales[:, c // g], zeros[:, c // g] = s, z
            s, z = scales[:, c // g], zeros[:, c // g]
            w = W1[:, i]
            qc = quantize_to_grid(w, s, z, bits)
            q[:, c] = qc.to(torch.uint8)
            err = (w - (qc - z) * s) / U[c, c]  # [N]
            W1[:, i:].sub_(err.unsqueeze(1) * U[c, c:b1].unsqueeze(0))
            Err1[:, i] = err
        if b1 < M:
            Wk[:, b1:].addmm_(Err1, U[b0:b1, b1:], alpha=-1.0)
    layer = ScalarLayer(
        shape=(N, M),
        bits=bits,
        group_size=g,
        method="gptq",
        q=q,
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.float16),
    )
    stats = {
        "proxy_loss": proxy_loss(W0, layer.dequantize(), H),
        "proxy_loss_hessian": "undamped",
        "damp": damp_used,
        "seconds": time.perf_counter() - t0,
    }
    return layer, stats
