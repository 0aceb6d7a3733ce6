"""Write a small compressed Athena folder (FORMAT.md) from a tiny HF model, without calibration.

Every decoder linear layer is stored quantized: "rtn" (4-bit, group 32, min/max rounding) or
"athena" (d=2, n=16, k=32, uint8 codebooks drawn from the layer's own sub-vectors, rank-2 residual).
The numbers are not good quantization; they are valid tensors for exercising the loader.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from athena_runtime.format import checkpoint
from athena_runtime.format.layers import AthenaLayer, ScalarLayer, quantize_codebook_uint8

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _rtn(W: torch.Tensor, bias, bits=4, g=32) -> ScalarLayer:
    N, M = W.shape
    Wg = W.float().unflatten(1, (-1, g))  # [N, M/g, g]
    lo, hi = Wg.amin(-1), Wg.amax(-1)
    scales = ((hi - lo) / (2**bits - 1)).clamp_min(1e-4).half()
    zeros = torch.round(-lo / scales.float()).half()
    q = torch.round(Wg / scales.float()[..., None] + zeros.float()[..., None]).clamp(0, 2**bits - 1)
    return ScalarLayer(
        shape=(N, M),
        bits=bits,
        group_size=g,
        method="rtn",
        q=q.flatten(1).long(),
        scales=scales,
        zeros=zeros,
        bias=bias,
    )


def _athena(W: torch.Tensor, bias, gen, d=2, n=16, k=32, rank=2) -> AthenaLayer:
    N, M = W.shape
    G, Nb = M // d, -(-N // k)
    vecs = W.float().reshape(N, G, d)  # [N, G, d]
    rows = torch.randint(0, N, (Nb, n), generator=gen)  # centroids: sub-vectors of random rows
    C = vecs[rows].permute(0, 2, 1, 3)  # [Nb, G, n, d]
    codes, scale, minimum = quantize_codebook_uint8(C, dim=-2)
    Cq = codes.float() * scale.float().unsqueeze(-2) + minimum.float().unsqueeze(-2)
    dist = (vecs[:, :, None, :] - Cq[torch.arange(N) // k]).pow(2).sum(-1)  # [N, G, n]
    A = (torch.randn(N, rank, generator=gen) * 0.01).half()
    B = (torch.randn(rank, M, generator=gen) * 0.01).half()
    return AthenaLayer(
        shape=(N, M),
        d=d,
        n=n,
        k=k,
        codebook_bits=8,
        indices=dist.argmin(-1),
        codebook=codes,
        codebook_scale=scale,
        codebook_min=minimum,
        lowrank_a=A,
        lowrank_b=B,
        bias=bias,
    )


def write_compressed(hf_folder: Path, out: Path, method: str) -> Path:
    import json

    config = json.loads((hf_folder / "config.json").read_text())
    source = load_file(str(hf_folder / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    tensors, layers = {}, {}
    quantized = {f"model.layers.{i}.{name}" for i in range(config["num_hidden_layers"]) for name in LINEARS}
    for prefix in sorted(quantized):
        W, bias = source[f"{prefix}.weight"], source.get(f"{prefix}.bias")
        bias = None if bias is None else bias.half()
        layer = _rtn(W, bias) if method == "rtn" else _athena(W, bias, gen)
        tensors.update(layer.to_tensors(prefix))
        layers[prefix] = layer.meta()
    for name, t in source.items():
        if name.rsplit(".", 1)[0] not in quantized:
            tensors[name] = t.half()
    out.mkdir(parents=True)
    checkpoint.finalize(
        out,
        hf_folder,
        tensors,
        {"architecture": config["model_type"], "method": method, "recipe": {}, "layers": layers},
    )
    return out
