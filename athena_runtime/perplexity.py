"""Perplexity through the Athena runtime: our decoder, PQLinear layers, and a paged KV cache in a
chosen format, so the effect of int8 / int4 KV on quality can be measured.

Each window is fed in prefill chunks of `chunk` tokens; every chunk attends to the earlier chunks
through the (quantized) cache, as a long conversation does when it is served. (On the GPU a window's first chunk, a
whole prompt, attends over its own keys as computed, unquantized: `paged_attention_mixed`.)
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from athena_runtime.batch import SequenceChunk, prepare_batch


@torch.inference_mode()
def runtime_perplexity(runner, ids: torch.Tensor, seqlen: int, max_tokens: int | None = None, chunk: int = 64) -> dict:
    """exp(mean NLL) over non-overlapping windows of ids [T], as quantize.evaluate.perplexity does."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    nwin = ids.numel() // seqlen
    if nwin == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    blocks = -(-seqlen // runner.block_size)
    if blocks > runner.num_blocks:
        raise ValueError(f"--seqlen {seqlen} needs {blocks} KV blocks, the cache has {runner.num_blocks}")
    table = list(range(blocks))
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    for w in range(nwin):
        window = ids[w * seqlen : (w + 1) * seqlen].tolist()
        for s in range(0, seqlen, chunk):
            toks = window[s : s + chunk]
            batch = prepare_batch([SequenceChunk(toks, s, table)], runner.kv_cache, runner.device)
            hidden = runner.model(batch.input_ids, batch.positions, batch.attn)  # [len(toks), H]
            logits = runner.model.compute_logits(hidden).float()  # [len(toks), V]
            targets = torch.tensor(window[s + 1 : s + 1 + len(toks)], device=logits.device)
            logits = logits[: targets.numel()]
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += targets.numel()
    return {"ppl": math.exp(nll / count), "tokens": count, "seconds": time.perf_counter() - t0}


def eval_ppl_runtime(
    model_path: str | Path,
    data: list[str],
    seqlen: int,
    max_tokens: int | None,
    kv_cache: str,
    kv_hadamard: bool = False,
    device=None,
) -> dict:
    from athena_runtime.format import checkpoint
    from athena_runtime.format.source import load_tokenizer
    from athena_runtime.format.text import read_text_files, tokenize_text
    from athena_runtime.model_runner import ModelRunner

    path = Path(model_path)
    block_size = 16
    runner = ModelRunner.from_path(
        path,
        kv_format=kv_cache,
        block_size=block_size,
        num_blocks=-(-seqlen // block_size),
        device=device,
        max_model_len=seqlen,
        kv_hadamard=kv_hadamard,
        use_cuda_graphs=False,
    )
    ids = tokenize_text(load_tokenizer(path), read_text_files(data))
    res = runtime_perplexity(runner, ids, seqlen, max_tokens)
    meta = checkpoint.read_meta(path) if checkpoint.is_checkpoint(path) else None
    return {
        "model": str(model_path),
        **res,
        "seqlen": seqlen,
        "kv_cache": kv_cache,
        "kv_hadamard": runner.kv_cache.hadamard,
        "kv_key_basis": runner.kv_cache.key_offset is not None,
        "bits_per_weight": meta["bits_per_weight"]["linear"] if meta else None,
        "kv_bytes_per_token": runner.kv_cache.bytes_per_token(),
    }
