"""Batched k-means for many small codebooks at once (one per row block), on whatever device the points are.

Layout: points are columns, ``z[B, d, K]`` (B independent problems, K points of dimension d) and
centroids ``C[B, d, n]``: that is how a column group of Wᵀ lies in memory, so the quantizer hands
views in without copies. ``weight[B, K]`` (1 = real point, 0 = padding) lets problems of different
sizes share one padded batch; padded points must be zero vectors. Other non-negative weights make the
means weighted means (the row-scaled quantizer weighs each row by its scale squared).

Everything is a fixed sequence of batched tensor ops (no host syncs on a GPU): k-means++ seeding in
rounds of D²-sampling (each round adds a quarter more centres, sampled without replacement by the
exponential-race trick: O(log n) rounds, nearly the quality of one-at-a-time k-means++), a fixed
number of Lloyd iterations, and empty clusters re-seeded with the points of largest current error.

A Hessian metric ``eᵀ Σ e`` is handled by whitening: with ``Σ = L Lᵀ``, ``z = Lᵀ x`` makes it
Euclidean, means stay means, and centroids map back with ``L⁻ᵀ`` (see ``metric_kmeans``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kmeans_native import NativeKMeans

NATIVE = NativeKMeans()  # the compiled Lloyd steps for CPU problems, built on first use, shared by the process
SEED_GROWTH = 1.25  # seeding rounds add 25% more centres each: 19 rounds for n = 64
_MAX_DIST_ELEMS = 1 << 26  # distance scratch ([B, K, n] / [B, K, s]) above this is computed in chunks


def _seed_round_sizes(n: int, K: int, growth: float) -> list[int]:
    """Centres added per seeding round: max(1, floor((growth - 1) * centres so far)), each <= K, sum n."""
    sizes, filled = [], 0
    while filled < n:
        s = min(max(int(filled * (growth - 1)), 1), n - filled, K)
        sizes.append(s)
        filled += s
    return sizes


def _assign(zt: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """zt [B, K, d] (points as rows), C [B, d, n] -> (idx [B, K], min over c of ‖c‖² - 2 z·c  [B, K])."""
    B, K, _ = zt.shape
    n = C.shape[2]
    cn = C.square().sum(1, keepdim=True)  # [B, 1, n]
    step = max(1, _MAX_DIST_ELEMS // max(1, B * n))
    if step >= K:
        smin, idx = torch.baddbmm(cn, zt, C, alpha=-2.0).min(-1)  # over [B, K, n]
        return idx, smin
    idx = torch.empty(B, K, dtype=torch.int64, device=zt.device)
    smin = torch.empty(B, K, dtype=zt.dtype, device=zt.device)
    for k0 in range(0, K, step):
        score = torch.baddbmm(cn, zt[:, k0 : k0 + step], C, alpha=-2.0)
        torch.min(score, -1, out=(smin[:, k0 : k0 + step], idx[:, k0 : k0 + step]))
    return idx, smin


def assign(z: Tensor, C: Tensor, native: bool = True) -> tuple[Tensor, Tensor]:
    """Nearest centroid: z [B, d, K], C [B, d, n] -> (idx int64 [B, K], squared distance - ‖z‖² [B, K]).
    ``native``: use the compiled CPU steps when they apply (float32 CPU tensors); False: PyTorch only."""
    if native and NATIVE.usable_for(z):
        return NATIVE.nearest(z, C)
    return _assign(z.transpose(1, 2).contiguous(), C)


def gather_points(z: Tensor, idx: Tensor) -> Tensor:
    """z [B, d, K], idx [B, s] -> the indexed points [B, d, s]."""
    B, d, _ = z.shape
    return z.gather(2, idx.unsqueeze(1).expand(B, d, idx.shape[1]))


def kmeans_pp_seed_indices(
    z: Tensor,
    n: int,
    weight: Tensor,
    generator: torch.Generator | None = None,
    growth: float = SEED_GROWTH,
    native: bool = True,
) -> Tensor:
    """k-means++-style seeding, batched: z [B, d, K], weight [B, K] -> indices of the seed points [B, n].

    Round after round, new centres are drawn with probability ∝ D² (squared distance to the
    nearest centre so far; uniform over real points in round 0), without replacement, by the
    exponential race (the largest D²/Exp(1) wins). ``growth`` trades rounds for quality: 1 is
    classic k-means++ (n rounds), 2 doubles the centres every round. Points rather than
    coordinates come back, so a caller may seed from a snapshot and start from the points' current
    values (the quantizer does: one seeding pass per lazy block of column groups). On the CPU the rounds
    run compiled (``native=False``: PyTorch).
    """
    B, d, K = z.shape
    sizes = _seed_round_sizes(n, K, growth)
    u = torch.empty(len(sizes), B, K, dtype=z.dtype, device=z.device).uniform_(generator=generator)
    race = weight / u.log_().neg_()  # [rounds, B, K] = weight / Exp(1); padding never wins
    if native and NATIVE.usable_for(z):  # the same rounds, compiled (CPU)
        return NATIVE.seed(z, weight, race, sizes)
    step = max(1, _MAX_DIST_ELEMS // (K * max(sizes)))  # problems per chunk: bounded [chunk, K, s] scratch
    if step >= B:
        return _seed_rounds(z, weight, race, sizes)
    return torch.cat(
        [_seed_rounds(z[b : b + step], weight[b : b + step], race[:, b : b + step], sizes) for b in range(0, B, step)],
        0,
    )


def _seed_rounds(z: Tensor, weight: Tensor, race: Tensor, sizes: list[int]) -> Tensor:
    """The D²-sampling rounds of kmeans_pp_seed_indices, given the race keys [rounds, B, K]."""
    n = sum(sizes)
    zt = z.transpose(1, 2).contiguous()  # [B, K, d]
    zn = zt.square().sum(-1, keepdim=True)  # [B, K, 1]
    picks = []
    D2 = weight  # [B, K]
    filled = 0
    for r, s in enumerate(sizes):
        pick = (D2 * race[r]).topk(s, dim=1).indices  # [B, s] sampled ∝ D² without replacement
        picks.append(pick)
        filled += s
        if filled < n:
            new = gather_points(z, pick)  # [B, d, s]
            Dn = torch.baddbmm(zn, zt, new, alpha=-2.0).add_(new.square().sum(1, keepdim=True))  # [B, K, s]
            Dn = Dn.amin(-1) if s > 1 else Dn.squeeze(-1)  # [B, K]
            D2 = (Dn if r == 0 else torch.minimum(D2, Dn)).clamp_(min=0)
    return torch.cat(picks, 1) if len(picks) > 1 else picks[0]


def kmeans_pp_seed(
    z: Tensor, n: int, weight: Tensor, generator: torch.Generator | None = None, growth: float = SEED_GROWTH
) -> Tensor:
    """k-means++-style seeding: z [B, d, K], weight [B, K] -> centres C [B, d, n]."""
    return gather_points(z, kmeans_pp_seed_indices(z, n, weight, generator, growth))


def kmeans(
    z: Tensor,
    n: int,
    iters: int,
    generator: torch.Generator | None = None,
    weight: Tensor | None = None,
    seed_growth: float = SEED_GROWTH,
    init: Tensor | None = None,
    native: bool = True,
) -> Tensor:
    """Euclidean k-means, batched: z [B, d, K] -> centroids C [B, d, n].

    Fixed budget: seeding (unless ``init`` [B, d, n] is given) + ``iters`` Lloyd steps (assign,
    then means). A cluster left empty is re-seeded with a point of largest squared error
    (distinct points for distinct clusters). On the CPU the Lloyd steps run compiled
    (`kmeans_native.c`, the same steps; ``native=False`` keeps them in PyTorch).
    """
    B, d, K = z.shape
    if weight is None:
        weight = z.new_ones(B, K)
    C = kmeans_pp_seed(z, n, weight, generator, seed_growth) if init is None else init
    if native and NATIVE.usable_for(z):
        return NATIVE.lloyd(z, weight, C, iters)
    zt = z.transpose(1, 2).contiguous()  # [B, K, d]
    aug = torch.cat([z * weight.unsqueeze(1), weight.unsqueeze(1)], 1)  # [B, d+1, K]: weighted coordinates, weights
    idx_shape = (B, d + 1, K)
    on_cpu = z.device.type == "cpu"  # a host check is free there and skips the re-seed ops
    for _ in range(iters):
        idx, smin = _assign(zt, C)  # [B, K]
        if on_cpu:  # sequential, hence deterministic, and cheapest there
            sums = z.new_zeros(B, d + 1, n).scatter_add_(2, idx.unsqueeze(1).expand(idx_shape), aug)  # [B, d+1, n]
        else:  # atomics would make GPU runs irreproducible: one-hot [B, K, n] and a matmul instead
            sums = torch.bmm(aug, z.new_zeros(B, K, n).scatter_(2, idx.unsqueeze(-1), 1.0))  # [B, d+1, n]
        counts = sums[:, d:]  # [B, 1, n] total weight per cluster
        empty = counts == 0  # [B, 1, n]
        means = sums[:, :d] / torch.where(empty, torch.ones_like(counts), counts)
        if not on_cpu or bool(empty.any()):
            means = torch.where(empty, _far_points(z, smin, weight, empty), means)
        C = means
    return C


def _far_points(z: Tensor, smin: Tensor, weight: Tensor, empty: Tensor) -> Tensor:
    """For each empty cluster, a distinct point of largest squared error: -> [B, d, n]."""
    B, d, K = z.shape
    n = empty.shape[2]
    n_far = min(n, K)
    err = (smin + z.square().sum(1)).masked_fill_(weight == 0, float("-inf"))  # [B, K]
    far = err.topk(n_far, dim=1).indices  # [B, n_far], largest error first
    rank = (empty.cumsum(2) - empty.long()).squeeze(1).clamp_(max=n_far - 1)  # [B, n]: empties before
    return z.gather(2, far.gather(1, rank).unsqueeze(1).expand(B, d, n))


def metric_kmeans(
    x: Tensor,
    n: int,
    metric: Tensor,
    iters: int,
    generator: torch.Generator | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """k-means under the loss eᵀ Σ e with one SPD metric Σ [d, d] shared by all points.

    x [B, d, K] -> (C [B, d, n], idx [B, K]). Whitening with the Cholesky factor Σ = L Lᵀ
    (z = Lᵀ x) makes the loss Euclidean; centroids (means) map back as C = L⁻ᵀ C_z.
    """
    d = x.shape[1]
    if metric.shape != (d, d):
        raise ValueError(f"metric_kmeans: metric must be [{d}, {d}], got {tuple(metric.shape)}")
    L, info = torch.linalg.cholesky_ex(metric.to(x.dtype))
    if int(info) != 0:
        raise ValueError("metric_kmeans: metric is not symmetric positive definite")
    Lt = L.T  # [d, d] upper
    z = Lt @ x  # [B, d, K]
    Cz = kmeans(z, n, iters, generator, weight)
    idx, _ = assign(z, Cz)
    C = torch.linalg.solve_triangular(Lt, Cz, upper=True)  # [B, d, n]
    return C, idx


def quantization_error(x: Tensor, C: Tensor, idx: Tensor, metric: Tensor | None = None) -> Tensor:
    """Σ over points of eᵀ Σ e with e = x - C[idx]; Σ = I when metric is None. Returns a 0-d tensor."""
    B, d, K = x.shape
    e = x - C.gather(2, idx.unsqueeze(1).expand(B, d, K))  # [B, d, K]
    if metric is None:
        return e.square().sum()
    return torch.einsum("bik,ij,bjk->", e, metric.to(e.dtype), e)
