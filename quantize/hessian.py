"""Calibration Hessian of a linear layer: H = 2/S * sum_s x_s x_sᵀ over S input rows (tokens)."""

from __future__ import annotations

import torch
from torch import Tensor

SYMMETRIC_MIN_M = 512  # from this input width on, XᵀX is built from its upper block rows (fewer flops)
SYMMETRIC_BLOCKS = 4  # block rows of that product: 10/16 of a full product's multiply-adds


def all_finite(x: Tensor) -> bool:
    """True when x holds no NaN or ±inf (one pass with no [*x.shape] temporary, unlike isfinite().all())."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def add_gram_(H: Tensor, X: Tensor, alpha: float) -> None:
    """H [M, M] += alpha XᵀX for X [s, M], H symmetric: the upper block rows by matmuls, then mirrored."""
    M = X.shape[1]
    if M < SYMMETRIC_MIN_M:
        H.addmm_(X.T, X, alpha=alpha)
        return
    b = -(-M // SYMMETRIC_BLOCKS)
    for i in range(0, M, b):
        H[i : i + b, i:].addmm_(X[:, i : i + b].T, X[:, i:], alpha=alpha)  # [b, M - i]
        if i + b < M:
            H[i + b :, i : i + b] = H[i : i + b, i + b :].T


class HessianAccumulator:
    """Running average of 2 x xᵀ over the input rows a linear layer sees (GPTQ's ``add_batch``).

    The running form ``H <- H * S/(S+s) + 2/(S+s) * Xᵀ X`` keeps H at the scale of one sample, so fp32
    accumulation does not lose precision as S grows. Every row of ``x[..., M]`` (every token) counts
    as one sample.
    """

    def __init__(self, m: int, device=None) -> None:
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"HessianAccumulator: input dimension m must be a positive integer, got {m!r}")
        self.m = m
        self.H = torch.zeros(m, m, dtype=torch.float32, device=device)  # [M, M]
        self._nsamples = 0

    @property
    def nsamples(self) -> int:
        return self._nsamples

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        """Accumulate the rows of x [..., M]."""
        if x.dim() < 1 or x.shape[-1] != self.m:
            raise ValueError(f"HessianAccumulator.add_batch: expected x[..., {self.m}], got shape {tuple(x.shape)}")
        X = x.reshape(-1, self.m).to(device=self.H.device, dtype=torch.float32)  # [s, M]
        s = X.shape[0]
        if s == 0:
            return
        if not all_finite(X):
            raise ValueError("HessianAccumulator.add_batch: input contains NaN or inf")
        total = self._nsamples + s
        self.H.mul_(self._nsamples / total)
        add_gram_(self.H, X, 2.0 / total)
        self._nsamples = total

    @torch.no_grad()
    def hessian(self, damp: float = 0.0) -> Tensor:
        """A copy of H [M, M]: dead inputs (diag 0) get diag 1 (as GPTQ), then H += damp * mean(diag H) * I.

        The quantizers in this package apply their recipe's damping themselves: pass ``damp=0``
        for the matrix you hand to them (the proxy loss is then measured on the undamped H).
        """
        if self._nsamples == 0:
            raise ValueError("HessianAccumulator.hessian: no samples were added")
        if not damp >= 0:
            raise ValueError(f"HessianAccumulator.hessian: damp must be >= 0, got {damp!r}")
        H = self.H.clone()
        H = 0.5 * (H + H.T)
        return prepare_hessian(H, damp)


def prepare_hessian(H: Tensor, damp: float) -> Tensor:
    """Dead columns (diag 0) -> diag 1, then H + damp * mean(diag H) * I. Returns a new fp32 tensor."""
    H = H.to(torch.float32).clone()
    diag = torch.diagonal(H)
    diag.masked_fill_(diag == 0, 1.0)
    if damp > 0:
        diag.add_(damp * diag.mean())
    return H


_MAX_DAMP_RETRIES = 6


def inverse_cholesky_upper(H: Tensor, damp: float, Mp: int | None = None) -> tuple[Tensor, Tensor, float]:
    """H [M, M] -> (H_damped [M, M], U [Mp, Mp] upper with Hp⁻¹ = Uᵀ U, damp used).

    H_damped has dead columns fixed and ``damp * mean(diag) * I`` added; Hp is H_damped padded to
    Mp >= M columns with a decoupled identity block (scaled to the mean diagonal). If the
    factorization fails, the damping is raised tenfold (a few times) before giving up. It runs in
    fp64 on the CPU (cheap there), fp32 on accelerators.
    """
    M = H.shape[0]
    Mp = M if Mp is None else Mp
    work = torch.float64 if H.device.type == "cpu" else torch.float32
    for _ in range(_MAX_DAMP_RETRIES):
        Hd = prepare_hessian(H, damp)
        Hp = Hd
        if Mp > M:
            Hp = torch.eye(Mp, device=H.device, dtype=torch.float32) * torch.diagonal(Hd).mean()
            Hp[:M, :M] = Hd
        L, info = torch.linalg.cholesky_ex(Hp.to(work))
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return Hd, U.to(torch.float32), damp
        damp = max(damp * 10.0, 1e-4)
    raise ValueError("quantize: the Hessian is not positive definite even with heavy damping")


def proxy_loss(W: Tensor, W_eff: Tensor, H: Tensor) -> float:
    """tr(E H Eᵀ) / tr(W H Wᵀ) with E = W - W_eff."""
    E = W - W_eff
    num = ((E @ H) * E).sum()
    den = ((W @ H) * W).sum()
    return float(num / den) if float(den) > 0 else float(num)
