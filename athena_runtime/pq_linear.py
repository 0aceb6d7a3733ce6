"""PQLinear: an Athena product-quantized linear layer (FORMAT.md) for inference.

    y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias,   Ŵ[i, d·j + l] = C[i // k, j, I[i, j], l]

The indices stay bit-packed on the device, repacked at load time into the kernel layout
(`kernels/layout.py`); codebooks are dequantized to fp16 once. `select_path` — the one place that
decides — picks per call, from shapes alone (no host sync, CUDA-graph safe):
    reference       dequantize + matmul in PyTorch: the spec; CPU
    cuda-decode     CUDA lookup-table kernel (shared-memory table), 1 token, fp16, when it builds
    cuda-frag       CUDA tensor-core kernel fed straight from the codebooks (one shared-memory lookup
                    per two weights is an mma operand register), 2-64 tokens, fp16, d = 2, b = 6
    cuda-mma        CUDA tensor-core kernel (Ŵ tiles decoded in shared memory), 5-64 tokens, fp16,
                    default recipe (b = 6, d = 2), when cuda-frag does not serve the layer
    triton-decode   Triton lookup-table kernel, <= 4 tokens, when cuda-decode is unavailable
    cuda-dequant    CUDA dequantize of the whole Ŵᵀ (shared-memory codebooks), then one cuBLAS call
                    (more tokens), fp16, b in 4/6/8 and d <= 4, when it builds; the low-rank term folded
                    into Ŵᵀ by the dequantize (`pq_cuda_fold`, tensor cores) where that kernel serves the
                    rank, else as extra inner-dimension rows ("rows", M < N) or a second product ("addmm")
    dequant-matmul  the same with the Triton dequantize and the low-rank term folded into Ŵᵀ, when
                    cuda-dequant is unavailable
    triton-prefill  Triton dequantize-in-registers + tl.dot: only when forced (measured far slower
                    than dequant-matmul on the H100, see bench/results/kernels.md)
Force one with the constructor's `path=` or the ATHENA_PQ_PATH environment variable (tests,
benchmarks); Triton paths run on CPU tensors only under TRITON_INTERPRET=1. Every (path, layer
shape) is logged once at INFO, and a fallback (a CUDA kernel unavailable) once at WARNING.
The thresholds below come from bench/kernels.py on an H100 (bench/results/kernels.md).
"""
from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn

from athena_runtime.kernels import layout
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.pq_gemv import interpreting, pq_gemv, pq_gemv_reference

log = logging.getLogger(__name__)

PATHS = ("reference", "cuda-decode", "cuda-frag", "cuda-mma", "triton-decode", "triton-prefill", "cuda-dequant",
         "dequant-matmul")
PATH_ENV = "ATHENA_PQ_PATH"
CUDA_LUT_MAX_TOKENS = 1  # CUDA lookup-table kernel up to this many tokens (its work grows with the tokens;
# at 2 tokens cuda-frag was faster on 3 of the 4 7B shapes, 7% over all four, BENCHMARKS.md §3)
CUDA_LUT_NO_FRAG_MAX_TOKENS = 4  # ... up to 4 where cuda-frag does not serve the layer (beats cuda-mma there)
CUDA_LUT_FALLBACK_MAX_TOKENS = 8  # ... and up to 8 where no tensor-core kernel serves it (still beats dequantize)
TRITON_LUT_MAX_TOKENS = 4  # Triton lookup-table kernel (fallback when the CUDA one is unavailable)
MMA_MAX_TOKENS = 64  # CUDA tensor-core kernels (cuda-frag, else cuda-mma) above the lookup table
LUT_MAX_N = 256  # lookup tables for codebooks of at most this many centroids (n entries per group)
LOWRANK_ALIGN = 16  # low-rank factors padded with zeros to a multiple of this rank (cuBLAS tensor cores)


def select_path(tokens: int, device: torch.device, geo: PQGeometry, dtype: torch.dtype, forced: str | None = None,
                cuda_decode_ok=None, cuda_mma_ok=None, cuda_frag_ok=None, cuda_dequant_ok=None) -> str:
    """The path for a call of `tokens` rows. `cuda_decode_ok(geo, tokens, dtype) -> bool` says whether
    the CUDA lookup-table kernel serves it (default: ask `kernels.pq_cuda`, which builds it on first
    use); `cuda_frag_ok` / `cuda_mma_ok` the same for the tensor-core kernels (`kernels.pq_cuda_frag`,
    `kernels.pq_cuda_mma`), `cuda_dequant_ok` for the CUDA dequantize (`kernels.pq_cuda_dequant`)."""
    if forced is not None:
        if forced not in PATHS:
            raise ValueError(f"unknown PQLinear path {forced!r}; choose one of {PATHS}")
        if forced != "reference" and device.type != "cuda" and not (not forced.startswith("cuda") and interpreting()):
            raise ValueError(f"path {forced!r} needs a CUDA device (Triton paths also run under TRITON_INTERPRET=1)")
        return forced
    if device.type != "cuda":
        return "reference"
    if cuda_decode_ok is None:
        from athena_runtime.kernels import pq_cuda
        cuda_decode_ok = pq_cuda.usable
    if cuda_mma_ok is None:
        from athena_runtime.kernels import pq_cuda_mma
        cuda_mma_ok = pq_cuda_mma.usable
    if cuda_frag_ok is None:
        from athena_runtime.kernels import pq_cuda_frag
        cuda_frag_ok = pq_cuda_frag.usable
    lut = geo.n <= LUT_MAX_N
    cuda_lut = tokens <= CUDA_LUT_FALLBACK_MAX_TOKENS and lut and cuda_decode_ok(geo, tokens, dtype)
    if tokens <= CUDA_LUT_MAX_TOKENS and cuda_lut:
        return "cuda-decode"
    if tokens <= MMA_MAX_TOKENS and cuda_frag_ok(geo, tokens, dtype):
        return "cuda-frag"
    if tokens <= CUDA_LUT_NO_FRAG_MAX_TOKENS and cuda_lut:
        return "cuda-decode"  # without cuda-frag the lookup table beats cuda-mma up to 4 tokens
    if tokens <= TRITON_LUT_MAX_TOKENS and lut and not cuda_lut:
        return "triton-decode"
    if tokens <= MMA_MAX_TOKENS and cuda_mma_ok(geo, tokens, dtype):
        return "cuda-mma"
    if cuda_lut:
        return "cuda-decode"  # recipes the tensor-core kernels do not serve
    # many tokens: dequantize + cuBLAS; the fused Triton prefill kernel measured slower (kernels.md)
    if cuda_dequant_ok is None:
        from athena_runtime.kernels import pq_cuda_dequant
        cuda_dequant_ok = lambda g, t, dt: pq_cuda_dequant.usable(g, dt)  # noqa: E731
    return "cuda-dequant" if cuda_dequant_ok(geo, tokens, dtype) else "dequant-matmul"


class PQLinear(nn.Module):
    """Inference-only Athena linear layer. Build it with `from_tensors`."""

    _logged: set = set()  # (path, N, M) already logged: "once per layer shape" across all instances

    def __init__(self, geo: PQGeometry, qweight: torch.Tensor, codebook: torch.Tensor,
                 lowrank_a: torch.Tensor | None = None, lowrank_b: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, codebook_bits: int = 8, path: str | None = None):
        super().__init__()
        self.geo = geo
        self.codebook_bits = codebook_bits
        self.in_features, self.out_features = geo.M, geo.N
        self.path = path
        if path is not None and path not in PATHS:
            raise ValueError(f"unknown PQLinear path {path!r}; choose one of {PATHS}")
        self.register_buffer("qweight", qweight, persistent=False)  # int32 [GW, N_pad]
        self.register_buffer("codebook", codebook, persistent=False)  # [Nb, G_pad, d, n]
        self.register_buffer("lowrank_a", lowrank_a, persistent=False)  # [N, r] or None
        self.register_buffer("lowrank_b", lowrank_b, persistent=False)  # [r, M] or None
        self.register_buffer("bias", bias, persistent=False)  # [N] or None
        self._cpu_weight: torch.Tensor | None = None  # W_eff [N, M] fp32, cached for the CPU reference
        self._paths: dict = {}  # (token class, forced path, device) -> path: `select_path` once per class

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict, meta: dict, device, dtype=torch.float16,
                     path: str | None = None) -> "PQLinear":
        """Build from the checkpoint tensors `prefix.indices`, `prefix.codebook`, ... (FORMAT.md) and the
        layer's athena.json entry `meta` = {"method": "athena", "shape": [N, M], "d", "n", "k",
        "codebook_bits", "rank"}. Raises ValueError naming the tensor or field that does not fit."""
        geo, codebook_bits, rank = _check_meta(prefix, meta)
        device = torch.device(device)

        def get(field, dt, shape, required=True):
            key = f"{prefix}.{field}"
            if key not in tensors:
                if required:
                    raise ValueError(f"{key}: missing (layer {prefix} is athena {list(shape)})")
                return None
            t = tensors[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{key}: not a tensor")
            if t.dtype != dt or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{key}: expected {dt} {list(shape)}, got {t.dtype} {list(t.shape)}")
            return t

        packed = get("indices", torch.uint8, (geo.N, geo.packed_bytes_per_row))
        cb_shape = (geo.Nb, geo.G, geo.n, geo.d)
        if codebook_bits == 8:
            cb = get("codebook", torch.uint8, cb_shape)
            scale = get("codebook_scale", torch.float16, (geo.Nb, geo.G, geo.d))
            cmin = get("codebook_min", torch.float16, (geo.Nb, geo.G, geo.d))
        else:
            cb = get("codebook", torch.float16, cb_shape)
            scale = cmin = None
            for field in ("codebook_scale", "codebook_min"):
                if f"{prefix}.{field}" in tensors:
                    raise ValueError(f"{prefix}.{field}: unexpected with codebook_bits 16")
        if rank > 0:
            A = get("lowrank_a", torch.float16, (geo.N, rank))
            B = get("lowrank_b", torch.float16, (rank, geo.M))
        else:
            A = B = None
            for field in ("lowrank_a", "lowrank_b"):
                if f"{prefix}.{field}" in tensors:
                    raise ValueError(f"{prefix}.{field}: present but the layer's rank is 0")
        bias = get("bias", torch.float16, (geo.N,), required=False)

        indices = layout.unpack_bits(packed.to(device), geo.G, geo.bits)  # [N, G]
        qweight = layout.pack_words(indices, geo)
        del indices
        C = layout.dequantize_codebook(cb.to(device), scale.to(device) if scale is not None else None,
                                       cmin.to(device) if cmin is not None else None, dtype=dtype)
        codebook = layout.pad_codebook(C, geo)
        opt = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
        A, B = pad_lowrank(opt(A), opt(B))
        return cls(geo, qweight, codebook, A, B, opt(bias), codebook_bits, path)

    @classmethod
    def concat(cls, parts: list["PQLinear"], max_pad: float = 0.125) -> tuple["PQLinear", list[int]] | None:
        """One PQLinear computing all `parts` (same input, same recipe) in one call, or None with the
        reason logged when they do not fit. Returns (layer, row offsets of each part in its output).

        Codebook blocks start every k rows, so each part but the last is padded with index-0 rows up to
        a multiple of k (refused when the padding exceeds `max_pad` of the real rows: the kernels read
        padding rows too). Low-rank factors become block-diagonal A = diag(A_p), B = [B_p] stacked."""
        g0 = parts[0].geo
        why = None
        if any((p.geo.M, p.geo.d, p.geo.n, p.geo.k) != (g0.M, g0.d, g0.n, g0.k) for p in parts):
            why = "different input size or recipe"
        elif len({(p.codebook.dtype, p.codebook.device) for p in parts}) != 1 or any(p.path != parts[0].path for p in parts):
            why = "different dtype, device or forced path"
        offsets, rows = [], 0
        for i, p in enumerate(parts):
            offsets.append(rows)
            rows += p.geo.N if i == len(parts) - 1 else -(-p.geo.N // g0.k) * g0.k
        real = sum(p.geo.N for p in parts)
        if why is None and rows - real > max_pad * real:
            why = f"codebook blocks of {g0.k} rows would pad {rows - real} rows onto {real}"
        if why is not None:
            key = ("not-fused", tuple(p.geo.N for p in parts), g0.M, why)
            if key not in PQLinear._logged:  # once per shape set, not once per decoder layer
                PQLinear._logged.add(key)
                log.info("PQLinear: not fusing %d layers [%s]: %s", len(parts), ", ".join(str(p.geo.N) for p in parts), why)
            return None
        geo = PQGeometry(rows, g0.M, g0.d, g0.n, g0.k)
        ref = parts[0].qweight
        qweight = torch.zeros(geo.GW, geo.N_pad, dtype=ref.dtype, device=ref.device)
        codebook = parts[0].codebook.new_zeros(geo.Nb, geo.G_pad, geo.d, geo.n)
        for off, p in zip(offsets, parts):
            qweight[:, off:off + p.geo.N] = p.qweight[:, :p.geo.N]
            codebook[off // g0.k: off // g0.k + p.geo.Nb] = p.codebook
        A = B = bias = None
        ranks = [0 if p.lowrank_a is None else p.lowrank_a.shape[1] for p in parts]
        if any(ranks):
            A = parts[0].codebook.new_zeros(rows, sum(ranks))
            B = parts[0].codebook.new_zeros(sum(ranks), g0.M)
            r0 = 0
            for off, p, r in zip(offsets, parts, ranks):
                if r:
                    A[off:off + p.geo.N, r0:r0 + r] = p.lowrank_a
                    B[r0:r0 + r] = p.lowrank_b
                    r0 += r
        if any(p.bias is not None for p in parts):
            bias = parts[0].codebook.new_zeros(rows)
            for off, p in zip(offsets, parts):
                if p.bias is not None:
                    bias[off:off + p.geo.N] = p.bias
        return cls(geo, qweight, codebook, A, B, bias, parts[0].codebook_bits, parts[0].path), offsets

    # ------------------------------------------------------------------------------ compute
    def dequantize_weight(self) -> torch.Tensor:
        """Ŵ [N, M] in the codebook dtype (fp16), low-rank term excluded."""
        if self.qweight.device.type == "cuda":
            from athena_runtime.kernels.pq_gemm import pq_dequantize_t
            return pq_dequantize_t(self.qweight, self.codebook, self.geo, dtype=self.codebook.dtype).t()
        return layout.dequantize_reference(self.qweight, self.codebook, self.geo).to(self.codebook.dtype)

    def choose_path(self, tokens: int) -> str:
        """The path for `tokens` rows (`select_path`), decided once per token class: every threshold of the
        rules is at most MMA_MAX_TOKENS, so all larger counts share one answer (a prefill call pays no
        Python for it: at 2048 tokens the host's work per call is on the GPU's critical path)."""
        forced = self.path or os.environ.get(PATH_ENV) or None
        key = (min(tokens, MMA_MAX_TOKENS + 1), forced, self.qweight.device)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = self._select(tokens, forced)
        return path

    def _select(self, tokens: int, forced: str | None) -> str:
        path = select_path(tokens, self.qweight.device, self.geo, self.codebook.dtype, forced)
        if forced is None and path != "cuda-decode" and self.qweight.device.type == "cuda" \
                and tokens <= CUDA_LUT_MAX_TOKENS and self.geo.n <= LUT_MAX_N:
            self._log_once("fallback", tokens, logging.WARNING,
                           f"cuda-decode unavailable for this layer; using {path}")
        if forced is None and path == "cuda-mma":
            self._log_once("fallback-frag", tokens, logging.WARNING,
                           "cuda-frag unavailable for this layer (recipe or build); using cuda-mma")
        if forced is None and path in ("cuda-dequant", "dequant-matmul") and self.qweight.device.type == "cuda" \
                and tokens <= MMA_MAX_TOKENS:
            self._log_once("fallback-mma", tokens, logging.WARNING,
                           f"no tensor-core kernel (cuda-frag, cuda-mma) serves this layer (recipe or build); using {path}")
        if forced is None and path == "dequant-matmul" and self.qweight.device.type == "cuda":
            self._log_once("fallback-dequant", tokens, logging.WARNING,
                           "cuda-dequant unavailable for this layer (recipe, dtype or build); using the Triton dequantize")
        self._log_once(path, tokens, why=self._lowrank_note(path))
        return path

    def _lowrank_note(self, path: str) -> str:
        """How a dequantize-then-cuBLAS path applies the low-rank term (for the path log line)."""
        if self.lowrank_a is None or path not in ("cuda-dequant", "dequant-matmul"):
            return ""
        from athena_runtime.kernels.pq_gemm import default_lowrank_mode
        return "low-rank " + default_lowrank_mode(self.geo, "cuda" if path == "cuda-dequant" else "triton",
                                                  self.lowrank_a.shape[1])

    def _log_once(self, path: str, tokens: int, level=logging.INFO, why: str = ""):
        """Log the first call of each (path, layer shape)."""
        key = (path, self.geo.N, self.geo.M)
        if key not in PQLinear._logged:
            PQLinear._logged.add(key)
            log.log(level, "PQLinear [%d x %d] d=%d n=%d k=%d, %d tokens: path %s%s", self.geo.N, self.geo.M,
                    self.geo.d, self.geo.n, self.geo.k, tokens, path, f" ({why})" if why else "")

    def forward(self, x: torch.Tensor, glu: tuple[int, int] | None = None) -> torch.Tensor:
        """y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias [..., N]; with `glu=(up_offset, F)` (a fused gate/up layer) the
        result is silu(y[..., :F]) · y[..., up_offset:up_offset + F] [..., F], computed by the split-K
        epilogue of the decode kernels (no separate SiLU-mul launch), by `fused_ops.silu_mul` otherwise."""
        if x.shape[-1] != self.geo.M:
            raise ValueError(f"PQLinear expects [..., {self.geo.M}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.geo.M)
        T = x2.shape[0]
        n_out = glu[1] if glu is not None else self.geo.N
        if T == 0:
            return x.new_empty(*lead, n_out)
        path = self.choose_path(T)
        fused_glu = glu is not None and path in ("cuda-decode", "cuda-frag", "triton-decode")
        args = (self.qweight, self.codebook, self.geo, self.lowrank_a, self.lowrank_b, self.bias)
        if path == "reference" and self.qweight.device.type == "cpu":
            y = self._cpu_reference(x2)
        elif path == "reference":
            y = pq_gemv_reference(x2, *args)
        else:
            xk = x2 if x2.dtype == self.codebook.dtype else x2.to(self.codebook.dtype)
            if path == "cuda-decode":
                from athena_runtime.kernels.pq_cuda import pq_gemv_cuda
                y = pq_gemv_cuda(xk, *args, glu=glu)
            elif path == "cuda-frag":
                from athena_runtime.kernels.pq_cuda_frag import pq_frag_cuda
                y = pq_frag_cuda(xk, *args, glu=glu)
            elif path == "cuda-mma":
                from athena_runtime.kernels.pq_cuda_mma import pq_mma_cuda
                y = pq_mma_cuda(xk, *args)
            elif path == "triton-decode":
                y = pq_gemv(xk, *args, glu=glu)
            elif path == "triton-prefill":
                from athena_runtime.kernels.pq_gemm import pq_gemm
                y = pq_gemm(xk, *args)
            else:
                from athena_runtime.kernels.pq_gemm import pq_dequant_matmul
                y = pq_dequant_matmul(xk, *args, dequant="cuda" if path == "cuda-dequant" else "triton")
            y = y.to(x.dtype)
        if glu is not None and not fused_glu:
            from athena_runtime.kernels.fused_ops import silu_mul
            y = silu_mul(y[:, :glu[1]], y[:, glu[0]:glu[0] + glu[1]])
        return y.reshape(*lead, n_out)

    def _cpu_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path on CPU: the same dequantization, done once and kept (CPU serving is for
        small models; dequantizing every layer on every token would dominate decode time there)."""
        if self._cpu_weight is None:
            W = self.dequantize_weight().float()  # [N, M]
            if self.lowrank_a is not None:
                W = W + self.lowrank_a.float() @ self.lowrank_b.float()
            self._cpu_weight = W
        y = x.float() @ self._cpu_weight.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        g = self.geo
        rank = 0 if self.lowrank_a is None else self.lowrank_a.shape[1]
        return (f"in_features={g.M}, out_features={g.N}, d={g.d}, n={g.n}, k={g.k}, "
                f"codebook_bits={self.codebook_bits}, rank={rank}, bias={self.bias is not None}")


def pad_lowrank(A: torch.Tensor | None, B: torch.Tensor | None, align: int = LOWRANK_ALIGN):
    """Zero-pad A [N, r] and B [r, M] to a rank that is a multiple of `align` (same product)."""
    if A is None or A.shape[1] % align == 0:
        return A, B
    pad = align - A.shape[1] % align
    return torch.nn.functional.pad(A, (0, pad)), torch.nn.functional.pad(B, (0, 0, 0, pad))


def _check_meta(prefix: str, meta: dict) -> tuple[PQGeometry, int, int]:
    if not isinstance(meta, dict):
        raise ValueError(f"{prefix}: layer meta must be a dict, got {type(meta).__name__}")
    if meta.get("method") != "athena":
        raise ValueError(f"{prefix}: method must be 'athena', got {meta.get('method')!r}")
    shape = meta.get("shape")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ValueError(f"{prefix}: shape must be [N, M] of positive ints, got {shape!r}")
    fields = {}
    for name in ("d", "n", "k", "codebook_bits", "rank"):
        v = meta.get(name, 0 if name == "rank" else None)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "rank" else 1):
            raise ValueError(f"{prefix}: {name} must be a {'non-negative' if name == 'rank' else 'positive'} int, got {v!r}")
        fields[name] = v
    if fields["codebook_bits"] not in (8, 16):
        raise ValueError(f"{prefix}: codebook_bits must be 8 or 16, got {fields['codebook_bits']}")
    n = fields["n"]
    if n < 2 or n & (n - 1) or n > 1 << 16:
        raise ValueError(f"{prefix}: n must be a power of two in 2..65536, got {n}")
    if fields["rank"] > min(shape):
        raise ValueError(f"{prefix}: rank {fields['rank']} exceeds min(N, M) = {min(shape)}")
    geo = PQGeometry(shape[0], shape[1], fields["d"], n, fields["k"])
    assert geo.G == math.ceil(shape[1] / fields["d"])
    return geo, fields["codebook_bits"], fields["rank"]
