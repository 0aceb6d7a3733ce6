"""The PyTorch specs of the CUDA dequantize kernels (`athena_runtime/kernels/dequant.py`), with the same arguments
and the same argument checks; the runtime never calls them (its spec of the whole matmul is
`pq_reference.pq_matmul_reference`)."""

from __future__ import annotations

import torch

from athena_runtime.kernels import dequant
from athena_runtime.kernels.layout import PQGeometry, dequantize_reference


def dequantize_t_reference(
    qweight,
    codebook,
    geo: PQGeometry,
    dtype=torch.float16,
    *,
    out=None,
    stacked_a=None,
    slab_w=None,
    rows_per_chunk=None,
):
    """`dequant.dequantize_t` on any device: out[:M] = Ŵᵀ, and with stacked_a = A [N, r] also out[M:M + r] = Aᵀ,
    out[M + r:] = 0. Launch arguments are accepted and ignored."""
    K = dequant.check_args(qweight, codebook, geo, dtype, out, stacked_a)
    Wt = torch.empty(K, geo.N, device=qweight.device, dtype=dtype) if out is None else out
    Wt[: geo.M] = dequantize_reference(qweight, codebook, geo).t().to(dtype)
    if stacked_a is not None:
        r = stacked_a.shape[1]
        Wt[geo.M : geo.M + r] = stacked_a.t().to(dtype)
        Wt[geo.M + r :] = 0
    return Wt


def dequantize_fold_t_reference(
    qweight, codebook, geo: PQGeometry, lowrank_a, lowrank_b, *, out=None, rows_per_chunk=None
):
    """`dequant.dequantize_fold_t` on any device: (Ŵ + A B)ᵀ summed in fp32, rounded to fp16 once."""
    dequant.check_fold(qweight, codebook, geo, lowrank_a, lowrank_b, out)
    W = dequantize_reference(qweight, codebook, geo).float() + lowrank_a.float() @ lowrank_b.float()
    Wt = W.t().half()
    if out is None:
        return Wt.contiguous()
    out.copy_(Wt)
    return out


def copy_pad_cols_reference(x, xu, zero_from: int):
    """`dequant.copy_pad_cols`: xu[:, :M] = x, xu[:, zero_from:] = 0 (columns M .. zero_from are left as they are)."""
    dequant.check_copy(x, xu, zero_from)
    xu[:, : x.shape[1]] = x
    xu[:, zero_from:] = 0
    return xu
