"""Block-wise fine-tuning after quantization, indices fixed (`athena quantize --finetune`; AQLM's block tuning).

After a decoder layer's linears are quantized, its continuous parameters are trained so that the quantized
layer reproduces the reference layer's outputs on the calibration windows:

    min over θ  Σ_windows ‖ layer_θ(x) − layer_ref(x) ‖² / ‖ layer_ref(x) ‖²

x = the calibration activations entering the layer (through the already quantized layers before it), θ = every
Athena linear's codebook (the fp32 centroids behind the stored uint8 codes), low-rank factors A, B and row scales
s, and the layer's own norm weights. Indices stay as quantized. W_eff = diag(s) (C[idx] + A B) as FORMAT.md's
dequantization, differentiable in θ. Adam, one random mini-batch of windows per step.

The result is stored in the same format (codebooks re-quantized to uint8 per dimension, factors and scales to
fp16); it is kept only when the relative output error of the stored form, on a fixed set of calibration
windows, is lower than before (else the layer stays as quantized, and the stats say so).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from athena_runtime.format.layers import AthenaLayer, quantize_codebook_uint8


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 200  # Adam steps per decoder layer
    lr: float = 1e-4
    batch_windows: int = 4  # calibration windows per step
    eval_windows: int = 8  # windows (fixed, the first ones) on which before/after are compared
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_windows", "eval_windows", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "seed" else 1):
                raise ValueError(f"--finetune {name.replace('_', '-')} must be a positive integer, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"--finetune-lr must be a positive number, got {self.lr!r}")


def _weff(layer: AthenaLayer, C: Tensor, A: Tensor | None, B: Tensor | None, s: Tensor | None) -> Tensor:
    """FORMAT.md's W_eff [N, M] from trainable fp32 C [Nb, G, n, d], A [N, r], B [r, M], s [N]."""
    N, M = layer.shape
    dev = C.device
    block = (torch.arange(N, device=dev) // layer.k).unsqueeze(1)  # [N, 1]
    group = torch.arange(layer.G, device=dev).unsqueeze(0)  # [1, G]
    W = C[block, group, layer.indices.to(device=dev, dtype=torch.int64)].reshape(N, layer.G * layer.d)[:, :M]
    if A is not None:
        W = W + A @ B
    if s is not None:
        W = W * s.unsqueeze(1)
    return W


class _Trainable:
    """The continuous parameters of one Athena layer, as fp32 leaves on `device`."""

    def __init__(self, layer: AthenaLayer, device) -> None:
        self.layer = layer
        self.C = layer.codebook_f32().to(device).requires_grad_()
        self.A = self.B = self.s = None
        if layer.lowrank_a is not None:
            self.A = layer.lowrank_a.float().to(device).requires_grad_()
            self.B = layer.lowrank_b.float().to(device).requires_grad_()
        if layer.row_scale is not None:
            self.s = layer.row_scale.float().to(device).requires_grad_()

    def params(self) -> list[Tensor]:
        return [p for p in (self.C, self.A, self.B, self.s) if p is not None]

    def weight(self) -> Tensor:
        return _weff(self.layer, self.C, self.A, self.B, self.s)

    def stored(self) -> AthenaLayer:
        """The trained values in the checkpoint's storage types (what the runtime will read)."""
        C = self.C.detach().cpu()
        fields = {}
        if self.layer.codebook_bits == 8:
            codes, scale, minimum = quantize_codebook_uint8(C, dim=-2)
            fields = dict(codebook=codes, codebook_scale=scale, codebook_min=minimum)
        else:
            fields = dict(codebook=C.to(torch.float16))
        if self.A is not None:
            fields.update(lowrank_a=self.A.detach().cpu().half(), lowrank_b=self.B.detach().cpu().half())
        if self.s is not None:
            fields["row_scale"] = self.s.detach().cpu().half()
        return dataclasses.replace(self.layer, **fields)


def finetune_block(
    forward,
    inputs: Tensor,
    targets: Tensor,
    linears: dict[str, AthenaLayer],
    norms: dict[str, Tensor],
    cfg: FinetuneConfig,
) -> tuple[dict[str, AthenaLayer], dict[str, Tensor], dict]:
    """Train one quantized decoder layer toward `targets`.

    forward(params, x) -> y runs the layer with `params` (module name -> weight tensor, plus the norm
    parameters by their names) replacing its own; inputs, targets [W, S, H] calibration windows (on the
    layer's device); linears: module name -> AthenaLayer as quantized; norms: parameter name -> current value.
    Returns (linears, norms, stats): the trained layers and norm values when the stored form's relative error
    (norms rounded to fp16, as stored) on the first `eval_windows` windows went down, else the inputs unchanged;
    stats: ``rel_err_before``, ``rel_err_after`` (of the stored form), ``kept``, ``steps``, ``seconds``.
    """
    t0 = time.perf_counter()
    dev = inputs.device
    train = {name: _Trainable(layer, dev) for name, layer in linears.items()}
    norm_params = {name: t.detach().float().to(dev).clone().requires_grad_() for name, t in norms.items()}
    params = [p for t in train.values() for p in t.params()] + list(norm_params.values())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    nwin = inputs.shape[0]
    ev = slice(0, min(cfg.eval_windows, nwin))

    def rel_err(weights: dict[str, Tensor], norm_values: dict[str, Tensor]) -> float:
        with torch.no_grad():
            num = den = 0.0
            for w in range(ev.start, ev.stop, cfg.batch_windows):
                x, y = inputs[w : min(w + cfg.batch_windows, ev.stop)], targets[w : min(w + cfg.batch_windows, ev.stop)]
                out = forward({**weights, **norm_values}, x.float())
                num += float((out.float() - y.float()).square().sum())
                den += float(y.float().square().sum())
        return num / max(den, 1e-30)

    before = rel_err({n: layer.dequantize().to(dev) for n, layer in linears.items()}, norms)
    for _ in range(cfg.steps):
        pick = torch.randperm(nwin, generator=gen)[: cfg.batch_windows].to(dev)
        x, y = inputs[pick].float(), targets[pick].float()
        out = forward({**{n: t.weight() for n, t in train.items()}, **norm_params}, x)
        loss = (out - y).square().sum() / y.square().sum().clamp(min=1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    stored = {n: t.stored() for n, t in train.items()}
    new_norms = {n: p.detach().half().to(norms[n].dtype).to(norms[n].device) for n, p in norm_params.items()}
    after = rel_err({n: layer.dequantize().to(dev) for n, layer in stored.items()}, new_norms)
    kept = math.isfinite(after) and after < before
    stats = {
        "rel_err_before": before,
        "rel_err_after": after,
        "kept": kept,
        "steps": cfg.steps,
        "seconds": time.perf_counter() - t0,
    }
    return (stored, new_norms, stats) if kept else (dict(linears), dict(norms), stats)
