"""The paged KV cache: one class per storage format behind one interface.

Storage per layer: `k[layer], v[layer]` of shape `[num_blocks + 1, block_size, Hkv, D_stored]`.
Token `t` of a sequence lives in slot `block_table[t // block_size] * block_size + t % block_size`.
Block `num_blocks` (`null_block`) is a scratch block outside the pool: padded batch entries (CUDA
graphs) write there and padded block-table entries point there, so every kernel shape stays static.

Formats (symmetric, group-wise along head_dim, `group_size` values share one float16 scale):
- `fp16`: unquantized (`FP16KVCache`; its `dtype` may be float32 for exact CPU tests).
- `int8`: `q = round(x / s)` in [-127, 127], `s = max|x| / 127`; `|x - q·s| <= s/2`.
- `int4`: `q = round(x / s)` in [-7, 7], `s = max|x| / 7`, stored as the nibble `q + 8`, two per byte
  (element `2i` in the low nibble, `2i + 1` in the high one); `|x - (nibble - 8)·s| <= s/2`.

Optional Hadamard rotation (`hadamard=True`): `write` stores `k·H` and `v·H`, with `H` the
orthonormal symmetric Sylvester-Hadamard matrix of size head_dim (`H·H = I`). Rotation spreads
outlier channels over the whole head so that group scales fit better. Attention is then computed in
the rotated basis: `(q·H)·(k·H)ᵀ = q·kᵀ`, and `Σ p·(v·H) = (Σ p·v)·H`, so the caller rotates q with
`rotate(q)` before attention and un-rotates the output with `rotate(o)` (the same matrix) after.
"""
from __future__ import annotations

import math

import torch

KV_FORMATS = ("fp16", "fp32", "int8", "int4")

_SCALE_MIN = 2.0**-14  # smallest normal float16: a scale never underflows to a subnormal
_SCALE_ROUND_UP = 1.0 + 2.0**-10  # > float16 rounding error, so the stored scale covers max|x|


def hadamard_matrix(n: int, device=None) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two), float32, symmetric."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device)


def quantize_symmetric(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (q int8 [..., D] in [-qmax, qmax], scale float16 [..., D // group_size])."""
    qmax = 2 ** (bits - 1) - 1
    xg = x.float().unflatten(-1, (-1, group_size))  # [..., D/G, G]
    amax = xg.abs().amax(-1)  # [..., D/G]
    scale = (amax / qmax * _SCALE_ROUND_UP).clamp_min(_SCALE_MIN).half()
    q = torch.round(xg / scale.float().unsqueeze(-1)).clamp_(-qmax, qmax)
    return q.flatten(-2).to(torch.int8), scale


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [..., D] integer, scale [..., D // group_size] -> float32 [..., D]."""
    xg = q.float().unflatten(-1, (-1, group_size)) * scale.float().unsqueeze(-1)
    return xg.flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int8 [..., D] in [-8, 7] -> uint8 [..., D // 2]: nibble q + 8, even elements low."""
    n = (q.to(torch.int16) + 8).to(torch.uint8)
    return n[..., 0::2] | (n[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D // 2] -> int8 [..., D] in [-8, 7]."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], -1).flatten(-2)


class KVCache:
    """Base class: allocation, slot writes, reads for the reference attention, byte accounting."""

    fmt: str = ""
    quantized: bool = False

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device, hadamard: bool = False, group_size: int = 32):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        if self.quantized and head_dim % group_size:
            raise ValueError(f"group_size {group_size} must divide head_dim {head_dim}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.group_size = num_kv_heads, head_dim, group_size
        self.device = torch.device(device)
        self.hadamard = hadamard
        self.rotation = hadamard_matrix(head_dim, self.device) if hadamard else None  # [D, D]
        self.null_block = num_blocks
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads)
        self.k = torch.zeros(*shape, self.stored_dim(head_dim), dtype=self.storage_dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        self.k_scale = self.v_scale = None  # [L, num_blocks + 1, block_size, Hkv, D // G] float16
        if self.quantized:
            self.k_scale = torch.zeros(*shape, head_dim // group_size, dtype=torch.float16, device=self.device)
            self.v_scale = torch.zeros_like(self.k_scale)

    @staticmethod
    def create(fmt: str, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
               device, hadamard: bool = False, group_size: int = 32) -> "KVCache":
        """`fmt`: fp16 | fp32 (unquantized, for exact tests) | int8 | int4."""
        if fmt not in KV_FORMATS:
            raise ValueError(f"unknown KV cache format {fmt!r}; supported: {', '.join(KV_FORMATS)}")
        args = (num_layers, num_blocks, block_size, num_kv_heads, head_dim, device, hadamard, group_size)
        if fmt in ("fp16", "fp32"):
            return FP16KVCache(*args, dtype=torch.float16 if fmt == "fp16" else torch.float32)
        return (Int8KVCache if fmt == "int8" else Int4KVCache)(*args)

    # --- format hooks -------------------------------------------------------------------------
    storage_dtype: torch.dtype = torch.float16

    @staticmethod
    def stored_dim(head_dim: int) -> int:
        return head_dim

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [T, Hkv, D] -> (data [T, Hkv, D_stored], scale [T, Hkv, D/G] or None)."""
        raise NotImplementedError

    def dequantize(self, data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Inverse of `quantize`, float32 [..., D]."""
        raise NotImplementedError

    # --- interface ----------------------------------------------------------------------------
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> x·H (identity without Hadamard). Its own inverse."""
        if self.rotation is None:
            return x
        return (x.float() @ self.rotation).to(x.dtype)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v [T, Hkv, D] (post-RoPE) at the slots slot_mapping [T] of `layer`."""
        for x, data, scale in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            q, s = self.quantize(self.rotate(x))
            data[layer].view(-1, self.num_kv_heads, data.shape[-1]).index_copy_(0, slot_mapping, q)
            if s is not None:
                scale[layer].view(-1, self.num_kv_heads, scale.shape[-1]).index_copy_(0, slot_mapping, s)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized k, v float32 [len(slots), Hkv, D] (in the rotated basis when hadamard)."""
        out = []
        for data, scale in ((self.k, self.k_scale), (self.v, self.v_scale)):
            d = data[layer].view(-1, self.num_kv_heads, data.shape[-1])[slots]
            s = None if scale is None else scale[layer].view(-1, self.num_kv_heads, scale.shape[-1])[slots]
            out.append(self.dequantize(d, s))
        return out[0], out[1]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers, K and V, scales included."""
        fmt = "fp32" if self.storage_dtype == torch.float32 else self.fmt
        return 2 * self.num_layers * self.num_kv_heads * head_bytes(fmt, self.head_dim, self.group_size)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.num_layers}, blocks={self.num_blocks}, "
                f"block_size={self.block_size}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"hadamard={self.hadamard})")


class FP16KVCache(KVCache):
    fmt = "fp16"

    def __init__(self, *args, dtype: torch.dtype = torch.float16, **kwargs):
        self.storage_dtype = dtype
        super().__init__(*args, **kwargs)

    def quantize(self, x):
        return x.to(self.storage_dtype), None

    def dequantize(self, data, scale):
        return data.float()


class Int8KVCache(KVCache):
    fmt = "int8"
    quantized = True
    storage_dtype = torch.int8

    def quantize(self, x):
        return quantize_symmetric(x, 8, self.group_size)

    def dequantize(self, data, scale):
        return dequantize_symmetric(data, scale, self.group_size)


class Int4KVCache(KVCache):
    fmt = "int4"
    quantized = True
    storage_dtype = torch.uint8

    @staticmethod
    def stored_dim(head_dim: int) -> int:
        if head_dim % 2:
            raise ValueError(f"int4 KV cache needs an even head_dim, got {head_dim}")
        return head_dim // 2

    def quantize(self, x):
        q, scale = quantize_symmetric(x, 4, self.group_size)
        return pack_int4(q), scale

    def dequantize(self, data, scale):
        return dequantize_symmetric(unpack_int4(data), scale, self.group_size)


def head_bytes(fmt: str, head_dim: int, group_size: int = 32) -> int:
    """Bytes of one token's vector of one KV head in `fmt`, float16 group scales included."""
    scales = 2 * (head_dim // group_size)
    return {"fp16": 2 * head_dim, "fp32": 4 * head_dim, "int8": head_dim + scales, "int4": head_dim // 2 + scales}[fmt]


def blocks_for_budget(budget_bytes: int, fmt: str, num_layers: int, block_size: int, num_kv_heads: int,
                      head_dim: int, group_size: int = 32) -> int:
    """How many blocks of `fmt` fit in `budget_bytes` (the scratch null block included)."""
    if fmt not in KV_FORMATS:
        raise ValueError(f"unknown KV cache format {fmt!r}; supported: {', '.join(KV_FORMATS)}")
    block_bytes = 2 * num_layers * num_kv_heads * head_bytes(fmt, head_dim, group_size) * block_size
    return max(0, int(budget_bytes // block_bytes) - 1)
