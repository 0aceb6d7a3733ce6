"""Bit-packed integer matrices, exactly as FORMAT.md "Bit-packed integers" specifies.

An integer matrix ``Q[R, C]`` with values in ``[0, 2^b)`` is stored as ``uint8[R, ceil(C*b/8)]``:
each row is one little-endian bit stream, value ``Q[r, c]`` occupies bits ``c*b .. c*b+b-1``
(least-significant bit first), values may straddle bytes, unused high bits of the last byte are 0.

Vectorized. Fast path: `g = 8 / gcd(b, 8)` consecutive values fill exactly `g*b/8` whole bytes, so
they are combined into one int64 word with shifts and split into bytes (no per-bit expansion) — used
whenever g*b <= 64, i.e. every b except odd b >= 9. Those fall back to expanding each row chunk to its
bit matrix. The Python loops run over the g values of a word, or over row chunks, never elements.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MAX_BITS = 16
_CHUNK_BITS = 1 << 25  # bits expanded at once (32 MiB of uint8 scratch per chunk)


def packed_width(C: int, bits: int) -> int:
    """Bytes per packed row: ceil(C * bits / 8)."""
    return (C * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{_MAX_BITS}, got {bits!r}")


def _word_group(bits: int) -> tuple[int, int]:
    """(values per word group, bytes per word group) — the smallest run of values ending on a byte."""
    g = 8 // math.gcd(bits, 8)
    return g, g * bits // 8


def _pack_words(values: Tensor, bits: int, nbytes: int) -> Tensor:
    R, C = values.shape
    g, gb = _word_group(bits)
    groups = -(-C // g)
    v = torch.nn.functional.pad(values.to(torch.int64), (0, groups * g - C)).view(R, groups, g)
    word = torch.zeros(R, groups, dtype=torch.int64, device=values.device)  # [R, C/g]
    for j in range(g):
        word |= v[..., j] << (j * bits)
    out = torch.empty(R, groups, gb, dtype=torch.uint8, device=values.device)
    for j in range(gb):
        out[..., j] = ((word >> (8 * j)) & 0xFF).to(torch.uint8)
    return out.view(R, groups * gb)[:, :nbytes].contiguous()


def _unpack_words(packed: Tensor, bits: int, C: int) -> Tensor:
    R, nbytes = packed.shape
    g, gb = _word_group(bits)
    groups = -(-C // g)
    p = torch.nn.functional.pad(packed, (0, groups * gb - nbytes)).view(R, groups, gb).to(torch.int64)
    word = torch.zeros(R, groups, dtype=torch.int64, device=packed.device)  # [R, C/g]
    for j in range(gb):
        word |= p[..., j] << (8 * j)
    used = C * bits
    if used < nbytes * 8 and bool((packed[:, -1].to(torch.int32) >> (used - (nbytes - 1) * 8)).any()):
        raise ValueError("unpack_bits: padding bits of the last byte are not zero (corrupt or foreign data)")
    out = torch.empty(R, groups, g, dtype=torch.int64, device=packed.device)
    mask = (1 << bits) - 1
    for j in range(g):
        out[..., j] = (word >> (j * bits)) & mask
    return out.view(R, groups * g)[:, :C]


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """int [R, C] in [0, 2^bits) -> uint8 [R, ceil(C*bits/8)]."""
    _check_bits(bits)
    if values.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D integer tensor [R, C], got shape {tuple(values.shape)}")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"pack_bits expects an integer tensor, got {values.dtype}")
    R, C = values.shape
    nbytes = packed_width(C, bits)
    out = torch.zeros(R, nbytes, dtype=torch.uint8, device=values.device)
    if R == 0 or C == 0:
        return out
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= (1 << bits):
        raise ValueError(f"pack_bits: values must lie in [0, {1 << bits}) for bits={bits}, got range [{lo}, {hi}]")
    if _word_group(bits)[0] * bits <= 64:
        return _pack_words(values, bits, nbytes)
    shifts = torch.arange(bits, device=values.device, dtype=torch.int32)  # [b]
    byte_weights = (1 << torch.arange(8, device=values.device, dtype=torch.int32)).to(torch.int32)  # [8]
    pad = nbytes * 8 - C * bits
    step = max(1, _CHUNK_BITS // (C * bits))
    for r0 in range(0, R, step):
        v = values[r0 : r0 + step].to(torch.int32)  # [r, C]
        r = v.shape[0]
        stream = ((v.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(r, C * bits)  # [r, C*b]
        if pad:
            stream = torch.nn.functional.pad(stream, (0, pad))
        stream = stream.reshape(r, nbytes, 8).to(torch.int32)  # [r, nbytes, 8]
        out[r0 : r0 + r] = (stream * byte_weights).sum(-1).to(torch.uint8)
    return out


def unpack_bits(packed: Tensor, bits: int, C: int) -> Tensor:
    """uint8 [R, ceil(C*bits/8)] -> int64 [R, C]; inverse of pack_bits."""
    _check_bits(bits)
    if not isinstance(C, int) or C < 0:
        raise ValueError(f"unpack_bits: C must be a non-negative integer, got {C!r}")
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits expects a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    R, nbytes = packed.shape
    if nbytes != packed_width(C, bits):
        raise ValueError(
            f"unpack_bits: {C} values of {bits} bits need {packed_width(C, bits)} bytes per row, got {nbytes}"
        )
    out = torch.empty(R, C, dtype=torch.int64, device=packed.device)
    if R == 0 or C == 0:
        return out
    if _word_group(bits)[0] * bits <= 64:
        return _unpack_words(packed, bits, C)
    bit_idx = torch.arange(8, device=packed.device, dtype=torch.int32)  # [8]
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int64)  # [b]
    used = C * bits
    step = max(1, _CHUNK_BITS // (nbytes * 8))
    for r0 in range(0, R, step):
        p = packed[r0 : r0 + step].to(torch.int32)  # [r, nbytes]
        r = p.shape[0]
        stream = ((p.unsqueeze(-1) >> bit_idx) & 1).reshape(r, nbytes * 8)  # [r, nbytes*8]
        if used < nbytes * 8 and bool(stream[:, used:].any()):
            raise ValueError("unpack_bits: padding bits of the last byte are not zero (corrupt or foreign data)")
        out[r0 : r0 + r] = (stream[:, :used].reshape(r, C, bits).to(torch.int64) * weights).sum(-1)
    return out
