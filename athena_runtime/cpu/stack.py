"""The CPU fast path's whole decode step in one compiled call: `CausalLM -> CPUCausalLM` (decoder.specialize).

A decode step of SmolLM2-135M through one `layer_decode` call per layer still ran Python between its 30 layers
(contiguity checks, buffers, a 14-argument ctypes call) and handed the GIL back and forth 30 times, each time
possibly waiting behind the server's event loop: one call for the stack measured 11.9 against 12.6 ms a step
(2-core EPYC, medians of 8 alternating rounds of 32 steps). When every layer has its fused form (`CPUDecoderLayer`'s
LayerDesc) and the model has nothing outside it (no embedding scale, no sandwich norms, one RoPE for every layer),
a decode step runs the stack with `stack_decode` (layer.c): one call, h and the residual updated in place. Any
other step (a prompt chunk, a mixed batch, a quantized cache) takes CausalLM's per-layer loop; the reason is
logged once.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from athena_runtime.cpu.decoder import CPUDecoderLayer, bind_cache, plain_cache, step_pointers, step_tensors
from athena_runtime.cpu.layer_desc import LayerDesc, scratch_floats
from athena_runtime.model import CausalLM

log = logging.getLogger(__name__)


class CPUCausalLM(CausalLM):
    _ops = None

    def _static_stack(self):
        """The layers' LayerDescs, or the reason the model has no one-call decode step (once)."""
        if self.__dict__.get("_stack") is None:
            self._stack = self._describe_stack()
            if isinstance(self._stack, str):
                log.info("CPU decode: one compiled call per layer (%s)", self._stack)
            else:
                log.info("CPU decode: the whole stack of %d layers in one compiled call", len(self._stack))
        return self._stack

    def _describe_stack(self):
        cfg, layers = self.config, self.model.layers
        if cfg.embed_scale is not None or cfg.sandwich_norms or self.model.rotary_emb_local is not None:
            return "embedding scale, sandwich norms or a second RoPE"
        descs = []
        for layer in layers:
            desc = layer._static_desc() if isinstance(layer, CPUDecoderLayer) else "not switched"
            if isinstance(desc, str):
                return f"layer {len(descs)}: {desc}"
            descs.append(desc)
        return descs

    def _pointers(self, descs: list[LayerDesc], cache):
        """The ctypes array of the layers' descriptors with `cache`'s K/V pointers filled in (kept per cache)."""
        key = (id(cache), cache.k[0].data_ptr())
        if self.__dict__.get("_ptr_key") != key:
            for d, layer in zip(descs, self.model.layers):
                bind_cache(d, cache, layer.self_attn.layer)
            self._ptrs = (ctypes.POINTER(LayerDesc) * len(descs))(*(ctypes.pointer(d) for d in descs))
            self._ptr_key = key
        return self._ptrs

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        descs = self._static_stack()
        cache = attn.kv_cache
        if isinstance(descs, str) or not attn.is_decode or not plain_cache(cache) or cache.key_scale is not None:
            return super().forward(input_ids, positions, attn)
        h = self.model.embed_tokens(input_ids)
        if h.dtype != torch.float32:
            return super().forward(input_ids, positions, attn)
        T = h.shape[0]
        h = h.contiguous()
        step = step_tensors(*self.model.rotary_emb(positions, h.dtype), attn)
        residual = torch.empty_like(h)
        scratch = torch.empty(max(scratch_floats(d, T) for d in descs), dtype=torch.float32)
        if self._ops.stack_decode(
            self._pointers(descs, cache),
            len(descs),
            h.data_ptr(),
            residual.data_ptr(),
            T,
            *step_pointers(step),
            scratch.data_ptr(),
            torch.get_num_threads(),
        ):
            raise MemoryError("stack_decode: out of memory for a scratch buffer")
        return self.model.norm(h, residual, out_dtype=self.model.norm.weight.dtype)[0]
