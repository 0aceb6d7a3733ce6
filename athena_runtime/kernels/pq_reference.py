"""The PyTorch spec of the PQ matmul and the argument checks every PQ kernel wrapper shares.

    y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias,   Ŵ[i, d·j + l] = C[i // k, j, l, I[i, j]]   (layout.py)

`pq_matmul_reference` takes the same arguments as the kernels (`lut.lut_matmul`, `frag.frag_matmul`,
`triton_lut.triton_lut_matmul`, `dequant_matmul.dequant_matmul`) and is what they are tested against.
"""

from __future__ import annotations

import os

import torch

from athena_runtime.kernels.layout import PQGeometry, dequantize_reference


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_layer_tensors(qweight, codebook, geo: PQGeometry):
    """The kernel-layout shapes of a layer's index words and codebook (layout.py)."""
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (geo.GW, geo.N_pad):
        raise ValueError(f"qweight must be int32 {(geo.GW, geo.N_pad)}, got {qweight.dtype} {tuple(qweight.shape)}")
    if tuple(codebook.shape) != (geo.Nb, geo.G_pad, geo.d, geo.n):
        raise ValueError(f"codebook must be {(geo.Nb, geo.G_pad, geo.d, geo.n)}, got {tuple(codebook.shape)}")


def check_operands(x, qweight, codebook, geo: PQGeometry, lowrank_a, lowrank_b, bias, *, cuda_fp16: bool = False):
    """Shared argument checks of the PQ kernel wrappers; `cuda_fp16`: the CUDA kernels' fp16 CUDA operands too."""
    if x.dim() != 2 or x.shape[1] != geo.M:
        raise ValueError(f"x must be [T, {geo.M}], got {tuple(x.shape)}")
    check_layer_tensors(qweight, codebook, geo)
    if (lowrank_a is None) != (lowrank_b is None):
        raise ValueError("lowrank_a and lowrank_b come together")
    if lowrank_a is not None and (
        lowrank_a.shape[0] != geo.N or lowrank_b.shape[1] != geo.M or lowrank_a.shape[1] != lowrank_b.shape[0]
    ):
        raise ValueError(
            f"low-rank factors {tuple(lowrank_a.shape)} x {tuple(lowrank_b.shape)} do not fit [{geo.N}, {geo.M}]"
        )
    if bias is not None and tuple(bias.shape) != (geo.N,):
        raise ValueError(f"bias must be [{geo.N}], got {tuple(bias.shape)}")
    tensors = [t for t in (x, qweight, codebook, lowrank_a, lowrank_b, bias) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("all operands must be on one device")
    if x.device.type != "cuda" and (cuda_fp16 or not interpreting()):
        raise ValueError("the PQ kernels need a CUDA device (Triton ones also run under TRITON_INTERPRET=1)")
    if cuda_fp16 and (x.dtype != torch.float16 or codebook.dtype != torch.float16):
        raise ValueError(f"the CUDA PQ kernels take fp16 x and codebooks, got {x.dtype} / {codebook.dtype}")
    if not all(t.is_contiguous() for t in tensors[1:]):
        raise ValueError("qweight, codebook, low-rank factors and bias must be contiguous")


def pq_matmul_reference(x, qweight, codebook, geo: PQGeometry, lowrank_a=None, lowrank_b=None, bias=None, **tuning):
    """The spec: dequantize Ŵ, then y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias in fp32, returned in x's dtype (launch
    arguments of the kernels are accepted and ignored)."""
    xf = x.float()
    y = xf @ dequantize_reference(qweight, codebook, geo).float().t()  # [T, N]
    if lowrank_a is not None:
        y = y + (xf @ lowrank_b.float().t()) @ lowrank_a.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
