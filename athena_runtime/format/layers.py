"""Quantized linear-layer containers, with tensors named and shaped exactly as FORMAT.md says.

``AthenaLayer`` (product quantization) and ``ScalarLayer`` (RTN / GPTQ baselines) hold unpacked
tensors; ``to_tensors`` packs them for ``model.safetensors`` and ``from_tensors`` validates and
unpacks them again. ``dequantize`` is the PyTorch reference every kernel is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from athena_runtime.format.bits import pack_bits, packed_width, unpack_bits

# ---------------------------------------------------------------------------------------------
# uint8 codebooks (the quantizer's step 2, docs/ARCHITECTURE.md §3): per codebook and dimension, codes in 0..255
# with fp16 min/scale


def quantize_codebook_uint8(C: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """C (fp32) -> (codes uint8 like C, scale fp16, min fp16), min/scale taken over ``dim`` (the n centroids).

    min is rounded down and scale up to fp16, so every code lands in 0..255 and
    ``|C - (codes * scale + min)| <= scale / 2`` holds with the stored fp16 values.
    """
    lo = C.amin(dim)
    hi = C.amax(dim)
    neg_inf = torch.full_like(lo, float("-inf"), dtype=torch.float16)
    pos_inf = torch.full_like(lo, float("inf"), dtype=torch.float16)
    lo16 = lo.to(torch.float16)
    lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, neg_inf), lo16)
    lo32 = lo16.float()
    scale16 = ((hi - lo32) / 255.0).to(torch.float16)
    scale16 = torch.where(scale16.float() * 255.0 + lo32 < hi, torch.nextafter(scale16, pos_inf), scale16)
    s32 = scale16.float().unsqueeze(dim)
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    codes = ((C - lo32.unsqueeze(dim)) / safe).round_().clamp_(0, 255).to(torch.uint8)
    return codes, scale16, lo16


def dequantize_codebook_uint8(codes: Tensor, scale: Tensor, minimum: Tensor, dim: int) -> Tensor:
    """codes uint8, fp16 scale/min (``dim`` removed) -> fp32 codes * scale + min."""
    return codes.float() * scale.float().unsqueeze(dim) + minimum.float().unsqueeze(dim)


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check(name: str, t: Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t is None:
        raise ValueError(f"tensor {name} is missing")
    if not isinstance(t, Tensor):
        raise ValueError(f"tensor {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"tensor {name} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")


def _check_int(name: str, t: Tensor, shape: tuple[int, ...], hi: int) -> None:
    if not isinstance(t, Tensor) or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
        raise ValueError(f"{name} has values outside [0, {hi})")


def _meta_int(meta: dict, key: str, prefix: str) -> int:
    if key not in meta:
        raise ValueError(f"layer {prefix}: athena.json entry lacks {key!r}")
    v = meta[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"layer {prefix}: athena.json {key!r} must be an integer, got {v!r}")
    return v


def _meta_shape(meta: dict, prefix: str) -> tuple[int, int]:
    s = meta.get("shape")
    if not isinstance(s, (list, tuple)) or len(s) != 2 or not all(isinstance(v, int) and v > 0 for v in s):
        raise ValueError(f"layer {prefix}: athena.json 'shape' must be [N, M] of positive integers, got {s!r}")
    return int(s[0]), int(s[1])


def _bias_from(prefix: str, tensors: dict, N: int) -> Tensor | None:
    name = f"{prefix}.bias"
    if name not in tensors:
        return None
    _check(name, tensors[name], torch.float16, (N,))
    return tensors[name]


def _tensor_bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredAthena:
    """One athena.json "athena" entry and its tensors, validated against FORMAT.md; indices still packed.

    The runtime builds its kernel layout from this (`PQLinear.from_tensors`), the quantizer an `AthenaLayer`."""

    shape: tuple[int, int]  # (N, M)
    d: int
    n: int
    k: int
    codebook_bits: int
    rank: int
    indices: Tensor  # uint8 [N, ceil(G * b / 8)], FORMAT.md bit stream
    codebook: Tensor  # uint8 or fp16 [Nb, G, n, d]
    codebook_scale: Tensor | None  # fp16 [Nb, G, d] (codebook_bits 8)
    codebook_min: Tensor | None  # fp16 [Nb, G, d] (codebook_bits 8)
    lowrank_a: Tensor | None  # fp16 [N, r]
    lowrank_b: Tensor | None  # fp16 [r, M]
    bias: Tensor | None  # fp16 [N]
    row_scale: Tensor | None  # fp16 [N] (FORMAT.md version 2, "row_scale": true)

    @property
    def G(self) -> int:
        return -(-self.shape[1] // self.d)

    @property
    def index_bits(self) -> int:
        return self.n.bit_length() - 1


def read_athena_tensors(prefix: str, tensors: dict, meta: dict) -> StoredAthena:
    """Validate the athena.json entry `meta` of layer `prefix` and its tensors (presence, dtypes, shapes);
    ValueError naming the field or tensor that does not fit."""
    if not isinstance(meta, dict):
        raise ValueError(f"layer {prefix}: athena.json entry must be an object, got {type(meta).__name__}")
    if meta.get("method") != "athena":
        raise ValueError(f"layer {prefix}: athena.json method is {meta.get('method')!r}, expected 'athena'")
    N, M = _meta_shape(meta, prefix)
    d, n, k = (_meta_int(meta, key, prefix) for key in ("d", "n", "k"))
    cb_bits = _meta_int(meta, "codebook_bits", prefix)
    rank = _meta_int(meta, "rank", prefix)
    if d < 1 or k < 1 or n < 2 or n & (n - 1) or n > (1 << 16) or cb_bits not in (8, 16) or rank < 0:
        raise ValueError(
            f"layer {prefix}: invalid recipe in athena.json: d={d} n={n} k={k} codebook_bits={cb_bits} rank={rank}"
        )
    if rank > min(N, M):
        raise ValueError(f"layer {prefix}: rank {rank} exceeds min(N, M) = {min(N, M)}")
    G, Nb, b = -(-M // d), -(-N // k), n.bit_length() - 1
    name = f"{prefix}.indices"
    _check(name, tensors.get(name), torch.uint8, (N, packed_width(G, b)))
    cb_dtype = torch.uint8 if cb_bits == 8 else torch.float16
    _check(f"{prefix}.codebook", tensors.get(f"{prefix}.codebook"), cb_dtype, (Nb, G, n, d))
    scale = minimum = None
    if cb_bits == 8:
        scale, minimum = tensors.get(f"{prefix}.codebook_scale"), tensors.get(f"{prefix}.codebook_min")
        _check(f"{prefix}.codebook_scale", scale, torch.float16, (Nb, G, d))
        _check(f"{prefix}.codebook_min", minimum, torch.float16, (Nb, G, d))
    else:
        for extra in ("codebook_scale", "codebook_min"):
            if f"{prefix}.{extra}" in tensors:
                raise ValueError(f"tensor {prefix}.{extra} present but codebook_bits is 16")
    A = B = None
    if rank > 0:
        A, B = tensors.get(f"{prefix}.lowrank_a"), tensors.get(f"{prefix}.lowrank_b")
        _check(f"{prefix}.lowrank_a", A, torch.float16, (N, rank))
        _check(f"{prefix}.lowrank_b", B, torch.float16, (rank, M))
    else:
        for extra in ("lowrank_a", "lowrank_b"):
            if f"{prefix}.{extra}" in tensors:
                raise ValueError(f"tensor {prefix}.{extra} present but athena.json says rank 0")
    row_scale = None
    has_scale = meta.get("row_scale", False)
    if not isinstance(has_scale, bool):
        raise ValueError(f"layer {prefix}: athena.json 'row_scale' must be true or false, got {has_scale!r}")
    if has_scale:
        row_scale = tensors.get(f"{prefix}.row_scale")
        _check(f"{prefix}.row_scale", row_scale, torch.float16, (N,))
    elif f"{prefix}.row_scale" in tensors:
        raise ValueError(f"tensor {prefix}.row_scale present but athena.json does not say row_scale")
    return StoredAthena(
        shape=(N, M),
        d=d,
        n=n,
        k=k,
        codebook_bits=cb_bits,
        rank=rank,
        indices=tensors[name],
        codebook=tensors[f"{prefix}.codebook"],
        codebook_scale=scale,
        codebook_min=minimum,
        lowrank_a=A,
        lowrank_b=B,
        bias=_bias_from(prefix, tensors, N),
        row_scale=row_scale,
    )


@dataclass
class AthenaLayer:
    """Product-quantized weight W_eff = diag(s) (Ŵ + A B), Ŵ[i, d j + l] = C[i // k, j, I[i, j], l]
    (s = row_scale, all ones when absent: FORMAT.md version 1 layers)."""

    method: ClassVar[str] = "athena"

    shape: tuple[int, int]  # (N, M)
    d: int
    n: int
    k: int
    codebook_bits: int
    indices: Tensor  # int [N, G], G = ceil(M / d)
    codebook: Tensor  # uint8 or fp16 [Nb, G, n, d], Nb = ceil(N / k)
    codebook_scale: Tensor | None = None  # fp16 [Nb, G, d] (codebook_bits 8)
    codebook_min: Tensor | None = None  # fp16 [Nb, G, d] (codebook_bits 8)
    lowrank_a: Tensor | None = None  # fp16 [N, r]
    lowrank_b: Tensor | None = None  # fp16 [r, M]
    bias: Tensor | None = None  # [N]
    row_scale: Tensor | None = None  # fp16 [N] (format version 2)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self._validate("AthenaLayer")

    # sizes -------------------------------------------------------------------------------------
    @property
    def G(self) -> int:
        return -(-self.shape[1] // self.d)

    @property
    def Nb(self) -> int:
        return -(-self.shape[0] // self.k)

    @property
    def index_bits(self) -> int:
        return self.n.bit_length() - 1

    @property
    def rank(self) -> int:
        return 0 if self.lowrank_a is None else int(self.lowrank_a.shape[1])

    def _validate(self, where: str) -> None:
        N, M = self.shape
        for name in ("d", "n", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        if self.n < 2 or self.n & (self.n - 1):
            raise ValueError(f"{where}: n must be a power of two >= 2, got {self.n}")
        if self.codebook_bits not in (8, 16):
            raise ValueError(f"{where}: codebook_bits must be 8 or 16, got {self.codebook_bits}")
        _check_int(f"{where}.indices", self.indices, (N, self.G), self.n)
        cb_shape = (self.Nb, self.G, self.n, self.d)
        if self.codebook_bits == 8:
            _check(f"{where}.codebook", self.codebook, torch.uint8, cb_shape)
            _check(f"{where}.codebook_scale", self.codebook_scale, torch.float16, (self.Nb, self.G, self.d))
            _check(f"{where}.codebook_min", self.codebook_min, torch.float16, (self.Nb, self.G, self.d))
        else:
            _check(f"{where}.codebook", self.codebook, torch.float16, cb_shape)
            if self.codebook_scale is not None or self.codebook_min is not None:
                raise ValueError(f"{where}: codebook_scale/codebook_min only exist when codebook_bits == 8")
        if (self.lowrank_a is None) != (self.lowrank_b is None):
            raise ValueError(f"{where}: lowrank_a and lowrank_b must be both present or both absent")
        if self.lowrank_a is not None:
            r = self.lowrank_a.shape[1] if self.lowrank_a.dim() == 2 else -1
            _check(f"{where}.lowrank_a", self.lowrank_a, torch.float16, (N, r))
            _check(f"{where}.lowrank_b", self.lowrank_b, torch.float16, (r, M))
            if r < 1:
                raise ValueError(f"{where}: low-rank factors need rank >= 1")
        if self.bias is not None and tuple(self.bias.shape) != (N,):
            raise ValueError(f"{where}.bias has shape {list(self.bias.shape)}, expected [{N}]")
        if self.row_scale is not None:
            _check(f"{where}.row_scale", self.row_scale, torch.float16, (N,))

    # math --------------------------------------------------------------------------------------
    def codebook_f32(self) -> Tensor:
        """Dequantized codebook C [Nb, G, n, d] in fp32."""
        if self.codebook_bits == 8:
            return dequantize_codebook_uint8(self.codebook, self.codebook_scale, self.codebook_min, dim=-2)
        return self.codebook.float()

    def dequantize(self, include_lowrank: bool = True) -> Tensor:
        """W_eff fp32 [N, M] (FORMAT.md "Dequantization"); Ŵ alone when include_lowrank is False."""
        N, M = self.shape
        C = self.codebook_f32()  # [Nb, G, n, d]
        dev = C.device
        block = (torch.arange(N, device=dev) // self.k).unsqueeze(1)  # [N, 1]
        group = torch.arange(self.G, device=dev).unsqueeze(0)  # [1, G]
        W = C[block, group, self.indices.to(device=dev, dtype=torch.int64)]  # [N, G, d]
        W = W.reshape(N, self.G * self.d)[:, :M]
        if include_lowrank and self.lowrank_a is not None:
            W = W + self.lowrank_a.float() @ self.lowrank_b.float()
        if self.row_scale is not None:
            W = W * self.row_scale.to(dev).float().unsqueeze(1)
        return W.contiguous()

    # storage -----------------------------------------------------------------------------------
    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}.indices": pack_bits(self.indices, self.index_bits), f"{prefix}.codebook": self.codebook}
        if self.codebook_bits == 8:
            out[f"{prefix}.codebook_scale"] = self.codebook_scale
            out[f"{prefix}.codebook_min"] = self.codebook_min
        if self.lowrank_a is not None:
            out[f"{prefix}.lowrank_a"] = self.lowrank_a
            out[f"{prefix}.lowrank_b"] = self.lowrank_b
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias.to(torch.float16)
        if self.row_scale is not None:
            out[f"{prefix}.row_scale"] = self.row_scale
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict, meta: dict, unpack: bool = True) -> "AthenaLayer | None":
        """The layer of an athena.json entry. With unpack=False only the dtypes and shapes are checked
        (cheap: every b-bit pattern is a valid index) and None is returned."""
        s = read_athena_tensors(prefix, tensors, meta)
        if not unpack:
            return None
        try:
            indices = unpack_bits(s.indices, s.index_bits, s.G)
        except ValueError as e:
            raise ValueError(f"tensor {prefix}.indices: {e}") from None
        N, M = s.shape
        return cls(
            shape=(N, M),
            d=s.d,
            n=s.n,
            k=s.k,
            codebook_bits=s.codebook_bits,
            indices=indices,
            codebook=s.codebook,
            codebook_scale=s.codebook_scale,
            codebook_min=s.codebook_min,
            lowrank_a=s.lowrank_a,
            lowrank_b=s.lowrank_b,
            bias=s.bias,
            row_scale=s.row_scale,
        )

    def meta(self) -> dict:
        meta = {
            "method": "athena",
            "shape": list(self.shape),
            "d": self.d,
            "n": self.n,
            "k": self.k,
            "codebook_bits": self.codebook_bits,
            "rank": self.rank,
        }
        if self.row_scale is not None:
            meta["row_scale"] = True
        return meta

    def stored_bytes(self) -> int:
        """Bytes of to_tensors() without the bias (indices counted packed)."""
        N, _ = self.shape
        return (
            N * packed_width(self.G, self.index_bits)
            + _tensor_bytes(self.codebook)
            + _tensor_bytes(self.codebook_scale)
            + _tensor_bytes(self.codebook_min)
            + _tensor_bytes(self.lowrank_a)
            + _tensor_bytes(self.lowrank_b)
            + _tensor_bytes(self.row_scale)
        )


@dataclass
class ScalarLayer:
    """Scalar baseline (RTN / GPTQ): W[i, c] = (q[i, c] - zeros[i, c // g]) * scales[i, c // g]."""

    shape: tuple[int, int]  # (N, M)
    bits: int
    group_size: int
    method: str  # "rtn" | "gptq"
    q: Tensor  # int [N, M]
    scales: Tensor  # fp16 [N, ceil(M / g)]
    zeros: Tensor  # fp16 [N, ceil(M / g)], in steps
    bias: Tensor | None = None  # [N]

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self._validate("ScalarLayer")

    @property
    def groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    def _validate(self, where: str) -> None:
        N, M = self.shape
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"{where}: method must be 'rtn' or 'gptq', got {self.method!r}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"{where}: bits must be in 1..8, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"{where}: group_size must be >= 1, got {self.group_size}")
        _check_int(f"{where}.q", self.q, (N, M), 1 << self.bits)
        _check(f"{where}.scales", self.scales, torch.float16, (N, self.groups))
        _check(f"{where}.zeros", self.zeros, torch.float16, (N, self.groups))
        if self.bias is not None and tuple(self.bias.shape) != (N,):
            raise ValueError(f"{where}.bias has shape {list(self.bias.shape)}, expected [{N}]")

    def dequantize(self, include_lowrank: bool = True) -> Tensor:
        """W fp32 [N, M] (include_lowrank is accepted for symmetry with AthenaLayer; there is none)."""
        g = self.group_size
        scales = self.scales.float().repeat_interleave(g, dim=1)[:, : self.shape[1]]  # [N, M]
        zeros = self.zeros.float().repeat_interleave(g, dim=1)[:, : self.shape[1]]
        return (self.q.float() - zeros) * scales

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {
            f"{prefix}.qweight": pack_bits(self.q, self.bits),
            f"{prefix}.scales": self.scales,
            f"{prefix}.zeros": self.zeros,
        }
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias.to(torch.float16)
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict, meta: dict, unpack: bool = True) -> "ScalarLayer | None":
        method = meta.get("method")
        if method not in ("rtn", "gptq"):
            raise ValueError(f"layer {prefix}: athena.json method is {method!r}, expected 'rtn' or 'gptq'")
        N, M = _meta_shape(meta, prefix)
        bits, g = _meta_int(meta, "bits", prefix), _meta_int(meta, "group_size", prefix)
        if not 1 <= bits <= 8 or g < 1:
            raise ValueError(f"layer {prefix}: invalid bits={bits} / group_size={g} in athena.json")
        name = f"{prefix}.qweight"
        _check(name, tensors.get(name), torch.uint8, (N, packed_width(M, bits)))
        groups = -(-M // g)
        _check(f"{prefix}.scales", tensors.get(f"{prefix}.scales"), torch.float16, (N, groups))
        _check(f"{prefix}.zeros", tensors.get(f"{prefix}.zeros"), torch.float16, (N, groups))
        if not unpack:
            return None
        try:
            q = unpack_bits(tensors[name], bits, M)
        except ValueError as e:
            raise ValueError(f"tensor {name}: {e}") from None
        return cls(
            shape=(N, M),
            bits=bits,
            group_size=g,
            method=method,
            q=q,
            scales=tensors[f"{prefix}.scales"],
            zeros=tensors[f"{prefix}.zeros"],
            bias=_bias_from(prefix, tensors, N),
        )

    def meta(self) -> dict:
        return {"method": self.method, "shape": list(self.shape), "bits": self.bits, "group_size": self.group_size}

    def stored_bytes(self) -> int:
        N, M = self.shape
        return N * packed_width(M, self.bits) + _tensor_bytes(self.scales) + _tensor_bytes(self.zeros)


def layer_from_tensors(prefix: str, tensors: dict, meta: dict, unpack: bool = True) -> AthenaLayer | ScalarLayer | None:
    """Build the layer an athena.json entry describes from the tensors of model.safetensors
    (unpack=False: only check the tensors' presence, dtypes and shapes; returns None)."""
    if not isinstance(meta, dict):
        raise ValueError(f"layer {prefix}: athena.json entry must be an object, got {type(meta).__name__}")
    method = meta.get("method")
    if method == "athena":
        return AthenaLayer.from_tensors(prefix, tensors, meta, unpack)
    if method in ("rtn", "gptq"):
        return ScalarLayer.from_tensors(prefix, tensors, meta, unpack)
    raise ValueError(f"layer {prefix}: unknown method {method!r} in athena.json (expected athena, rtn or gptq)")
