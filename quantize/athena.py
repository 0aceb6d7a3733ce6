"""The Athena quantizer (docs/ARCHITECTURE.md §3): Hessian-metric k-means codebooks with GPTQ-style error feedback.

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

from athena_runtime.format.layers import AthenaLayer, dequantize_codebook_uint8, quantize_codebook_uint8

from .hessian import all_finite, inverse_cholesky_upper, proxy_loss
from .kmeans import assign, gather_points, kmeans, kmeans_pp_seed_indices
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
            raise ValueError(
                f"quantize_athena: weights[{i}] must be a non-empty 2-D tensor, got "
                f"{getattr(W, 'shape', type(W).__name__)}"
            )
        if not W.dtype.is_floating_point:
            raise ValueError(f"quantize_athena: weights[{i}] must be floating point, got {W.dtype}")
        if W.device != weights[0].device:
            raise ValueError(f"quantize_athena: weights[{i}] is on {W.device}, weights[0] on {weights[0].device}")
    M = weights[0].shape[1]
    for i, W in enumerate(weights):
        if W.shape[1] != M:
            raise ValueError(
                f"quantize_athena: matrices sharing a Hessian need the same M; weights[0] has "
                f"M={M}, weights[{i}] has M={W.shape[1]}"
            )
    if not isinstance(H, Tensor) or tuple(H.shape) != (M, M):
        raise ValueError(f"quantize_athena: H must be [{M}, {M}], got {getattr(H, 'shape', type(H).__name__)}")
    for i, W in enumerate(weights):
        if not all_finite(W):
            raise ValueError(f"quantize_athena: weights[{i}] contains NaN or inf")
    if not all_finite(H):
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


def row_scales(W: Tensor) -> Tensor:
    """Per-output-row scale of W [N, M]: its RMS, rounded to fp16 (as stored); 1 for an all-zero row."""
    s = W.float().square().mean(1).sqrt().to(torch.float16)  # [N]
    return torch.where(s > 0, s, torch.ones_like(s))


def lowrank_residual(R: Tensor, L: Tensor, r: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """R [N, M] ≈ A B under H = L Lᵀ (paper 2.3.3): SVD of R L, A = U_r S_r, B = V_rᵀ L⁻¹ (fp16)."""
    Ur, Sr, Vhr = _top_singular(R @ L, r, generator)
    A = Ur * Sr  # [N, r]
    B = torch.linalg.solve_triangular(L, Vhr, upper=False, left=False)  # [r, M], B L = V_rᵀ
    return A.to(torch.float16), B.to(torch.float16)


@dataclass
class _Workspace:
    """Fixed buffers for one lazy block of ``ng`` column groups (fixed addresses: CUDA-graph friendly)."""

    W: Tensor  # [bw, R] the block's columns of Wᵀ (R = B*K padded rows), error-updated in place
    whiten: Tensor  # [ng, d, d]   U_QQ⁻ᵀ per group
    unwhiten: Tensor  # [ng, d, d] U_QQᵀ per group
    U: Tensor  # [bw, bw] the block's diagonal block of U
    seeds: Tensor  # [ng, B, n] k-means++ seed rows per group
    idx: Tensor  # [ng, B, K] out: indices
    codebook: Tensor  # [ng, B, d, n] out: uint8 codes or fp16 centroids
    scale: Tensor | None  # [ng, B, d] out (codebook_bits 8)
    minimum: Tensor | None  # [ng, B, d] out (codebook_bits 8)
    Err: Tensor  # [bw, R] out: whitened errors, for the lazy update of later columns
    row_loss: Tensor  # [R] Σ_groups ‖whitened error‖² per row, accumulated over all blocks

    @classmethod
    def allocate(cls, bw: int, d: int, n: int, B: int, K: int, codebook_bits: int, dev) -> "_Workspace":
        ng, R = bw // d, B * K
        f32 = dict(device=dev, dtype=torch.float32)
        eight = codebook_bits == 8
        return cls(
            W=torch.zeros(bw, R, **f32),
            whiten=torch.zeros(ng, d, d, **f32),
            unwhiten=torch.zeros(ng, d, d, **f32),
            U=torch.zeros(bw, bw, **f32),
            seeds=torch.zeros(ng, B, n, device=dev, dtype=torch.int64),
            idx=torch.zeros(ng, B, K, device=dev, dtype=torch.int64),
            codebook=torch.zeros(ng, B, d, n, device=dev, dtype=torch.uint8 if eight else torch.float16),
            scale=torch.zeros(ng, B, d, device=dev, dtype=torch.float16) if eight else None,
            minimum=torch.zeros(ng, B, d, device=dev, dtype=torch.float16) if eight else None,
            Err=torch.zeros(bw, R, **f32),
            row_loss=torch.zeros(R, **f32),
        )

    def load(self, Wt_block: Tensor, whiten: Tensor, unwhiten: Tensor, U_block: Tensor) -> None:
        w, ng = Wt_block.shape[0], whiten.shape[0]
        self.W[:w].copy_(Wt_block)
        self.whiten[:ng].copy_(whiten)
        self.unwhiten[:ng].copy_(unwhiten)
        self.U[:w, :w].copy_(U_block)


class _GroupSteps:
    """Steps 1-3 above for the column groups of one lazy block, on a _Workspace."""

    def __init__(
        self, ws: _Workspace, recipe: AthenaRecipe, weight: Tensor, feedback: bool, row_mask: Tensor | None = None
    ) -> None:
        """weight [B, K]: k-means point weights (0 = padding row); row_mask [B, K]: 1 = real row (default:
        weight, when the weights are 0/1)."""
        self.ws, self.recipe, self.weight, self.feedback = ws, recipe, weight, feedback
        self.row_mask = (weight if row_mask is None else row_mask).unsqueeze(1)  # [B, 1, K]

    def run(self, ng: int, trim: bool) -> None:
        """Quantize groups 0..ng-1. trim: update only the columns right of each group (eager); else
        the whole block width (fixed shapes for graph capture; U is zero left of the group and the
        group's own columns are done, so the results are the same)."""
        ws, r, d = self.ws, self.recipe, self.recipe.d
        B, K = self.weight.shape
        w = ng * d
        for p in range(ng):
            c0, c1 = p * d, p * d + d
            x = ws.W[c0:c1].view(d, B, K).transpose(0, 1)  # [B, d, K]
            z = torch.matmul(ws.whiten[p], x)  # [B, d, K] whitened sub-vectors
            Cz = kmeans(z, r.n, r.kmeans_iters, None, self.weight, init=gather_points(z, ws.seeds[p]))  # [B, d, n]
            Cx = torch.matmul(ws.unwhiten[p], Cz)  # [B, d, n] centroids in weight space
            if r.codebook_bits == 8:
                codes, s16, m16 = quantize_codebook_uint8(Cx, dim=-1)
                ws.codebook[p].copy_(codes)
                ws.scale[p].copy_(s16)
                ws.minimum[p].copy_(m16)
                Cx = dequantize_codebook_uint8(codes, s16, m16, dim=-1)
            else:
                Cx16 = Cx.to(torch.float16)
                ws.codebook[p].copy_(Cx16)
                Cx = Cx16.float()
            Cz = torch.matmul(ws.whiten[p], Cx)  # [B, d, n] the stored codebook, whitened
            idx, _ = assign(z, Cz)  # [B, K] re-assigned against the stored codebook
            ws.idx[p].copy_(idx)
            if not self.feedback:
                continue
            q = gather_points(Cz, idx)  # [B, d, K]
            err = ((z - q) * self.row_mask).transpose(0, 1).reshape(d, B * K)  # [d, R]; padding stays 0
            ws.Err[c0:c1].copy_(err)
            ws.row_loss.add_(err.square().sum(0))
            if trim and c1 < w:  # in-block update (eq. 10-11)
                ws.W[c1:w].addmm_(ws.U[c0:c1, c1:w].T, err, alpha=-1.0)
            elif not trim:
                ws.W.addmm_(ws.U[c0:c1].T, err, alpha=-1.0)


class _GraphedSteps:
    """A full lazy block of group steps captured once as a CUDA graph, replayed for every full block.

    The first call runs eagerly (the warm-up the capture needs; its results are the real ones),
    then captures; later calls replay. Launch overhead per group drops from ~100 kernel launches
    to a share of one graph launch.
    """

    def __init__(self, step: _GroupSteps, ng: int) -> None:
        self.step, self.ng, self.graph, self.eager = step, ng, None, False

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.eager:  # capture failed once: plain launches from then on
            self.step.run(self.ng, trim=True)
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step.run(self.ng, trim=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step.run(self.ng, trim=False)
        except RuntimeError:  # an op that cannot be captured on this build: the results above stand
            self.eager = True
            return
        self.graph = graph


@torch.no_grad()
def quantize_athena(
    weights: list[Tensor],
    H: Tensor,
    recipe: AthenaRecipe,
    *,
    _error_feedback: bool = True,
    _cuda_graph: bool = True,
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
    ``_error_feedback=False`` (tests only) skips the error updates of later columns;
    ``_cuda_graph=False`` runs the group steps eagerly on a GPU too (same results).
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
    # row scales (recipe.row_scale): cluster W / s (rows at one scale share the codebook's shape better),
    # each row weighted by s² so the objective stays tr(E H Eᵀ) in weight space
    scales = [row_scales(W) if recipe.row_scale else None for W in Ws]  # fp16 [N_i] or None
    Wn = [W if s is None else W / s.float().unsqueeze(1) for W, s in zip(Ws, scales)]

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
        Wt[:M, bi, : blk.rows] = Wn[blk.matrix][blk.row0 : blk.row0 + blk.rows].T
        weight[bi, : blk.rows] = 1.0
    Wt = Wt.reshape(Mp, Rtot)
    row_mask = s2_rows = None
    if recipe.row_scale:
        s2_rows = torch.zeros_like(weight)  # [B, K] s² per row, 0 for padding
        for bi, blk in enumerate(blocks):
            s2_rows[bi, : blk.rows] = scales[blk.matrix][blk.row0 : blk.row0 + blk.rows].float().square()
        row_mask, weight = weight, s2_rows / s2_rows.sum() * weight.sum()  # k-means weights, mean 1

    bw = d * max(1, recipe.block_size // d)  # lazy block width, whole groups
    ws = _Workspace.allocate(bw, d, n, B, K, recipe.codebook_bits, dev)
    idx_all = torch.empty(G, B, K, device=dev, dtype=torch.int64)  # I, per group
    cb_all = torch.empty(G, B, d, n, device=dev, dtype=ws.codebook.dtype)  # stored codebooks
    if recipe.codebook_bits == 8:
        scale_all = torch.empty(G, B, d, device=dev, dtype=torch.float16)
        min_all = torch.empty(G, B, d, device=dev, dtype=torch.float16)
    gen = torch.Generator(device=dev).manual_seed(recipe.seed)
    step = _GroupSteps(ws, recipe, weight, feedback=_error_feedback, row_mask=row_mask)
    graph = _GraphedSteps(step, bw // d) if dev.type == "cuda" and _cuda_graph and Mp >= 2 * bw else None

    for b0 in range(0, Mp, bw):
        b1 = min(b0 + bw, Mp)
        j0, ng = b0 // d, (b1 - b0) // d
        ws.load(Wt[b0:b1], whiten[j0 : j0 + ng], unwhiten[j0 : j0 + ng], U[b0:b1, b0:b1])
        # k-means++ seed points for all groups of the block at once, from the block-start snapshot;
        # each group then starts Lloyd from the seed rows' current (error-updated) values
        snap = torch.matmul(ws.whiten[:ng].unsqueeze(1), ws.W[: b1 - b0].view(ng, d, B, K).transpose(1, 2))
        seeds = kmeans_pp_seed_indices(snap.reshape(ng * B, d, K), n, weight.repeat(ng, 1), gen)
        ws.seeds[:ng].copy_(seeds.view(ng, B, n))
        del snap, seeds
        if graph is not None and ng == bw // d:
            graph.run()
        else:
            step.run(ng, trim=True)
        idx_all[j0 : j0 + ng] = ws.idx[:ng]
        cb_all[j0 : j0 + ng] = ws.codebook[:ng]
        if recipe.codebook_bits == 8:
            scale_all[j0 : j0 + ng], min_all[j0 : j0 + ng] = ws.scale[:ng], ws.minimum[:ng]
        if _error_feedback and b1 < Mp:
            Wt[b1:].addmm_(U[b0:b1, b1:].T, ws.Err[: b1 - b0], alpha=-1.0)  # lazy update of later columns
    row_loss = ws.row_loss
    del Wt, ws, step, graph

    # per matrix: containers, low-rank residual, stats
    if recipe.lowrank > 0:
        L = torch.linalg.cholesky(Hd.to(torch.float64 if dev.type == "cpu" else torch.float32))
    idx_rows = idx_all.permute(1, 2, 0)  # [B, K, G]
    row_loss = row_loss.view(B, K)
    if recipe.row_scale:  # whitened errors were in units of W / s
        row_loss = row_loss * s2_rows
    results = []
    for i, W in enumerate(Ws):
        mine = [bi for bi, blk in enumerate(blocks) if blk.matrix == i]
        indices = torch.cat([idx_rows[bi, : blocks[bi].rows] for bi in mine], 0)  # [N_i, G]
        fields = {}
        if recipe.codebook_bits == 8:
            fields["codebook_scale"] = scale_all[:, mine].transpose(0, 1).contiguous()  # [Nb, G, d]
            fields["codebook_min"] = min_all[:, mine].transpose(0, 1).contiguous()
        fields["codebook"] = cb_all[:, mine].permute(1, 0, 3, 2).contiguous()  # [Nb, G, n, d]
        layer = AthenaLayer(
            shape=(Ns[i], M),
            d=d,
            n=n,
            k=k,
            codebook_bits=recipe.codebook_bits,
            indices=indices,
            row_scale=scales[i],
            **fields,
        )
        W_hat = layer.dequantize(include_lowrank=False)  # [N_i, M]
        loss_pq = proxy_loss(W, W_hat, H)
        r = recipe.rank(Ns[i], M)
        if r > 0:
            A, Bf = lowrank_residual((W - W_hat).to(L.dtype), L, r, gen)
            if scales[i] is not None:  # W_eff = diag(s) (Ŵ + A B): the stored A is divided by s
                A = (A.double() / scales[i].double().unsqueeze(1)).to(torch.float16)
            layer.lowrank_a, layer.lowrank_b = A, Bf
            W_hat = layer.dequantize()
        stats = {
            "proxy_loss": proxy_loss(W, W_hat, H),
            "proxy_loss_no_lowrank": loss_pq,
            "proxy_loss_hessian": "undamped",
            "rank": r,
            "damp": damp_used,
            "hessian_loss_damped": float(sum(row_loss[bi].sum() for bi in mine)),
        }
        results.append((layer, stats))
    seconds = time.perf_counter() - t_start
    for (_, stats), N in zip(results, Ns):
        stats["seconds"] = seconds * N / sum(Ns)
        stats["seconds_batch"] = seconds
    return results
