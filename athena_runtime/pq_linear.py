"""PQLinear: an Athena product-quantized linear layer (FORMAT.md) for inference.

    y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias,   Ŵ[i, d·j + l] = C[i // k, j, I[i, j]]
    y = s ⊙ (x Ŵᵀ + (x Bᵀ) Aᵀ) + bias   with per-row scales s (format version 2; `row_scale.py`)

The indices stay bit-packed on the device, repacked at load time into the kernel layout
(`kernels/layout.py`); codebooks are dequantized to fp16 once. Which kernel serves a call is decided once per
token class when the layer is first used (`bind`), by the backend registry (`kernels/backends.py`: lut, frag,
dequant on CUDA, compiled at run time by NVRTC; triton-gemv, triton-dequant where those cannot run; reference on
CPU); a forward call looks its callable up and runs it. Force one backend with the constructor's `path=` or the
ATHENA_PQ_PATH environment variable (read when the layer binds; tests, benchmarks). Every (backend, layer shape)
is logged once at INFO, and a CUDA layer that does not get its class's first choice once at WARNING, with why.
"""

from __future__ import annotations

import bisect
import logging

import torch
from torch import nn

from athena_runtime.format.bits import unpack_bits
from athena_runtime.format.environment import Environment
from athena_runtime.format.layers import dequantize_codebook_uint8, read_athena_tensors
from athena_runtime.kernels import layout, nvrtc
from athena_runtime.kernels.backends import NAMES, registry, token_classes
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.pq_reference import interpreting, pq_matmul_reference
from athena_runtime.row_scale import row_scale_epilogue

log = logging.getLogger(__name__)

PATH_ENV = "ATHENA_PQ_PATH"
LOWRANK_ALIGN = 16  # low-rank factors padded with zeros to a multiple of this rank (cuBLAS tensor cores)


class PQLinear(nn.Module):
    """Inference-only Athena linear layer. Build it with `from_tensors`."""

    _logged: set = set()  # (path, N, M) already logged: "once per layer shape" across all instances

    def __init__(
        self,
        geo: PQGeometry,
        qweight: torch.Tensor,
        codebook: torch.Tensor,
        lowrank_a: torch.Tensor | None = None,
        lowrank_b: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        codebook_bits: int = 8,
        path: str | None = None,
        row_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.geo = geo
        self.codebook_bits = codebook_bits
        self.in_features, self.out_features = geo.M, geo.N
        self.path = path
        if path is not None and path not in NAMES:
            raise ValueError(f"unknown PQLinear path {path!r}; choose one of {NAMES}")
        self.register_buffer("qweight", qweight, persistent=False)  # int32 [GW, N_pad]
        self.register_buffer("codebook", codebook, persistent=False)  # [Nb, G_pad, d, n]
        self.register_buffer("lowrank_a", lowrank_a, persistent=False)  # [N, r] or None
        self.register_buffer("lowrank_b", lowrank_b, persistent=False)  # [r, M] or None
        self.register_buffer("bias", bias, persistent=False)  # [N] or None
        self.register_buffer("row_scale", row_scale, persistent=False)  # [N] or None: an epilogue, see forward
        self._cpu_weight: torch.Tensor | None = None  # W_eff [N, M] fp32, cached for the CPU reference
        # (codes uint8 [Nb, G, n, d], scale fp16 [Nb, G, d], min fp16 [Nb, G, d]) as stored, kept on CPU loads only
        self.codebook_codes: tuple | None = None
        self._bound: tuple | None = None  # (forced path, class upper token counts, [(backend, callable)] per class)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_tensors(
        cls, prefix: str, tensors: dict, meta: dict, device, dtype=torch.float16, path: str | None = None
    ) -> "PQLinear":
        """Build from the checkpoint tensors `prefix.indices`, `prefix.codebook`, ... (FORMAT.md) and the
        layer's athena.json entry `meta` = {"method": "athena", "shape": [N, M], "d", "n", "k",
        "codebook_bits", "rank"}. Raises ValueError naming the tensor or field that does not fit."""
        s = read_athena_tensors(prefix, tensors, meta)
        geo = PQGeometry(*s.shape, s.d, s.n, s.k)
        device = torch.device(device)
        try:
            indices = unpack_bits(s.indices.to(device), geo.bits, geo.G)  # [N, G]
        except ValueError as e:
            raise ValueError(f"tensor {prefix}.indices: {e}") from None
        qweight = layout.pack_words(indices, geo)
        del indices
        scale, cmin = s.codebook_scale, s.codebook_min
        C = s.codebook.to(device)  # [Nb, G, n, d], uint8 codes (+ scale, min [Nb, G, d]) or fp16
        if C.dtype == torch.uint8:
            C = dequantize_codebook_uint8(C, scale.to(device), cmin.to(device), dim=-2)
        C = C.float().to(dtype)
        codebook = layout.pad_codebook(C, geo)
        opt = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
        A, B = pad_lowrank(opt(s.lowrank_a), opt(s.lowrank_b))
        layer = cls(geo, qweight, codebook, A, B, opt(s.bias), s.codebook_bits, path, opt(s.row_scale))
        if device.type == "cpu" and s.codebook_bits == 8 and s.row_scale is None:
            # the CPU fast path multiplies by the stored codes (cpu/linear.py; row-scaled layers take its fp16 form)
            layer.codebook_codes = (s.codebook.contiguous(), scale.contiguous(), cmin.contiguous())
        return layer

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
        elif len({p.row_scale is None for p in parts}) != 1:
            why = "row scales on some parts only"
        elif len({(p.codebook.dtype, p.codebook.device) for p in parts}) != 1 or any(
            p.path != parts[0].path for p in parts
        ):
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
                log.info(
                    "PQLinear: not fusing %d layers [%s]: %s", len(parts), ", ".join(str(p.geo.N) for p in parts), why
                )
            return None
        geo = PQGeometry(rows, g0.M, g0.d, g0.n, g0.k)
        ref = parts[0].qweight
        qweight = torch.zeros(geo.GW, geo.N_pad, dtype=ref.dtype, device=ref.device)
        codebook = parts[0].codebook.new_zeros(geo.Nb, geo.G_pad, geo.d, geo.n)
        for off, p in zip(offsets, parts):
            qweight[:, off : off + p.geo.N] = p.qweight[:, : p.geo.N]
            codebook[off // g0.k : off // g0.k + p.geo.Nb] = p.codebook
        A = B = bias = None
        ranks = [0 if p.lowrank_a is None else p.lowrank_a.shape[1] for p in parts]
        if any(ranks):
            A = parts[0].codebook.new_zeros(rows, sum(ranks))
            B = parts[0].codebook.new_zeros(sum(ranks), g0.M)
            r0 = 0
            for off, p, r in zip(offsets, parts, ranks):
                if r:
                    A[off : off + p.geo.N, r0 : r0 + r] = p.lowrank_a
                    B[r0 : r0 + r] = p.lowrank_b
                    r0 += r
        if any(p.bias is not None for p in parts):
            bias = parts[0].codebook.new_zeros(rows)
            for off, p in zip(offsets, parts):
                if p.bias is not None:
                    bias[off : off + p.geo.N] = p.bias
        scale = None
        if parts[0].row_scale is not None:
            scale = parts[0].codebook.new_ones(rows)
            for off, p in zip(offsets, parts):
                scale[off : off + p.geo.N] = p.row_scale
        return cls(geo, qweight, codebook, A, B, bias, parts[0].codebook_bits, parts[0].path, scale), offsets

    # ------------------------------------------------------------------------------ compute
    def dequantize_weight(self) -> torch.Tensor:
        """Ŵ [N, M] in the codebook dtype (fp16), low-rank term excluded."""
        if self.qweight.device.type == "cuda":
            from athena_runtime.kernels.dequant_matmul import triton_dequantize_t

            return triton_dequantize_t(self.qweight, self.codebook, self.geo, dtype=self.codebook.dtype).t()
        return layout.dequantize_reference(self.qweight, self.codebook, self.geo).to(self.codebook.dtype)

    def kernel_args(self) -> tuple:
        """What every PQ kernel takes after x: (qweight, codebook, geo, lowrank_a, lowrank_b, bias). With row
        scales the bias is added after the scale epilogue (forward), so the kernels get none."""
        bias = self.bias if self.row_scale is None else None
        return self.qweight, self.codebook, self.geo, self.lowrank_a, self.lowrank_b, bias

    def reference_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return (
            self._cpu_reference(x) if self.qweight.device.type == "cpu" else pq_matmul_reference(x, *self.kernel_args())
        )

    def bind(self) -> list[str]:
        """Resolve the backend of every token class (once; again only if the forced path changes) and return their
        names, smallest class first. CUDA kernels are compiled here (NVRTC, cached on disk)."""
        forced = self.path or Environment.read().pq_path
        if self._bound is not None and self._bound[0] == forced:
            return [name for name, _ in self._bound[2]]
        reg = registry(self.qweight.device)
        classes = token_classes(reg.tuning)
        if forced is not None:
            if forced not in NAMES:
                raise ValueError(f"unknown PQLinear path {forced!r}; choose one of {NAMES}")
            on_cuda = self.qweight.device.type == "cuda"
            if forced != "reference" and not on_cuda and not (forced.startswith("triton") and interpreting()):
                raise ValueError(
                    f"path {forced!r} needs a CUDA device (Triton paths also run under TRITON_INTERPRET=1)"
                )
            if on_cuda:  # a forced kernel that cannot take a call says why (the Triton interpreter's CPU runs: tests)
                ok, why = reg.can_run(forced, self.geo, 1, self.codebook.dtype)
                if not ok:
                    raise nvrtc.KernelUnavailable(f"path {forced!r} cannot serve this layer: {why}")
            fn = reg.bind(forced, self)
            if on_cuda:
                fn = self._forced_guard(reg, forced, fn)
            fns = [(forced, fn)] * len(classes)
            self._log_once("path", forced, 1 << 20, logging.INFO, f"forced by path= or {PATH_ENV}")
        else:
            fns = [self._resolve(reg, min(c, 1 << 20)) for c in classes]
        self._bound = (forced, classes, fns)
        return [name for name, _ in fns]

    def _forced_guard(self, reg, name: str, fn):
        """`fn` of a forced backend, refusing (ValueError, saying why) a call it does not serve, e.g. lut past 8
        tokens."""

        def call(x, glu):
            ok, why = reg.can_run(name, self.geo, x.shape[0], self.codebook.dtype)
            if not ok:
                raise ValueError(f"forced PQLinear path {name!r} cannot take {x.shape[0]} tokens: {why}")
            return fn(x, glu)

        return call

    def _resolve(self, reg, tokens: int):
        """(backend, callable) for calls of up to `tokens` rows: the registry's first choice that binds."""
        failed: list[tuple[str, str]] = []
        while True:
            name, skipped = reg.resolve(self.geo, tokens, self.codebook.dtype, exclude={n for n, _ in failed})
            try:
                fn = reg.bind(name, self)
                break
            except (nvrtc.KernelUnavailable, RuntimeError) as e:  # a kernel did not compile or load: the next one
                failed.append((name, f"{type(e).__name__}: {e}"))
        skipped += failed
        if (self.qweight.device.type == "cuda" and skipped) or failed:
            self._log_once(
                "fallback", name, tokens, logging.WARNING, "; ".join(f"{n} unavailable ({why})" for n, why in skipped)
            )
        self._log_once("path", name, tokens, logging.INFO, self._lowrank_note(name))
        return name, fn

    def backend_for(self, tokens: int) -> str:
        """The backend that serves calls of `tokens` rows."""
        self.bind()
        return self._bound[2][bisect.bisect_left(self._bound[1], tokens)][0]

    def _lowrank_note(self, path: str) -> str:
        """How a dequantize-then-cuBLAS path applies the low-rank term (for the path log line)."""
        if self.lowrank_a is None or path not in ("dequant", "triton-dequant"):
            return ""
        from athena_runtime.kernels.dequant_matmul import default_lowrank_mode

        return "low-rank " + default_lowrank_mode(
            self.geo, "cuda" if path == "dequant" else "triton", self.lowrank_a.shape[1]
        )

    def _log_once(self, what: str, path: str, tokens: int, level, why: str = ""):
        """Log once per (what, backend, layer shape): the path taken, or why the first choice was passed over."""
        key = (what, path, self.geo.N, self.geo.M)
        if key not in PQLinear._logged:
            PQLinear._logged.add(key)
            log.log(
                level,
                "PQLinear [%d x %d] d=%d n=%d k=%d, up to %s tokens: path %s%s",
                self.geo.N,
                self.geo.M,
                self.geo.d,
                self.geo.n,
                self.geo.k,
                tokens if tokens < 1 << 20 else "any",
                path,
                f" ({why})" if why else "",
            )

    def forward(self, x: torch.Tensor, glu: tuple[int, int] | None = None) -> torch.Tensor:
        """y = x Ŵᵀ + (x Bᵀ) Aᵀ + bias [..., N]; with `glu=(up_offset, F)` (a fused gate/up layer) the
        result is silu(y[..., :F]) · y[..., up_offset:up_offset + F] [..., F], computed by the split-K
        epilogue of the lookup-table and fragment kernels, by `fused_ops.silu_mul` otherwise."""
        if x.shape[-1] != self.geo.M:
            raise ValueError(f"PQLinear expects [..., {self.geo.M}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.geo.M)
        T = x2.shape[0]
        n_out = glu[1] if glu is not None else self.geo.N
        if T == 0:
            return x.new_empty(*lead, n_out)
        if self._bound is None:
            self.bind()
        _, fn = self._bound[2][bisect.bisect_left(self._bound[1], T)]
        if self.row_scale is not None and self.qweight.device.type != "cpu":
            return row_scale_epilogue(fn(x2, None), self.row_scale, self.bias, glu).to(x.dtype).reshape(*lead, n_out)
        return fn(x2, glu).to(x.dtype).reshape(*lead, n_out)

    def _cpu_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path on CPU: the same dequantization, done once and kept (CPU serving is for
        small models; dequantizing every layer on every token would dominate decode time there)."""
        if self._cpu_weight is None:
            self._cpu_weight = self.effective_weight()
        y = x.float() @ self._cpu_weight.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def effective_weight(self) -> torch.Tensor:
        """W_eff [N, M] fp32 = diag(s) (Ŵ + A B), as FORMAT.md dequantizes it."""
        W = self.dequantize_weight().float()  # [N, M]
        if self.lowrank_a is not None:
            W = W + self.lowrank_a.float() @ self.lowrank_b.float()
        if self.row_scale is not None:
            W = W * self.row_scale.float().unsqueeze(1)
        return W

    def extra_repr(self) -> str:
        g = self.geo
        rank = 0 if self.lowrank_a is None else self.lowrank_a.shape[1]
        return (
            f"in_features={g.M}, out_features={g.N}, d={g.d}, n={g.n}, k={g.k}, "
            f"codebook_bits={self.codebook_bits}, rank={rank}, bias={self.bias is not None}, "
            f"row_scale={self.row_scale is not None}"
        )


def pad_lowrank(A: torch.Tensor | None, B: torch.Tensor | None, align: int = LOWRANK_ALIGN):
    """Zero-pad A [N, r] and B [r, M] to a rank that is a multiple of `align` (same product)."""
    if A is None or A.shape[1] % align == 0:
        return A, B
    pad = align - A.shape[1] % align
    return torch.nn.functional.pad(A, (0, pad)), torch.nn.functional.pad(B, (0, 0, 0, pad))
