"""The key basis of a calibrated KV cache (`kv_cache.KeyBasis`): key and query statistics of the model
on a few fixed windows of calibration text, measured once when the model runner starts.

For each layer and KV head, over all tokens of the windows (post-RoPE, as the cache sees them):
    m = E[k]                                   the key offset
    d = (E[q_c²] / Var[k_c])^(1/4), rms 1        the key channel scale (q: the head's GQA queries)
    δ = E[k | position 0] - m                  the attention-sink offset
The windows are `sample_windows(default calibration text, NUM_WINDOWS, WINDOW, seed 0)` (the text
the quantizer calibrates on, pydoc_data.topics), so the basis is a deterministic function of the
model. Any basis is exact (kv_cache.py); these statistics only decide how small the rounding error is.
"""

from __future__ import annotations

import logging
import time

import torch

from athena_runtime.batch import SequenceChunk, prepare_batch
from athena_runtime.kv_cache import FP16KVCache, KeyBasis

log = logging.getLogger(__name__)

NUM_WINDOWS = 4  # windows of calibration text
WINDOW = 512  # tokens per window (capped at the model's max length)
_EPS = 1e-6  # relative floor for the variances in d (a dead channel gets a finite scale)


class _RecordingCache(FP16KVCache):
    """An unquantized cache that also sums the keys and the squared queries it sees, per layer and KV head."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, device, dtype):
        super().__init__(num_layers, num_blocks, block_size, num_kv_heads, head_dim, device, dtype=dtype)
        z = dict(dtype=torch.float64, device=self.device)
        shape = (num_layers, num_kv_heads, head_dim)
        self.k_sum, self.k_sq, self.q_sq, self.k_first = (torch.zeros(shape, **z) for _ in range(4))
        self.tokens, self.firsts = 0, 0

    def write(self, layer, k, v, slot_mapping, positions):
        x = k.double()  # [T, Hkv, D]
        first = positions == 0
        self.k_sum[layer] += x.sum(0)
        self.k_sq[layer] += x.square().sum(0)
        self.k_first[layer] += x[first].sum(0)
        if layer == 0:
            self.tokens += x.shape[0]
            self.firsts += int(first.sum())
        super().write(layer, k, v, slot_mapping, positions)

    def query(self, layer, q):
        self.q_sq[layer] += q.double().unflatten(1, (self.num_kv_heads, -1)).square().sum((0, 2))  # [Hkv, D]
        return super().query(layer, q)

    def key_basis(self, queries_per_kv: int) -> KeyBasis:
        m = self.k_sum / self.tokens
        var = (self.k_sq / self.tokens - m.square()).clamp_min(0)
        q2 = self.q_sq / (self.tokens * queries_per_kv)
        var = var.clamp_min(_EPS * var.mean(-1, keepdim=True) + 1e-30)
        q2 = q2.clamp_min(_EPS * q2.mean(-1, keepdim=True) + 1e-30)
        d = (q2 / var).pow(0.25)
        d = d / d.square().mean(-1, keepdim=True).sqrt()
        sink = self.k_first / max(self.firsts, 1) - m
        return KeyBasis(offset=m.float(), scale=d.float(), sink=sink.float())


@torch.inference_mode()
def calibrate_key_basis(model, config, windows: torch.Tensor, device, dtype) -> KeyBasis:
    """Run `model` over windows [N, S] of token ids (one window per prefill, exact cache) -> KeyBasis."""
    n, length = windows.shape
    block_size = 16
    blocks = -(-length // block_size)
    cache = _RecordingCache(config.num_layers, blocks, block_size, config.num_kv_heads, config.head_dim, device, dtype)
    t0 = time.perf_counter()
    for w in windows.tolist():
        batch = prepare_batch([SequenceChunk(w, 0, list(range(blocks)))], cache, device)
        model(batch.input_ids, batch.positions, batch.attn)
    log.info("KV key basis calibrated on %d x %d tokens in %.1f s", n, length, time.perf_counter() - t0)
    basis = cache.key_basis(config.num_heads // config.num_kv_heads)
    if config.attn_softcap is not None:  # capped scores are not shift-invariant: keep q·k itself (d and H only)
        log.info("KV key basis: no key offset (soft-capped attention scores need q·k unshifted)")
        basis = KeyBasis(offset=torch.zeros_like(basis.offset), scale=basis.scale, sink=torch.zeros_like(basis.sink))
    return basis


def calibration_windows(tokenizer, max_len: int) -> torch.Tensor:
    """The fixed calibration windows [NUM_WINDOWS, min(WINDOW, max_len)] for a model's tokenizer."""
    from athena_runtime.format.text import default_calibration_text, sample_windows, tokenize_text

    ids = tokenize_text(tokenizer, default_calibration_text())
    return sample_windows(ids, NUM_WINDOWS, min(WINDOW, max_len), seed=0)
