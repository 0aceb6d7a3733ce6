"""Per-layer sensitivity for mixed-precision allocation (APTQ, DESIGN.md §1): the trace of each linear
layer's loss Hessian, and each recipe's expected weight error on that layer.

APTQ ranks layers by the trace of the Hessian of the model's loss with respect to each layer's weights,
and for q/k it derives that Hessian through attention's softmax instead of the layer-local ``2 X Xᵀ``
(which would treat q/k as if their outputs entered the loss linearly). We take the trace of the Fisher
information, ``tr F_l = Σ_windows ‖∇_{W_l} NLL‖²`` on calibration windows: at a trained model the Fisher is
the Gauss-Newton form of the loss Hessian, and back-propagating through the real network carries
softmax attention's nonlinearity to q and k exactly (and every other layer's path to the loss), not
through a closed-form approximation. A quantization error δW_l of mean square ``mse`` then costs about
``½ tr(F_l) · mse`` in expected loss (HAWQ-V2, APTQ eq. 6 with isotropic error).

The error a recipe leaves on a layer is measured, not modelled: plain k-means (the quantizer's own,
unwhitened, no error feedback) of a fixed sample of the layer's column groups with the recipe's (d, n),
on rows normalized by their RMS with s² weights when the recipe has row scales. The GPTQ-style feedback
of the real quantizer lowers every recipe's error by a similar factor, which does not move the choice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kmeans import assign, gather_points, kmeans


def fisher_traces(model, ids: Tensor, modules: dict[str, torch.nn.Module]) -> dict[str, float]:
    """tr F of each module's weight: Σ over the windows ids [w, S] of ‖∂ mean-NLL(window) / ∂W‖².

    `model` is a Hugging Face causal LM in fp32; one window per backward pass (a batch would average the
    windows' gradients before squaring). Weights' requires_grad is restored afterwards.
    """
    params = [p for p in model.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    weights = {name: mod.weight for name, mod in modules.items()}
    for w in weights.values():
        w.requires_grad_(True)
    traces = {name: 0.0 for name in modules}
    try:
        with torch.enable_grad():
            for row in ids:
                x = row.unsqueeze(0)
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                grads = torch.autograd.grad(loss, list(weights.values()))
                for name, g in zip(weights, grads):
                    traces[name] += float(g.double().square().sum())
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    return traces


@torch.no_grad()
def sample_groups(W: Tensor, d: int, groups: int) -> Tensor:
    """`groups` column groups of d columns, evenly spread over W [N, M] -> points z [groups, d, N]
    (columns past M are zero padding, as the quantizer pads them)."""
    N, M = W.shape
    G = -(-M // d)
    Wp = torch.nn.functional.pad(W.float(), (0, G * d - M))  # [N, G d]
    pick = torch.linspace(0, G - 1, min(groups, G)).round().long().unique()  # [g]
    return Wp.view(N, G, d)[:, pick].permute(1, 2, 0).contiguous()  # [g, d, N]


@torch.no_grad()
def kmeans_mse(W: Tensor, d: int, n: int, *, row_scale: bool, groups: int = 8, iters: int = 6, seed: int = 0) -> float:
    """Mean squared weight error of plain k-means with n centroids on d-column groups of W [N, M], one
    codebook per group over all rows (k >= N), on a sample of `groups` column groups."""
    N = W.shape[0]
    W = W.float()
    weight = W.new_ones(N)
    if row_scale:
        s = W.square().mean(1).sqrt().clamp(min=1e-12)  # [N]
        W = W / s.unsqueeze(1)
        weight = s.square()
    z = sample_groups(W, d, groups)  # [g, d, N]
    wb = weight.expand(z.shape[0], N).contiguous()  # [g, N]
    gen = torch.Generator(device=W.device).manual_seed(seed)
    C = kmeans(z, min(n, N), iters, gen, wb)  # [g, d, n]
    idx, _ = assign(z, C)
    err = (z - gather_points(C, idx)).square().sum(1)  # [g, N]
    return float((err * wb).sum() / (z.shape[0] * d * N))
