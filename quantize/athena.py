"""The Athena quantizer (DESIGN.md §1): Hessian-metric k-means codebooks with GPTQ-style error feedback.

Notation: W [N, M], calibration Hessian H [M, M]; recipe (d, n, k). Inverse Hessian H⁻¹ = Uᵀ U
with U upper triangular (GPTQ). Column group Q = columns d·j .. d·j+d-1, F = the columns after it.

After the columns before Q are fixed, the inverse Hessian of the remaining columns is
U[Q:, Q:]ᵀ U[Q:, Q:], so quantizing Q with error E_Q (rows e ∈ R^d) costs
``e (U_QQᵀ U_QQ)⁻¹ eᵀ = ‖e U_QQ⁻¹‖²`` (paper eq. 9) once the later columns absorb the optimal
update ``W_F -= (E_Q U_QQ⁻¹) U_QF`` (eq. 10-11). Hence, per group:

1. whiten the current sub-vectors, ``z = x U_QQ⁻¹`` (one d×d matmul), run batched Euclidean
   k-means in z-space for every k-row block at once, map centroids back ``c = c_z U_QQ``;
2. quantize each codebook to uint8 per dimension (or round to fp16), re-assign against it;
3. feed the whitened error ``z - ĉ_z`` forward through ``U_QF`` (inside the lazy block at once,
   the later columns at block end).

Several matrices that share H (q/k/v, gate/up) run as one computation: their row blocks are
stacked into one padded batch, so the sequential pass over column groups happens once.
Internally everything is Wᵀ ("columns are rows"): a column group is a contiguous [d, rows] slab.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .hessian import inverse_cholesky_upper, proxy_loss
from .kmeans import assign, gather_points, kmeans, kmeans_pp_seed_indices
from .qlayers import AthenaLayer, dequantize_codebook_uint8, quantize_codebook_uint8
from .recipe import AthenaRecipe


@dataclass(frozen=True)
class _RowBlock:
    matrix: int  # which input matrix
    row0: int  # first row of the block inside that matrix
    rows: int  # <= k


def _row_blocks(Ns: list[int], k: int) -> list[_RowBlock]:
    return [_RowBlock(i, r0, min(k, N - r0)) for i, N in enumerate(Ns) for r0 in range(0, N, k)]


def _check_inputs(weights: list[Tensor], H: Tensor, recipe: AthenaRecipe) -> int:
    if not isinstance(recipe, AthenaRecipe):
        raise ValueError(f"quantize_athena needs an AthenaRecipe, got {type(recipe).__name__}")
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError("quantize_athena: weights must be a non-empty list of [N, M] tensors")
    for i, W in enumerate(weights):
        if not isinstance(W, Tensor) or W.dim() != 2 or W.shape[0] < 1 or W.shape[1] < 1:
            raise ValueError(f"quantize_athena: weights[{i}] must be a non-empty 2-D tensor, got "
                             f"{getattr(W, 'shape', type(W).__name__)}")
        if not W.dtype.is_floating_point:
            raise ValueError(f"quantize_athena: weights[{i}] must be floating point, got {W.dtype}")
        if W.device != weights[0].device:
            raise ValueError(f"quantize_athena: weights[{i}] is on {W.device}, weights[0] on {weights[0].device}")
    M = weights[0].shape[1]
    for i, W in enumerate(weights):
        if W.shape[1] != M:
            raise ValueError(f"quantize_athena: matrices sharing a Hessian need the same M; weights[0] has "
                             f"M={M}, weights[{i}] has M={W.shape[1]}")
    if not isinstance(H, Tensor) or tuple(H.shape) != (M, M):
        raise ValueError(f"quantize_athena: H must be [{M}, {M}], got {getattr(H, 'shape', type(H).__name__)}")
    for i, W in enumerate(weights):
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"quantize_athena: weights[{i}] contains NaN or inf")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("quantize_athena: H contains NaN or inf")
    return M


def _top_singular(X: Tensor, r: int, generator: torch.Generator, niter: int = 4, oversample: int = 8):
    """Top-r SVD of X [N, M] -> (U_r [N, r], S_r [r], Vh_r [r, M]); randomized (seeded) for small r."""
    q = r + oversample
    if 2 * q >= min(X.shape):
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    Omega = torch.randn(X.shape[1], q, generator=generator, device=X.device, dtype=X.dtype)  # [M, q]
    Q = torch.linalg.qr(X @ Omega).Q  # [N, q]
    for _ in range(niter):
        Q = torch.linalg.qr(X.T @ Q).Q
        Q = torch.linalg.qr(X @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ X, full_matrices=False)  # [q, q], [q], [q, M]
    return (Q @ Ub)[:, :r], S[:r], Vh[:r]


def lowrank_residual(R: Tensor, L: Tensor, r: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """R [N, M] ≈ A B under H = L Lᵀ (paper 2.3.3): SVD of R L, A = U_r S_r, B = V_rᵀ L⁻¹ (fp16)."""
    Ur, Sr, Vhr = _top_singular(R @ L, r, generator)
    A = Ur * Sr  # [N, r]
    B = torch.linalg.solve_triangular(L, Vhr, upper=False, left=False)  # [r, M], B L = V_rᵀ
    return A.to(torch.float16), B.to(torch.float16)


@torch.no_grad()
def quantize_athena(
    weights: list[Tensor], H: Tensor, recipe: AthenaRecipe, *, _error_feedback: bool = True
) -> list[tuple[AthenaLayer, dict]]:
    """Quantize matrices that share one Hessian, as one batched computation.

    weights: [N_i, M] each (any float dtype; math in fp32 on their device).
    H: the calibration Hessian [M, M], UNdamped (e.g. ``HessianAccumulator.hessian(0)``); the
    recipe's damping is applied here. Input columns with diag(H) == 0 never see a non-zero input:
    their weights are set to 0 (as GPTQ does).
    Returns, per matrix, ``(layer, stats)`` with stats ``proxy_loss`` (relative, on the undamped
    H), ``proxy_loss_no_lowrank``, ``rank``, ``damp`` (used), ``hessian_loss_damped`` (the
    accumulated Σ‖whitened group error‖², which equals tr(E H_damped Eᵀ) before the low-rank step
    when the error feedback is exact), ``seconds`` (this matrix's share of the batched call, by
    rows) and ``seconds_batch``.
    ``_error_feedback=False`` (tests only) skips the error updates of later columns.
    """
    t_start = time.perf_counter()
    M = _check_inputs(weights, H, recipe)
    d, n, k = recipe.d, recipe.n, recipe.k
    dev = weights[0].device
    H = H.to(device=dev, dtype=torch.float32)
    H = 0.5 * (H + H.T)
    dead = torch.diagonal(H) == 0  # [M]
    Ws = [W.to(torch.float32).masked_fill(dead, 0.0) for W in weights]  # [N_i, M]
    Ns = [W.shape[0] for W in Ws]

    # damped Hessian, padded to G*d columns with an identity block (padding never couples)
    G = -(-M // d)
    Mp = G * d
    Hd, U, damp_used = inverse_cholesky_upper(H, recipe.damp, Mp)  # U [Mp, Mp] upper, Hp⁻¹ = Uᵀ U
    U_QQ = U.reshape(G, d, G, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()  # [G, d, d]
    eye_d = torch.eye(d, device=dev, dtype=torch.float32).expand(G, d, d)
    U_QQ_inv = torch.linalg.solve_triangular(U_QQ, eye_d, upper=True)  # [G, d, d]
    whiten = U_QQ_inv.transpose(1, 2).contiguous()  # z = U_QQ⁻ᵀ x (columns)   [G, d, d]
    unwhiten = U_QQ.transpose(1, 2).contiguous()  # x = U_QQᵀ z               [G, d, d]

    # all row blocks of all matrices, padded to the largest block: Wᵀ working copy [Mp, B * K]
    blocks = _row_blocks(Ns, k)
    B, K = len(blocks), max(b.rows for b in blocks)
    Rtot = B * K
    Wt = torch.zeros(Mp, B, K, device=dev, dtype=torch.float32)  # [Mp, B, K]
    weight = torch.zeros(B, K, device=dev, dtype=torch.float32)  # [B, K] 1 = real row
    for bi, blk in enumerate(blocks):
        Wt[:M, bi, : blk.rows] = Ws[blk.matrix][blk.row0 : blk.row0 + blk.rows].T
        weight[bi, : blk.rows] = 1.0
    Wt = Wt.reshape(Mp, Rtot)
    row_mask = weight.unsqueeze(1)  # [B, 1, K]

    idx_all = torch.empty(G, B, K, device=dev, dtype=torch.int64)  # I, per group
    if recipe.codebook_bits == 8:
        codes_all = torch.empty(G, B, d, n, device=dev, dtype=torch.uint8)
        scale_all = torch.empty(G, B, d, device=dev, dtype=torch.float16)
        min_all = torch.empty(G, B, d, device=dev, dtype=torch.float16)
    else:
        cb16_all = torch.empty(G, B, d, n, device=dev, dtype=torch.float16)
    gen = torch.Generator(device=dev).manual_seed(recipe.seed)
    row_loss = torch.zeros(Rtot, device=dev, dtype=torch.float32)  # Σ_groups ‖whitened error‖² per row

    bw = d * max(1, recipe.block_size // d)  # lazy block width, whole groups
    for b0 in range(0, Mp, bw):
        b1 = min(b0 + bw, Mp)
        j0, j1 = b0 // d, b1 // d
        Err = torch.empty(b1 - b0, Rtot, device=dev, dtype=torch.float32)  # whitened errors of the block
        # k-means++ seed points for all groups of the block at once, from the block-start snapshot;
        # each group then starts Lloyd from the seed rows' current (error-updated) values
        snap = torch.matmul(whiten[j0:j1].unsqueeze(1), Wt[b0:b1].view(j1 - j0, d, B, K).transpose(1, 2))
        seeds = kmeans_pp_seed_indices(snap.reshape(-1, d, K), n, weight.repeat(j1 - j0, 1), gen)
        seeds = seeds.view(j1 - j0, B, n)  # [groups, B, n]
        del snap
        for c0 in range(b0, b1, d):
            j, c1 = c0 // d, c0 + d
            x = Wt[c0:c1].view(d, B, K).transpose(0, 1)  # [B, d, K]
            z = torch.matmul(whiten[j], x)  # [B, d, K] whitened sub-vectors
            Cz = kmeans(z, n, recipe.kmeans_iters, gen, weight, init=gather_points(z, seeds[j - j0]))  # [B, d, n]
            Cx = torch.matmul(unwhiten[j], Cz)  # [B, d, n] centroids in weight space
            if recipe.codebook_bits == 8:
                codes, s16, m16 = quantize_codebook_uint8(Cx, dim=-1)
                codes_all[j], scale_all[j], min_all[j] = codes, s16, m16
                Cx = dequantize_codebook_uint8(codes, s16, m16, dim=-1)
            else:
                cb16_all[j] = Cx.to(torch.float16)
                Cx = cb16_all[j].float()
            Cz = torch.matmul(whiten[j], Cx)  # [B, d, n] the stored codebook, whitened
            idx, _ = assign(z, Cz)  # [B, K] re-assigned against the stored codebook
            idx_all[j] = idx
            if not _error_feedback:
                continue
            q = Cz.gather(2, idx.unsqueeze(1).expand(B, d, K))  # [B, d, K]
            err = ((z - q) * row_mask).transpose(0, 1).reshape(d, Rtot)  # [d, B*K]; padding stays 0
            Err[c0 - b0 : c1 - b0] = err
            row_loss.add_(err.square().sum(0))
            if c1 < b1:
                Wt[c1:b1].addmm_(U[c0:c1, c1:b1].T, err, alpha=-1.0)  # in-block update (eq. 10-11)
        if _error_feedback and b1 < Mp:
            Wt[b1:].addmm_(U[b0:b1, b1:].T, Err, alpha=-1.0)  # lazy update of the later columns
    del Wt, Err

    # per matrix: containers, low-rank residual, stats
    if recipe.lowrank > 0:
        L = torch.linalg.cholesky(Hd.to(torch.float64 if dev.type == "cpu" else torch.float32))
    idx_rows = idx_all.permute(1, 2, 0)  # [B, K, G]
    row_loss = row_loss.view(B, K)
    results = []
    for i, W in enumerate(Ws):
        mine = [bi for bi, blk in enumerate(blocks) if blk.matrix == i]
        indices = torch.cat([idx_rows[bi, : blocks[bi].rows] for bi in mine], 0)  # [N_i, G]
        fields = {}
        if recipe.codebook_bits == 8:
            fields["codebook"] = codes_all[:, mine].permute(1, 0, 3, 2).contiguous()  # [Nb, G, n, d]
            fields["codebook_scale"] = scale_all[:, mine].transpose(0, 1).contiguous()  # [Nb, G, d]
            fields["codebook_min"] = min_all[:, mine].transpose(0, 1).contiguous()
        else:
            fields["codebook"] = cb16_all[:, mine].permute(1, 0, 3, 2).contiguous()
        layer = AthenaLayer(shape=(Ns[i], M), d=d, n=n, k=k, codebook_bits=recipe.codebook_bits,
                            indices=indices, **fields)
        W_hat = layer.dequantize(include_lowrank=False)  # [N_i, M]
        loss_pq = proxy_loss(W, W_hat, H)
        r = recipe.rank(Ns[i], M)
        if r > 0:
            A, Bf = lowrank_residual((W - W_hat).to(L.dtype), L, r, gen)
            layer.lowrank_a, layer.lowrank_b = A, Bf
            W_hat = layer.dequantize()
        stats = {"proxy_loss": proxy_loss(W, W_hat, H), "proxy_loss_no_lowrank": loss_pq,
                 "proxy_loss_hessian": "undamped", "rank": r, "damp": damp_used,
                 "hessian_loss_damped": float(sum(row_loss[bi].sum() for bi in mine))}
        results.append((layer, stats))
    seconds = time.perf_counter() - t_start
    for (_, stats), N in zip(results, Ns):
        stats["seconds"] = seconds * N / sum(Ns)
        stats["seconds_batch"] = seconds
    return results
