"""A step's work: the engine's `SequenceChunk`s flattened into one token batch (vLLM style).

Sequence `s` contributes `n_s` new tokens at positions `start_pos_s … start_pos_s + n_s - 1`;
all tokens of all sequences are concatenated into one flat batch of `T = Σ n_s` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from athena_runtime.kv_cache import KVCache


@dataclass
class SequenceChunk:
    token_ids: list[int]  # tokens to feed now (a prefill chunk, or 1 token for decode)
    start_pos: int  # how many tokens of this sequence are already in the KV cache
    block_table: list[int]  # physical KV block ids covering positions [0, start_pos + len(token_ids))


@dataclass
class AttentionMetadata:
    """What paged attention needs to know about the flat batch."""

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [T] int64: KV slot of each new token
    positions: torch.Tensor  # [T] int64: position of each new token in its sequence
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with the cache's null block
    seq_lens: torch.Tensor  # [S] int32: KV length of each sequence after this step
    query_start_loc: torch.Tensor  # [S + 1] int32: sequence s owns flat tokens [qsl[s], qsl[s+1])
    is_decode: bool  # every sequence feeds exactly one token
    seq_lens_list: list[int] | None = None  # host copies, for the per-sequence (prefill) path;
    query_start_list: list[int] | None = None  # None inside CUDA graphs
    # one sequence, all rows; keys: every position its block_tables row covers, the first seq_lens[0] real
    # (paged_attention.one_sequence_attention: no host data, for the prefill CUDA graphs of continued chunks)
    one_sequence: bool = False
    # index tensors built from the host lists once a step and shared by every layer (paged_attention_mixed)
    step_cache: dict = field(default_factory=dict)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: flat index of each sequence's last token


def check_chunks(chunks: list[SequenceChunk], block_size: int, num_blocks: int) -> None:
    """Refuse malformed chunks with a message naming the chunk, before anything is written."""
    if not chunks:
        raise ValueError("execute() needs at least one SequenceChunk")
    for i, c in enumerate(chunks):
        if not c.token_ids:
            raise ValueError(f"chunk {i}: token_ids is empty")
        if c.start_pos < 0:
            raise ValueError(f"chunk {i}: start_pos {c.start_pos} < 0")
        need = -(-(c.start_pos + len(c.token_ids)) // block_size)
        if len(c.block_table) < need:
            raise ValueError(
                f"chunk {i}: block_table has {len(c.block_table)} blocks, "
                f"positions [0, {c.start_pos + len(c.token_ids)}) need {need}"
            )
        used = c.block_table[:need]
        if min(used) < 0 or max(used) >= num_blocks:  # C-speed check: this runs every step
            bad = [b for b in used if not 0 <= b < num_blocks]
            raise ValueError(f"chunk {i}: block ids {bad} out of range [0, {num_blocks})")


def prepare_batch(chunks: list[SequenceChunk], kv_cache: KVCache, device) -> Batch:
    """Flatten chunks into tensors on `device` (built on the host, copied once each)."""
    block_size, null_block = kv_cache.block_size, kv_cache.null_block
    input_ids, positions, slots, query_start, seq_lens = [], [], [], [0], []
    max_blocks = max(-(-(c.start_pos + len(c.token_ids)) // block_size) for c in chunks)
    tables = []
    for c in chunks:
        n = len(c.token_ids)
        input_ids += c.token_ids
        pos = range(c.start_pos, c.start_pos + n)
        positions += pos
        slots += [c.block_table[p // block_size] * block_size + p % block_size for p in pos]
        query_start.append(query_start[-1] + n)
        seq_lens.append(c.start_pos + n)
        used = c.block_table[: -(-(c.start_pos + n) // block_size)]
        tables.append(used + [null_block] * (max_blocks - len(used)))

    def tensor(x, dtype):
        return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)

    positions_t = tensor(positions, torch.int64)
    attn = AttentionMetadata(
        kv_cache=kv_cache,
        slot_mapping=tensor(slots, torch.int64),
        positions=positions_t,
        block_tables=tensor(tables, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        query_start_loc=tensor(query_start, torch.int32),
        is_decode=all(len(c.token_ids) == 1 for c in chunks),
        seq_lens_list=seq_lens,
        query_start_list=query_start,
    )
    return Batch(
        input_ids=tensor(input_ids, torch.int64),
        positions=positions_t,
        attn=attn,
        logits_indices=tensor([q - 1 for q in query_start[1:]], torch.int64),
    )
