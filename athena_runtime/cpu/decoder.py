"""The CPU fast path's decoder modules: the same math as model.py's, with each step's element-wise work and
decode attention done by one compiled call each (`cpu/ops.c`) instead of several PyTorch ops.

A decode step of a small model on the CPU is op-bound: SmolLM2-135M runs ~50 PyTorch ops in each of its
30 layers, ~5-10 µs apiece. `specialize.specialize(model)` switches, in place, the modules that have a fast form:

    RMSNorm        -> CPURMSNorm     residual add + RMSNorm (float32, no unit offset)
    Attention      -> CPUAttention   fused q/k/v projection, RoPE in place on its output, K/V written into a
                                     float32/float16 cache without a stored basis or rotation, then the
                                     layer's paged attention (attention.py: one compiled call for decode)
    MLP            -> CPUMLP         fused gate/up projection, SiLU(gate)·up in one call
    DecoderLayer   -> CPUDecoderLayer  a decode step's whole layer in one call (layer.c) when all of the above
                                     apply and its linear layers were converted (linear.py)
    CausalLM       -> CPUCausalLM    a decode step's whole layer stack in one call (stack.py) when every layer
                                     has its one-call form

Each keeps its class's interface and falls back to the original forward for what it does not cover
(q/k norms, logit soft-capping, GELU, a quantized or rotated KV cache, unfused projections); which modules
were switched is counted and logged by path.py.
"""

from __future__ import annotations

import ctypes

import torch

from athena_runtime.kv_cache import FP16KVCache
from athena_runtime.model import MLP, Attention, DecoderLayer, RMSNorm
from athena_runtime.split_linear import SplitLinear


def plain_cache(cache) -> bool:
    """A float32/float16 cache storing K and V as computed (no key basis, no rotation): the compiled write and
    decode attention read and write it directly."""
    return isinstance(cache, FP16KVCache) and cache.key_offset is None and cache.rotation is None


def cache_fp16(cache) -> int:
    return int(cache.storage_dtype == torch.float16)


def bind_cache(desc, cache, layer: int) -> None:
    """Point a LayerDesc at `cache`'s K/V of `layer` (its storage format and block size too)."""
    desc.kc, desc.vc = cache.k[layer].data_ptr(), cache.v[layer].data_ptr()
    desc.fp16, desc.block_size = cache_fp16(cache), cache.block_size


def step_tensors(cos, sin, attn) -> tuple:
    """The step's RoPE and paging tensors as layer.c reads them in place: (cos, sin, slots, tables, lens), contiguous.
    Keep the tuple alive through the call; `step_pointers` gives its arguments."""
    return (
        cos.contiguous(),
        sin.contiguous(),
        attn.slot_mapping.contiguous(),
        attn.block_tables.contiguous(),
        attn.seq_lens.contiguous(),
    )


def step_pointers(tensors: tuple) -> tuple:
    """(cos, sin, slot, tables, table stride, lens) arguments of layer_decode / stack_decode."""
    cos, sin, slots, tables, lens = tensors
    return cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr()


class CPURMSNorm(RMSNorm):
    _ops = None  # the compiled library (cpu/build.py), set per module by specialize

    def forward(self, x, residual=None, out_dtype=None):
        if (
            self.unit_offset
            or x.dtype != torch.float32
            or x.dim() != 2
            or self.weight.dtype != torch.float32
            or (residual is not None and (residual.dtype != torch.float32 or residual.shape != x.shape))
        ):
            return super().forward(x, residual, out_dtype)
        x = x.contiguous()
        residual = None if residual is None else residual.contiguous()
        y = torch.empty_like(x)
        r = torch.empty_like(x) if residual is not None else x
        T, H = x.shape
        self._ops.rmsnorm_add(
            x.data_ptr(),
            None if residual is None else residual.data_ptr(),
            self.weight.data_ptr(),
            self.eps,
            y.data_ptr(),
            r.data_ptr(),
            T,
            H,
        )
        return (y if out_dtype in (None, torch.float32) else y.to(out_dtype)), r


class CPUAttention(Attention):
    _ops = None

    def forward(self, x, cos, sin, attn):
        qkv = self.qkv_proj
        if self.qk_norm or not isinstance(qkv, SplitLinear) or x.dtype != torch.float32 or cos.dtype != torch.float32:
            return super().forward(x, cos, sin, attn)
        T, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        y = qkv.linear(x)  # [T, (H + 2 Hkv) D]: q, k, v side by side (split_linear offsets)
        cos, sin = cos.contiguous(), sin.contiguous()
        self._ops.rope_(y.data_ptr(), T, y.stride(0), H + Hkv, D, cos.data_ptr(), sin.data_ptr())
        q = y[:, : H * D].view(T, H, D)
        k = y[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
        v = y[:, (H + Hkv) * D :].view(T, Hkv, D)
        cache = attn.kv_cache
        if plain_cache(cache):
            slots = attn.slot_mapping.contiguous()
            self._ops.kv_write(
                k.data_ptr(),
                v.data_ptr(),
                T,
                y.stride(0),
                slots.data_ptr(),
                cache.k[self.layer].data_ptr(),
                cache.v[self.layer].data_ptr(),
                Hkv * D,
                cache_fp16(cache),
            )
        else:
            cache.write(self.layer, k, v, attn.slot_mapping, attn.positions)
        o = self.paged_attention(
            cache.query(self.layer, q),
            cache,
            self.layer,
            attn,
            self.scale,
            self.window,
            fresh_kv=(k, v),
            softcap=self.softcap,
        )
        return self.o_proj(cache.output(o).reshape(T, H * D))


class CPUMLP(MLP):
    _ops = None

    def forward(self, x):
        gu = self.gate_up_proj
        if (
            self.act != "silu"
            or not isinstance(gu, SplitLinear)
            or len(gu.sizes) != 2
            or gu.sizes[0] != gu.sizes[1]
            or gu.offsets[0] != 0
            or x.dtype != torch.float32
        ):
            return super().forward(x)
        y = gu.linear(x)  # [T, rows]: gate at 0, up at offsets[1]
        T, F = y.shape[0], gu.sizes[0]
        out = torch.empty(T, F, dtype=torch.float32)
        self._ops.silu_mul(y.data_ptr(), T, y.stride(0), F, gu.offsets[1], out.data_ptr())
        return self.down_proj(out)


class CPUDecoderLayer(DecoderLayer):
    """A decode step's layer in one compiled call (`layer_decode` in layer.c) when every part has its compiled form:
    RMSNorms, attention without q/k norms or soft-capping over a plain float32/float16 cache, SiLU gate/up, and
    linear layers converted by linear.py. Anything else (a prompt chunk, a mixed batch, Gemma's sandwich norms,
    a quantized cache) takes the per-module path."""

    _ops = None

    def _static_desc(self):
        """LayerDesc without the cache pointers, or the reason this layer has no fused form (once)."""
        if self.__dict__.get("_fused") is None:
            self._fused = self._describe()
        return self._fused

    def _describe(self):
        from athena_runtime.cpu.layer_desc import LayerDesc

        attn, mlp, n1, n2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        lin = lambda m: getattr(m, "descriptor", None)  # noqa: E731
        if self.sandwich or not (isinstance(n1, CPURMSNorm) and isinstance(n2, CPURMSNorm)):
            return "sandwich norms or unswitched norms"
        if n1.unit_offset or n2.unit_offset or n1.weight.dtype != torch.float32 or n2.weight.dtype != torch.float32:
            return "norms with a unit offset or not float32"
        if not isinstance(attn, CPUAttention) or attn.qk_norm or attn.softcap:
            return "attention with q/k norms or soft-capping"
        qkv, gu = getattr(attn, "qkv_proj", None), getattr(mlp, "gate_up_proj", None)
        H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
        if not isinstance(qkv, SplitLinear) or qkv.offsets != [0, H * D, (H + Hkv) * D] or not lin(qkv.linear):
            return "unfused or unconverted q/k/v"
        if not isinstance(mlp, CPUMLP) or mlp.act != "silu" or not isinstance(gu, SplitLinear):
            return "MLP without SiLU or unfused gate/up"
        if len(gu.sizes) != 2 or gu.sizes[0] != gu.sizes[1] or gu.offsets[0] != 0 or not lin(gu.linear):
            return "gate/up layout"
        if not (lin(attn.o_proj) and lin(mlp.down_proj)):
            return "unconverted o/down projection"
        return LayerDesc(
            qkv=qkv.linear.descriptor(),
            o=attn.o_proj.descriptor(),
            gate_up=gu.linear.descriptor(),
            down=mlp.down_proj.descriptor(),
            ln1=n1.weight.data_ptr(),
            ln2=n2.weight.data_ptr(),
            eps1=n1.eps,
            eps2=n2.eps,
            Hd=n1.weight.numel(),
            H=H,
            Hkv=Hkv,
            D=D,
            F=gu.sizes[0],
            up=gu.offsets[1],
            window=attn.window or 0,
            scale=attn.scale,
        )

    def forward(self, h, residual, cos, sin, attn):
        desc = self._static_desc()
        cache = attn.kv_cache
        if (
            isinstance(desc, str)
            or not attn.is_decode
            or h.dtype != torch.float32
            or h.dim() != 2
            or (residual is not None and (residual.dtype != torch.float32 or residual.shape != h.shape))
            or cos.dtype != torch.float32
            or not plain_cache(cache)
            or cache.key_scale is not None
        ):
            return super().forward(h, residual, cos, sin, attn)
        from athena_runtime.cpu.layer_desc import scratch_floats

        bind_cache(desc, cache, self.self_attn.layer)
        T = h.shape[0]
        h = h.contiguous()
        residual = None if residual is None else residual.contiguous()
        step = step_tensors(cos, sin, attn)
        h_out, r_out = torch.empty_like(h), torch.empty_like(h)
        scratch = torch.empty(scratch_floats(desc, T), dtype=torch.float32)
        if self._ops.layer_decode(
            ctypes.byref(desc),
            h.data_ptr(),
            None if residual is None else residual.data_ptr(),
            h_out.data_ptr(),
            r_out.data_ptr(),
            T,
            *step_pointers(step),
            scratch.data_ptr(),
            torch.get_num_threads(),
        ):
            raise MemoryError("layer_decode: out of memory for a scratch buffer")
        return h_out, r_out
