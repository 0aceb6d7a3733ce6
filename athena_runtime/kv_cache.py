"""The paged KV cache: one class per storage format behind one interface.

Storage per layer: `k[layer], v[layer]` of shape `[num_blocks + 1, block_size, Hkv, D_stored]`.
Token `t` of a sequence lives in slot `block_table[t // block_size] * block_size + t % block_size`.
Block `num_blocks` (`null_block`) is a scratch block outside the pool: padded batch entries (CUDA
graphs) write there and padded block-table entries point there, so every kernel shape stays static.

Formats (group-wise along head_dim: `group_size` consecutive values share their float16 parameters):
- `fp16`: unquantized (`FP16KVCache`; its `dtype` may be float32 for exact CPU tests).
- `int8`: symmetric, groups of 32: `q = round(x / s)` in [-127, 127], `s = max|x| / 127`;
  `|x - q·s| <= s/2`.
- `int4`: asymmetric, groups of 64: `x ≈ z + n·s` with the nibble `n` in [0, 15] stored two per byte
  (element `2i` in the low nibble, `2i + 1` in the high one) and `s`, `z` float16 (`k_scale`,
  `k_zero`). `[z, z + 15·s]` is the group's `[min, max]` shrunk about its midpoint by the ratio in
  `CLIP_RATIOS` that gives the group the least squared error; with ratio 1, `|x - (z + n·s)| <= s/2`
  (plus the float16 rounding of `z` at the group's minimum).
  Bytes per token and head: `D/2 + 4·D/64`, the same as 4 bits plus one float16 scale per 32.

Writes: `write_reference` is the PyTorch write (the spec, and the CPU path); on CUDA the quantized formats
write a layer's K and V in one Triton launch (`kernels/kv_write.py`), fp16 in one row scatter.

The stored basis. Attention needs `q·k` only up to a constant per query (softmax is shift-invariant)
and `Σ p·v`, so the cache stores keys and values in another basis and the caller moves the query in
and the output back (`query`, `output`):

    k̃ = ((k - m - [position = 0]·δ) ⊙ d)·H        ṽ = v·H
    q̃ = (q ⊘ d)·H                                   o = õ·H

with per-(layer, KV head) vectors `m` (key offset), `d` (key channel scale, > 0) and `δ` (offset of
the key at position 0), and `H` the orthonormal symmetric Sylvester-Hadamard matrix (`H·H = I`). Then
`q̃·k̃ = q·k - q·m` for every key after position 0 (`q·m` is the same for all keys of the query), and
attention adds `s = (δ ⊙ d)·H` (`sink_key`) back to the key at position 0 so that it scores the same
`q·k - q·m`: exact, whatever m, d, δ are. What they buy is a smaller quantization error:
- `m`, the mean key: Llama-family keys carry a large offset on a few channels (on the embedded model
  about 60% of the key energy), which would otherwise set every group's range;
- `d = (E[q_c²] / Var[k_c])^(1/4)` (rms 1 per head): balances key and query channels, so that rounding
  error spread evenly by `H` costs the least in `q·k`;
- `δ`: the first token of a sequence is an attention sink whose key sits far from the mean and whose
  score every query depends on; it is quantized relative to the mean first key `m + δ` instead;
- `H` spreads the remaining outlier channels over the whole head so that group ranges fit.
The identity (`m = 0, d = 1, δ = 0`, no `H`) is the default. `int4` always rotates and is meant to be
calibrated (`set_key_basis`, statistics from `kv_calibration.py`; the model runner does it); `fp16`
and `int8` rotate with `hadamard=True` and are never calibrated by the runner (int8 does not need it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from athena_runtime.kernels import fused_ops
from athena_runtime.kernels.fused_ops import scatter_rows_pair_
from athena_runtime.kernels.kv_write import kv_write, kv_write_unsupported
from athena_runtime.kv_quant_params import CLIP_RATIOS, SCALE_MIN, SCALE_ROUND_UP

log = logging.getLogger(__name__)

KV_FORMATS = ("fp16", "fp32", "int8", "int4")
GROUP_SIZES = {"int8": 32, "int4": 64}  # default group size of each quantized format


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
    scale = (amax / qmax * SCALE_ROUND_UP).clamp_min(SCALE_MIN).half()
    q = torch.round(xg / scale.float().unsqueeze(-1)).clamp_(-qmax, qmax)
    return q.flatten(-2).to(torch.int8), scale


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [..., D] integer, scale [..., D // group_size] -> float32 [..., D]."""
    xg = q.float().unflatten(-1, (-1, group_size)) * scale.float().unsqueeze(-1)
    return xg.flatten(-2)


def quantize_asymmetric(
    x: torch.Tensor, bits: int, group_size: int, clip_ratios=CLIP_RATIOS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (n uint8 [..., D] in [0, 2^bits - 1], scale, zero float16 [..., D // group_size]),
    x ≈ zero + n·scale; per group, the clip ratio (range shrink about the midpoint) of least squared error."""
    levels = 2**bits - 1
    xg = x.float().unflatten(-1, (-1, group_size))  # [..., D/G, G]
    lo, hi = xg.amin(-1), xg.amax(-1)  # [..., D/G]
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best = None
    for c in clip_ratios:
        zero = (mid - c * half).half()
        scale = ((mid + c * half - zero.float()) / levels * SCALE_ROUND_UP).clamp_min(SCALE_MIN).half()
        z, s = zero.float().unsqueeze(-1), scale.float().unsqueeze(-1)
        n = torch.round((xg - z) / s).clamp_(0, levels)  # [..., D/G, G]
        err = (n * s + z - xg).square().sum(-1)  # [..., D/G]
        if best is None:
            best = (err, n, scale, zero)
            continue
        better = err < best[0]
        best = (
            torch.where(better, err, best[0]),
            torch.where(better.unsqueeze(-1), n, best[1]),
            torch.where(better, scale, best[2]),
            torch.where(better, zero, best[3]),
        )
    _, n, scale, zero = best
    return n.flatten(-2).to(torch.uint8), scale, zero


def dequantize_asymmetric(n: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """n [..., D] integer, scale and zero [..., D // group_size] -> float32 [..., D]."""
    xg = n.float().unflatten(-1, (-1, group_size)) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return xg.flatten(-2)


def pack_nibbles(n: torch.Tensor) -> torch.Tensor:
    """n uint8 [..., D] in [0, 15] -> uint8 [..., D // 2]: element 2i in the low nibble, 2i + 1 in the high."""
    return n[..., 0::2] | (n[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D // 2] -> uint8 [..., D] in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)


@dataclass(frozen=True)
class KeyBasis:
    """The per-(layer, KV head) vectors of the stored key basis (module docstring), float32 [L, Hkv, D]."""

    offset: torch.Tensor  # m: subtracted from every key
    scale: torch.Tensor  # d > 0: multiplies the key's channels, divides the query's
    sink: torch.Tensor  # δ: also subtracted from the key at position 0


class KVCache:
    """Base class: allocation, the stored basis, slot writes, reads for the reference attention, bytes."""

    fmt: str = ""
    quantized: bool = False
    always_rotated: bool = False  # the format stores k·H, v·H whatever `hadamard` says
    needs_key_basis: bool = False  # the model runner calibrates a KeyBasis for this format

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        device,
        hadamard: bool = False,
        group_size: int | None = None,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        group_size = group_size or default_group_size(self.fmt, head_dim)
        if self.quantized and head_dim % group_size:
            raise ValueError(f"group_size {group_size} must divide head_dim {head_dim}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.group_size = num_kv_heads, head_dim, group_size
        self.device = torch.device(device)
        self.hadamard = hadamard or self.always_rotated
        self.rotation = hadamard_matrix(head_dim, self.device) if self.hadamard else None  # H [D, D]
        # The key basis (float32 [L, Hkv, D] each), None = identity; see set_key_basis.
        self.key_offset = self.key_scale = self.sink_offset = self.sink_key = None
        self.null_block = num_blocks
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads)
        self.k = torch.zeros(*shape, self.stored_dim(head_dim), dtype=self.storage_dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        # [L, num_blocks + 1, block_size, Hkv, D // G] float16, or None when the format has no such field
        self.k_scale = self.v_scale = self.k_zero = self.v_zero = None
        if self.quantized:
            self.k_scale = torch.zeros(*shape, head_dim // group_size, dtype=torch.float16, device=self.device)
            self.v_scale = torch.zeros_like(self.k_scale)
        if self.has_zero:
            self.k_zero, self.v_zero = torch.zeros_like(self.k_scale), torch.zeros_like(self.k_scale)
        self._write_path: str | None = None  # the last write path logged (write logs each change once)

    @staticmethod
    def create(
        fmt: str,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        device,
        hadamard: bool = False,
        group_size: int | None = None,
    ) -> "KVCache":
        """`fmt`: fp16 | fp32 (unquantized, for exact tests) | int8 | int4. group_size None: the format's."""
        if fmt not in KV_FORMATS:
            raise ValueError(f"unknown KV cache format {fmt!r}; supported: {', '.join(KV_FORMATS)}")
        args = (num_layers, num_blocks, block_size, num_kv_heads, head_dim, device, hadamard, group_size)
        if fmt in ("fp16", "fp32"):
            return FP16KVCache(*args, dtype=torch.float16 if fmt == "fp16" else torch.float32)
        return (Int8KVCache if fmt == "int8" else Int4KVCache)(*args)

    # --- format hooks -------------------------------------------------------------------------
    storage_dtype: torch.dtype = torch.float16
    has_zero: bool = False

    @staticmethod
    def stored_dim(head_dim: int) -> int:
        return head_dim

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [T, Hkv, D] -> (data [T, Hkv, D_stored], scale [T, Hkv, D/G] or None, zero or None)."""
        raise NotImplementedError

    def dequantize(self, data: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None) -> torch.Tensor:
        """Inverse of `quantize`, float32 [..., D]."""
        raise NotImplementedError

    # --- the stored basis ---------------------------------------------------------------------
    def set_key_basis(self, basis: KeyBasis) -> None:
        """Store keys as ((k - m - [p = 0]·δ) ⊙ d)·H from now on (write nothing before this)."""
        shape = (self.num_layers, self.num_kv_heads, self.head_dim)
        for name, t in (("offset", basis.offset), ("scale", basis.scale), ("sink", basis.sink)):
            if tuple(t.shape) != shape:
                raise ValueError(f"key basis {name} has shape {tuple(t.shape)}, the cache needs {shape}")
        if not (basis.scale > 0).all():
            raise ValueError("key basis scale must be > 0")
        to = dict(device=self.device, dtype=torch.float32)
        self.key_offset, self.key_scale = basis.offset.to(**to), basis.scale.to(**to)
        self.sink_offset = basis.sink.to(**to)
        self.sink_key = self.rotate(self.sink_offset * self.key_scale)  # s = (δ ⊙ d)·H [L, Hkv, D]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> x·H (identity without rotation). Its own inverse."""
        if self.rotation is None:
            return x
        return (x.float() @ self.rotation).to(x.dtype)

    def query(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [T, H, D] -> q̃ = (q ⊘ d)·H, the query that attention over this cache takes."""
        if self.key_scale is not None:
            d = self.key_scale[layer]  # [Hkv, D]
            q = (q.float().unflatten(1, (self.num_kv_heads, -1)) / d[:, None]).flatten(1, 2).to(q.dtype)
        return self.rotate(q)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """õ [T, H, D] from attention over this cache -> o = õ·H."""
        return self.rotate(o)

    def stored_key(self, layer: int, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """k [T, Hkv, D] at positions [T] -> k̃ = ((k - m - [p = 0]·δ) ⊙ d)·H (float32 when calibrated)."""
        if self.key_offset is not None:
            first = (positions == 0).to(torch.float32)[:, None, None]  # [T, 1, 1]
            k = (k.float() - self.key_offset[layer] - first * self.sink_offset[layer]) * self.key_scale[layer]
        return self.rotate(k)

    # --- interface ----------------------------------------------------------------------------
    def write(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
        positions: torch.Tensor,
        use_triton: bool | None = None,
    ) -> None:
        """Store k, v [T, Hkv, D] (post-RoPE) of the tokens at `positions` [T] into slots slot_mapping [T].
        On CUDA: one Triton launch (`write_kernel`), else `write_reference`; the path is logged when it
        changes. `use_triton` forces the choice (True runs on CPU under TRITON_INTERPRET=1, for the tests)."""
        if self._use_write_kernel(k, use_triton):
            self.write_kernel(layer, k, v, slot_mapping, positions)
        else:
            self.write_reference(layer, k, v, slot_mapping, positions)

    def write_kernel(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """The one-launch write of the format (quantized formats: `kernels/kv_write.py`)."""
        kv_write(self, layer, k, v, slot_mapping, positions)

    def write_kernel_unsupported(self) -> str | None:
        """Why `write_kernel` cannot take this cache, or None when it can."""
        return kv_write_unsupported(self)

    def _use_write_kernel(self, k: torch.Tensor, use_triton: bool | None) -> bool:
        if use_triton is not None:
            return use_triton
        reason = "device " + k.device.type if not k.is_cuda else self.write_kernel_unsupported()
        path = "pytorch reference" if reason else "triton kernel"
        if path != self._write_path:
            self._write_path = path
            log.info("KV cache write (%s): %s path%s", self.fmt, path, f" ({reason})" if reason else "")
        return reason is None

    def write_reference(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """The PyTorch write (the spec and the CPU path): stored basis, `quantize`, one `index_copy_` per field."""
        fields = (
            (self.stored_key(layer, k, positions), self.k, self.k_scale, self.k_zero),
            (self.rotate(v), self.v, self.v_scale, self.v_zero),
        )
        for x, data, scale, zero in fields:
            for src, dst in zip(self.quantize(x), (data, scale, zero)):
                if src is not None:
                    dst[layer].view(-1, self.num_kv_heads, dst.shape[-1]).index_copy_(0, slot_mapping, src)

    def read(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k̃, ṽ float32 [len(slots), Hkv, D], dequantized, in the stored basis. Attention passes the
        tokens' `positions` [len(slots)]: the key at position 0 then gets `sink_key` added back."""
        out = []
        for data, scale, zero in ((self.k, self.k_scale, self.k_zero), (self.v, self.v_scale, self.v_zero)):
            fields = [
                None if t is None else t[layer].view(-1, self.num_kv_heads, t.shape[-1])[slots]
                for t in (data, scale, zero)
            ]
            out.append(self.dequantize(*fields))
        k, v = out
        if positions is not None and self.sink_key is not None:
            k = k + (positions == 0).to(torch.float32)[:, None, None] * self.sink_key[layer]
        return k, v

    def fresh_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [T, Hkv, D] (post-RoPE, as `write` takes them) in the basis `read` returns them in, without the
        quantization: ((k - m) ⊙ d)·H and v·H (what `read` gives back for them, sink key included, but exact). A whole
        prompt attends over these instead of reading its own keys back from the cache."""
        if self.key_offset is not None:
            k = (k.float() - self.key_offset[layer]) * self.key_scale[layer]
        return self.rotate(k), self.rotate(v)

    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers, K and V, scales included."""
        fmt = "fp32" if self.storage_dtype == torch.float32 else self.fmt
        return 2 * self.num_layers * self.num_kv_heads * head_bytes(fmt, self.head_dim, self.group_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.num_layers}, blocks={self.num_blocks}, "
            f"block_size={self.block_size}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"hadamard={self.hadamard}, key_basis={self.key_offset is not None})"
        )


class FP16KVCache(KVCache):
    fmt = "fp16"

    def __init__(self, *args, dtype: torch.dtype = torch.float16, **kwargs):
        self.storage_dtype = dtype
        super().__init__(*args, **kwargs)

    def quantize(self, x):
        return x.to(self.storage_dtype), None, None

    def dequantize(self, data, scale, zero):
        return data.float()

    def write_kernel(self, layer, k, v, slot_mapping, positions) -> None:  # K and V rows in one launch
        width = self.num_kv_heads * self.head_dim
        scatter_rows_pair_(
            self.k[layer].view(-1, width),
            self.v[layer].view(-1, width),
            k.reshape(-1, width),
            v.reshape(-1, width),
            slot_mapping,
            use_triton=True,
        )

    def write_kernel_unsupported(self) -> str | None:
        if self.key_offset is not None or self.rotation is not None:
            return "stored basis or rotation: the PyTorch write transforms the keys"
        return None if fused_ops.triton is not None else "no Triton"


class Int8KVCache(KVCache):
    fmt = "int8"
    quantized = True
    storage_dtype = torch.int8

    def quantize(self, x):
        return (*quantize_symmetric(x, 8, self.group_size), None)

    def dequantize(self, data, scale, zero):
        return dequantize_symmetric(data, scale, self.group_size)


class Int4KVCache(KVCache):
    fmt = "int4"
    quantized = True
    has_zero = True
    always_rotated = True
    needs_key_basis = True
    storage_dtype = torch.uint8

    @staticmethod
    def stored_dim(head_dim: int) -> int:
        if head_dim % 2:
            raise ValueError(f"int4 KV cache needs an even head_dim, got {head_dim}")
        return head_dim // 2

    def quantize(self, x):
        n, scale, zero = quantize_asymmetric(x, 4, self.group_size)
        return pack_nibbles(n), scale, zero

    def dequantize(self, data, scale, zero):
        return dequantize_asymmetric(unpack_nibbles(data), scale, zero, self.group_size)


def default_group_size(fmt: str, head_dim: int) -> int:
    """The format's group size (GROUP_SIZES), capped at head_dim; 1 for the unquantized formats."""
    return min(GROUP_SIZES.get(fmt, 1), head_dim)


def head_bytes(fmt: str, head_dim: int, group_size: int | None = None) -> int:
    """Bytes of one token's vector of one KV head in `fmt`, float16 group parameters included."""
    groups = head_dim // (group_size or default_group_size(fmt, head_dim))
    return {
        "fp16": 2 * head_dim,
        "fp32": 4 * head_dim,
        "int8": head_dim + 2 * groups,
        "int4": head_dim // 2 + 4 * groups,
    }[fmt]


def blocks_for_budget(
    budget_bytes: int,
    fmt: str,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    group_size: int | None = None,
) -> int:
    """How many blocks of `fmt` fit in `budget_bytes` (the scratch null block included)."""
    if fmt not in KV_FORMATS:
        raise ValueError(f"unknown KV cache format {fmt!r}; supported: {', '.join(KV_FORMATS)}")
    block_bytes = 2 * num_layers * num_kv_heads * head_bytes(fmt, head_dim, group_size) * block_size
    return max(0, int(budget_bytes // block_bytes) - 1)
