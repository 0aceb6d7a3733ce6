"""The CPU execution path's linear layers: weights stored compact, multiplied by a compiled kernel.

On the CPU the reference path (pq_linear.py) keeps every layer dequantized as float32 and calls
`x @ Wᵀ`: a SmolLM2-135M decode step then streams ~0.5 GB of weights (memory-bound). Here the layers
are stored in 1 or 2 bytes a weight and multiplied in `cpu/linear.c` (fp32 activations and
accumulation, the weight converted in registers). Weight formats (ATHENA_CPU_WEIGHTS):

    auto   (default) a PQ layer with 8-bit codebooks in its exact uint8 form (`PQ8Linear`): every codebook
           entry is min + scale·u8 per (row block, column), so Ŵ[n, m] = colmin[b, m] + colscale[b, m]·U[n, m]
           with U uint8 [N, M] (1 byte a weight) and the column scale folded into x once per call; the
           low-rank term A(Bx) is applied in the same call (A, B as stored, fp16). Exact up to fp32
           rounding. Other layers fp16; the lm_head (or tied embedding) int8 per 32 columns ("q8g").
    fp16   W_eff = Ŵ + A·B rounded to float16 (relative error <= 2^-11), lm_head too;
    int8   W_eff per output row: W_eff[n, :] ≈ scale[n]·q[n, :], q in [-127, 127], lm_head too (lossy:
           SmolLM2's massive activations amplify per-row rounding);
    q8g    (one layer's format) int8 with one float32 scale per 32 columns: |error| <= group max / 254.

Layers that read the same input (q/k/v, gate/up) are concatenated into one (no PQ codebook-block
padding here: each part keeps its own row blocks). The tied or separate lm_head becomes one more layer.

`convert_model(model, weights)` rewrites a loaded CausalLM in place; `path.py` decides whether
to (and logs it).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from athena_runtime.cpu.build import CPUKernels
from athena_runtime.cpu.layer_desc import KINDS, LinearDesc
from athena_runtime.kernels import layout
from athena_runtime.log_once import log_once
from athena_runtime.pq_linear import PQLinear
from athena_runtime.split_linear import SplitLinear

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("auto", "fp16", "int8")  # ATHENA_CPU_WEIGHTS
LAYER_FORMATS = ("fp16", "int8", "q8g")  # CPULinear
Q8_GROUP = 32  # columns per scale of the q8g format (linear.c QG)
PANEL_ROWS = 8  # rows per panel of the packed pq8 and q8g weights (linear.c PR)
# CPULinear calls of at least this many tokens (prompt chunks) convert the weight to float32 for PyTorch's sgemm
# (its row-major kernels convert each weight once per 2 tokens). PQ8Linear always runs its panel kernel (4 tokens a
# pass over an L1-resident panel): all 120 linears of SmolLM2-135M with 64 tokens, one thread, 2-core EPYC:
# 419 ms CPU against 454 for float32 dequantization + sgemm (A/B in one process, 2026-12-07, load ~2.5).
SGEMM_TOKENS = 16
KERNELS = CPUKernels()  # built on first use, shared by every layer of the process


def effective_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_eff float32 [N, M], bias float32 [N] or None) of a PQLinear or dense nn.Linear, as the
    reference path computes them."""
    if isinstance(layer, PQLinear):
        return layer.effective_weight(), None if layer.bias is None else layer.bias.float()
    if isinstance(layer, nn.Linear):
        return layer.weight.float(), None if layer.bias is None else layer.bias.float()
    if isinstance(layer, (CPULinear, PQ8Linear)):
        return layer.dequantize(), layer.bias
    raise TypeError(f"no CPU weights for a {type(layer).__name__}")


def quantize_rows_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W float32 [N, M] -> (q int8 [N, M], scale float32 [N]) with W ≈ scale[:, None] · q."""
    amax = W.abs().amax(1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(W / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.float().contiguous()


def quantize_groups_int8(W: torch.Tensor, group: int = Q8_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """W float32 [N, M] -> (q int8 [N, M], scale float32 [N, ceil(M / group)]) with
    W[n, m] ≈ scale[n, m // group] · q[n, m], |error| <= scale / 2 (scale = group max |w| / 127)."""
    N, M = W.shape
    G = -(-M // group)
    Wp = torch.nn.functional.pad(W.float(), (0, G * group - M)).view(N, G, group)
    amax = Wp.abs().amax(2)  # [N, G]
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(Wp / scale[:, :, None]).clamp_(-127, 127).to(torch.int8).view(N, G * group)[:, :M]
    return q.contiguous(), scale.contiguous()


def pack_q8g(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, M], scale [N, G]) -> panels of 8 rows: (int8 [P, G, 8, 32], float32 [P, G, 8]), P = ceil(N / 8),
    zero rows and columns as padding (linear.c's q8g section)."""
    N, M = q.shape
    G = scale.shape[1]
    P = -(-N // PANEL_ROWS)
    qp = torch.zeros(P * PANEL_ROWS, G * Q8_GROUP, dtype=torch.int8)
    qp[:N, :M] = q
    sp = torch.zeros(P * PANEL_ROWS, G, dtype=torch.float32)
    sp[:N] = scale
    qp = qp.view(P, PANEL_ROWS, G, Q8_GROUP).permute(0, 2, 1, 3).contiguous()
    return qp, sp.view(P, PANEL_ROWS, G).permute(0, 2, 1).contiguous()


def unpack_q8g(qp: torch.Tensor, sp: torch.Tensor, N: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_q8g: (q int8 [N, M], scale float32 [N, G])."""
    P, G = qp.shape[:2]
    q = qp.permute(0, 2, 1, 3).reshape(P * PANEL_ROWS, G * Q8_GROUP)[:N, :M]
    return q, sp.permute(0, 2, 1).reshape(P * PANEL_ROWS, G)[:N]


class CPULinear(nn.Module):
    """y = x W_effᵀ + bias with W_eff stored as fp16, int8 (+ per-row scale) or q8g (int8 + a scale per 32
    columns); x and y float32."""

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None, weights: str = "fp16"):
        super().__init__()
        if weights not in LAYER_FORMATS:
            raise ValueError(f"unknown CPU layer format {weights!r}; choose one of {LAYER_FORMATS}")
        self.weights = weights
        self.out_features, self.in_features = W.shape
        W = W.float()
        if weights == "int8":
            q, scale = quantize_rows_int8(W)
        elif weights == "q8g":
            q, scale = pack_q8g(*quantize_groups_int8(W))
        else:
            q, scale = W.half().contiguous(), None
        # int8 / float16 [N, M]; q8g: int8 panels [ceil(N / 8), G, 8, 32] (pack_q8g)
        self.register_buffer("qweight", q, persistent=False)
        # float32 [N] (int8), [ceil(N / 8), G, 8] (q8g) or None
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float().contiguous(), persistent=False)
        lib = KERNELS.load()
        self._fn = {"int8": lib.i8_linear, "fp16": lib.f16_linear, "q8g": lib.q8g_linear}[weights]
        self._ptrs = (
            self.qweight.data_ptr(),
            None if scale is None else scale.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
        )

    def descriptor(self) -> LinearDesc:
        """This layer for layer.c's linear_run (pointers into its buffers)."""
        w, s, b = self._ptrs
        return LinearDesc(kind=KINDS[self.weights], N=self.out_features, M=self.in_features, W=w, scale=s, bias=b)

    def nbytes(self) -> int:
        """Bytes read per call (weights and scales)."""
        return self.qweight.numel() * self.qweight.element_size() + (
            0 if self.scale is None else 4 * self.scale.numel()
        )

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel multiplies by, float32 [N, M]."""
        if self.scale is None:
            return self.qweight.float()
        if self.weights == "q8g":
            q, scale = unpack_q8g(self.qweight, self.scale, self.out_features, self.in_features)
            return q.float() * scale.repeat_interleave(Q8_GROUP, 1)[:, : self.in_features]
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        T = x2.shape[0]
        if T >= SGEMM_TOKENS:
            y = x2 @ self.dequantize().t()
            if self.bias is not None:
                y += self.bias
            return y.reshape(*lead, self.out_features).to(x.dtype)
        y = torch.empty(T, self.out_features, dtype=torch.float32)
        w, s, b = self._ptrs
        if (
            T
            and self._fn(
                x2.data_ptr(), T, self.in_features, w, s, b, y.data_ptr(), self.out_features, torch.get_num_threads()
            )
            and self.weights == "q8g"
        ):
            raise MemoryError("q8g_linear: out of memory for its scratch buffer")
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}"


def pq_uint8_form(layer: PQLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A PQ layer's Ŵ as (U uint8 [N, M], colscale float32 [Nb, M], colmin float32 [Nb, M]) with
    Ŵ[n, m] = colmin[n // k, m] + colscale[n // k, m] · U[n, m], or None when that form would not be exact.

    An 8-bit codebook stores each centroid coordinate as code · scale + min with one (scale, min) per
    (row block b, column group j, coordinate l), i.e. per (b, column m = d·j + l): U[n, m] is the code of
    row n's centroid. The stored codes are used when the loader kept them (`PQLinear.codebook_codes`, CPU
    loads); otherwise (e.g. a layer fused by PQLinear.concat) they are recovered from each codebook column's
    min and (max - min) / 255 and accepted only if they reproduce the codebook exactly."""
    geo = layer.geo
    I = layout.unpack_words(layer.qweight, geo)  # [N, G]
    if layer.codebook_codes is not None:
        codes, scale, cmin = layer.codebook_codes  # [Nb, G, n, d], [Nb, G, d], [Nb, G, d]
        codes, step, lo = codes.transpose(2, 3), scale.float(), cmin.float()  # codes [Nb, G, d, n]
    else:
        C = layer.codebook[:, : geo.G].float()  # [Nb, G, d, n]
        lo, hi = C.amin(3), C.amax(3)  # [Nb, G, d]
        step = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
        codes = torch.round((C - lo[..., None]) / step[..., None]).clamp_(0, 255).to(torch.uint8)
        if not torch.equal(codes.float() * step[..., None] + lo[..., None], C):
            return None
    blk = (torch.arange(geo.N) // geo.k)[:, None]  # [N, 1]
    j = torch.arange(geo.G)[None, :]  # [1, G]
    U = codes[blk, j, :, I]  # [N, G, d]
    U = U.reshape(geo.N, geo.G * geo.d)[:, : geo.M].contiguous()
    colscale = step.reshape(geo.Nb, geo.G * geo.d)[:, : geo.M].contiguous()
    colmin = lo.reshape(geo.Nb, geo.G * geo.d)[:, : geo.M].contiguous()
    return U, colscale, colmin


def _lowrank(layer: PQLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A [N, r], B [r, M]) float32 without the zero padding pq_linear adds, or None."""
    if layer.lowrank_a is None:
        return None
    A, B = layer.lowrank_a.float(), layer.lowrank_b.float()
    keep = (A != 0).any(0) | (B != 0).any(1)
    return (A[:, keep], B[keep]) if bool(keep.any()) else None


def _round_up(v: int, to: int) -> int:
    return -(-v // to) * to


def pack_panels(U: torch.Tensor, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U uint8 [N, M] with codebook blocks [starts[b], starts[b+1]) -> (panels uint8 [P, 8 · Mp], first row int64
    [P], block int64 [P]): each panel is 8 rows of one block (the block's last one padded with zero rows) stored
    as [Mp / 8][8 rows][8 columns], Mp = M rounded up to 8 (zero columns), i.e. one 64-byte cache line per
    8 columns of the panel's rows (linear.c's pq8 section)."""
    M = U.shape[1]
    Mp = _round_up(M, 8)
    chunks, prow, pblk = [], [], []
    for b in range(len(starts) - 1):
        n0, n1 = starts[b], starts[b + 1]
        if n1 <= n0:
            continue
        rows = _round_up(n1 - n0, PANEL_ROWS)
        part = torch.zeros(rows, Mp, dtype=torch.uint8)
        part[: n1 - n0, :M] = U[n0:n1]
        chunks.append(part.view(rows // PANEL_ROWS, PANEL_ROWS, Mp // 8, 8).permute(0, 2, 1, 3).reshape(-1, 8 * Mp))
        prow += range(n0, n1, PANEL_ROWS)
        pblk += [b] * (rows // PANEL_ROWS)
    panels = torch.cat(chunks) if chunks else torch.zeros(0, 8 * Mp, dtype=torch.uint8)
    return panels, torch.tensor(prow, dtype=torch.int64), torch.tensor(pblk, dtype=torch.int64)


def _panel_rows(prow: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index [P, 8] of each panel slot, clamped to a valid row; valid [P, 8]: the slot holds a row of its
    block)."""
    ends = starts[torch.searchsorted(starts, prow, right=True)]  # [P]: the end of each panel's block
    idx = prow[:, None] + torch.arange(PANEL_ROWS)
    valid = idx < ends[:, None]
    return idx.clamp(max=max(int(starts[-1]) - 1, 0)), valid


def pack_rows(A: torch.Tensor, prow: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """A [N, R] -> [P, R, 8]: each panel's 8 rows of A side by side (zero rows past its block's end)."""
    idx, valid = _panel_rows(prow, starts)
    return (A[idx] * valid[:, :, None]).transpose(1, 2).contiguous()


def unpack_panels(panels: torch.Tensor, prow: torch.Tensor, starts: torch.Tensor, M: int) -> torch.Tensor:
    """The inverse of pack_panels: U uint8 [N, M]."""
    U = torch.zeros(int(starts[-1]), M, dtype=torch.uint8)
    if panels.numel():
        Mp = panels.shape[1] // PANEL_ROWS
        rows = panels.view(-1, Mp // 8, PANEL_ROWS, 8).permute(0, 2, 1, 3).reshape(-1, PANEL_ROWS, Mp)
        idx, valid = _panel_rows(prow, starts)
        U[idx[valid]] = rows[valid][:, :M]
    return U


class PQ8Linear(nn.Module):
    """One or more PQ layers (same input) in their exact uint8 form (`pq_uint8_form`), the low-rank terms and
    biases included: y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias through `pq8_linear` in linear.c."""

    def __init__(self, parts: list[PQLinear]):
        super().__init__()
        M = parts[0].in_features
        if any(p.in_features != M or p.codebook_bits != 8 for p in parts):
            raise ValueError("PQ8Linear needs PQ layers with one input size and 8-bit codebooks")
        Us, scales, mins, starts, lowranks, biases = [], [], [], [], [], []
        row = 0
        for p in parts:
            form = pq_uint8_form(p)
            if form is None:
                raise ValueError("PQ8Linear: a codebook is not exactly code · scale + min (use fp16)")
            U, cs, cm = form
            Us.append(U), scales.append(cs), mins.append(cm)
            starts += [row + b * p.geo.k for b in range(p.geo.Nb)]
            lowranks.append(_lowrank(p))
            biases.append(None if p.bias is None else p.bias.float())
            row += p.geo.N
        self.in_features, self.out_features = M, row
        R = sum(lr[0].shape[1] for lr in lowranks if lr is not None)
        A, B = torch.zeros(row, R), torch.zeros(R, M)
        r0, n0 = 0, 0
        for p, lr in zip(parts, lowranks):
            if lr is not None:
                r = lr[0].shape[1]
                A[n0 : n0 + p.geo.N, r0 : r0 + r], B[r0 : r0 + r] = lr
                r0 += r
            n0 += p.geo.N
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(p.geo.N) for p, b in zip(parts, biases)])
        U = torch.cat(Us)
        starts.append(row)
        self.register_buffer("starts", torch.tensor(starts, dtype=torch.int64), persistent=False)
        panels, prow, pblk = pack_panels(U, starts)
        self.padded_in = panels.shape[1] // PANEL_ROWS if panels.numel() else _round_up(M, 8)
        self.register_buffer("panels", panels.contiguous(), persistent=False)  # uint8, see pack_panels
        self.register_buffer("panel_row", prow, persistent=False)  # int64 [P]: first row of each panel
        self.register_buffer("panel_block", pblk, persistent=False)  # int64 [P]: its codebook block
        self.register_buffer("colscale", torch.cat(scales).contiguous(), persistent=False)  # float32 [blocks, M]
        self.register_buffer("colmin", torch.cat(mins).contiguous(), persistent=False)  # float32 [blocks, M]
        self.register_buffer("A", A.half().contiguous(), persistent=False)  # fp16 [N, R]
        # the kernel reads A per panel: [P, R, 8] (rows of a panel side by side, zero for padding rows)
        self.register_buffer("A_panels", pack_rows(self.A, prow, self.starts), persistent=False)
        self.register_buffer("B", B.half().contiguous(), persistent=False)  # fp16 [R, M]
        self.register_buffer("bias", bias, persistent=False)  # float32 [N] or None
        self.rank = R
        self._fn = KERNELS.load().pq8_linear
        self._args = (
            self.padded_in,
            self.panels.data_ptr(),
            prow.numel(),
            prow.data_ptr(),
            pblk.data_ptr(),
            self.starts.data_ptr(),
            len(starts) - 1,
            self.colscale.data_ptr(),
            self.colmin.data_ptr(),
            R,
            self.A_panels.data_ptr(),
            self.B.data_ptr(),
            None if bias is None else bias.data_ptr(),
        )

    def descriptor(self) -> LinearDesc:
        """This layer for layer.c's linear_run (pointers into its buffers)."""
        Mp, W, P, prow, pblk, start, nblk, colscale, colmin, R, A, B, bias = self._args
        return LinearDesc(
            kind=KINDS["pq8"],
            N=self.out_features,
            M=self.in_features,
            W=W,
            bias=bias,
            Mp=Mp,
            P=P,
            prow=prow,
            pblk=pblk,
            start=start,
            nblk=nblk,
            colscale=colscale,
            colmin=colmin,
            R=R,
            A=A,
            B=B,
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.panels, self.colscale, self.colmin, self.A, self.B))

    def codes(self) -> torch.Tensor:
        """U uint8 [N, M] (the panels unpacked)."""
        return unpack_panels(self.panels, self.panel_row, self.starts, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel multiplies by, float32 [N, M] (Ŵ + A·B)."""
        blk = torch.bucketize(torch.arange(self.out_features), self.starts[1:], right=True)  # [N] block of each row
        W = self.colmin[blk] + self.colscale[blk] * self.codes().float()
        return W + self.A.float() @ self.B.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        T = x2.shape[0]
        y = torch.empty(T, self.out_features, dtype=torch.float32)
        if T and self._fn(
            x2.data_ptr(), T, self.in_features, *self._args, y.data_ptr(), self.out_features, torch.get_num_threads()
        ):
            raise MemoryError("pq8_linear: out of memory for its scratch buffer")
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weights=pq8, "
            f"blocks={self.starts.numel() - 1}, rank={self.rank}"
        )


def _is_pq8(layer: nn.Module) -> bool:
    """Whether PQ8Linear reproduces `layer` exactly."""
    if not (isinstance(layer, PQLinear) and layer.codebook_bits == 8):
        return False
    if layer.codebook_codes is None and pq_uint8_form(layer) is None:
        log_once(
            log,
            ("pq8-inexact", layer.geo.N, layer.geo.M),
            logging.INFO,
            "CPU path: a PQ layer [%d x %d] without "
            "its stored codebook codes is not exactly min + scale · u8 per column: fp16 weights for it",
            layer.geo.N,
            layer.geo.M,
        )
        return False
    return True


def compact(parts: list[nn.Module], weights: str) -> nn.Module:
    """The CPU layer computing `parts` (same input) in one call: PQ8Linear for 8-bit-codebook PQ layers under
    "auto", else a CPULinear over the concatenated effective weights (fp16 under "auto"). Several parts come
    back as a SplitLinear (views of one output)."""
    sizes = [p.out_features for p in parts]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    if weights == "auto" and all(_is_pq8(p) for p in parts):
        lin = PQ8Linear(parts)
    else:
        Ws, biases = zip(*(effective_weight(p) for p in parts))
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else W.new_zeros(W.shape[0]) for W, b in zip(Ws, biases)])
        lin = CPULinear(torch.cat(Ws), bias, "fp16" if weights == "auto" else weights)
    return lin if len(parts) == 1 else SplitLinear(lin, offsets, sizes)


def _fused(module: nn.Module, fused_name: str, names: tuple[str, ...], weights: str) -> SplitLinear:
    """q/k/v or gate/up as one CPU layer, whether split_linear fused them at load (PQ or dense) or not."""
    split = getattr(module, fused_name, None)
    if split is None:
        return compact([getattr(module, n) for n in names], weights)
    if weights == "auto" and _is_pq8(split.linear):  # one PQ layer (codebook-block padding rows included)
        return SplitLinear(PQ8Linear([split.linear]), split.offsets, split.sizes)
    W, bias = effective_weight(split.linear)
    parts = []
    for off, size in zip(split.offsets, split.sizes):
        part = nn.Linear(W.shape[1], size, bias=bias is not None, device="meta")
        part.weight = nn.Parameter(W[off : off + size], requires_grad=False)
        if bias is not None:
            part.bias = nn.Parameter(bias[off : off + size], requires_grad=False)
        parts.append(part)
    return compact(parts, weights)


@torch.inference_mode()
def convert_model(model: nn.Module, weights: str = "auto") -> dict:
    """Rewrite every decoder linear layer (and the lm_head) of a loaded CausalLM as CPU layers, in place.
    Returns {"layers": count, "weight_bytes": bytes now streamed per token, "reference_bytes": fp32 bytes,
    "formats": {format: layer count}}."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown CPU weight format {weights!r}; choose one of {WEIGHT_FORMATS}")
    layers: list[nn.Module] = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = _fused(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), weights)
        for name in ("q_proj", "k_proj", "v_proj"):
            if hasattr(attn, name):
                delattr(attn, name)
        attn.o_proj = compact([attn.o_proj], weights)
        mlp.gate_up_proj = _fused(mlp, "gate_up_proj", ("gate_proj", "up_proj"), weights)
        for name in ("gate_proj", "up_proj"):
            if hasattr(mlp, name):
                delattr(mlp, name)
        mlp.down_proj = compact([mlp.down_proj], weights)
        layers += [attn.qkv_proj.linear, attn.o_proj, mlp.gate_up_proj.linear, mlp.down_proj]
    if model.lm_head is None:
        W, bias = model.model.embed_tokens.weight.float(), None  # tied: the embedding matrix
    else:
        W, bias = effective_weight(model.lm_head)
    model.lm_head = CPULinear(W, bias, "q8g" if weights == "auto" else weights)  # compute_logits uses it when set
    layers.append(model.lm_head)
    formats: dict[str, int] = {}
    for lin in layers:
        name = "pq8" if isinstance(lin, PQ8Linear) else lin.weights
        formats[name] = formats.get(name, 0) + 1
    return {
        "layers": len(layers),
        "weight_bytes": sum(lin.nbytes() for lin in layers),
        "reference_bytes": sum(4 * lin.in_features * lin.out_features for lin in layers),
        "formats": formats,
    }
