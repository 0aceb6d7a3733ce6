"""Continuous batching: which tokens of which sequences the next model step feeds.

Each step builds one batch within `max_num_seqs` sequences and `max_num_batched_tokens` tokens:
1. running decodes, oldest first (a decode that needs a new KV block and finds none preempts the
   most recently admitted sequence: its blocks are freed and it goes back to the front of the
   waiting queue, to recompute its prompt + generated tokens when it is admitted again, from its
   blocks still in the prefix cache if any);
2. the next chunk of running sequences still prefilling (chunked prefill: a long prompt takes
   several steps); while 1. scheduled any decode, the prompt tokens of 2. and 3. together stay
   within `prefill_chunk_tokens`, so a long prompt delays the running streams by one chunk a step;
3. waiting sequences, first come first served, admitted while a sequence slot and KV blocks for
   all their tokens are free. The queue head is never overtaken, so nobody starves. A sequence
   starts on the blocks of its longest cached prefix (`prefix_cache.py`): computed already, and
   shared, they need no free block.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from athena_runtime.block_manager import BlockManager
from athena_runtime.sequence import Sequence, SequenceStatus


class ScheduledChunk(NamedTuple):
    seq: Sequence
    num_tokens: int  # tokens of seq fed this step, from seq.num_computed on


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_chunk_tokens: int | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens or max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        batch: list[ScheduledChunk] = []
        preempted = False
        for seq in list(self.running):  # 1. decodes
            num_tokens = seq.num_tokens
            if seq.status is not SequenceStatus.RUNNING or num_tokens - seq.num_computed != 1 or budget == 0:
                continue
            if bm.blocks_for(num_tokens) > len(seq.block_table):  # needs a new block (1 step in block_size)
                while not bm.can_grow(seq.block_table, num_tokens):
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                bm.grow(seq.block_table, num_tokens)
            batch.append(ScheduledChunk(seq, 1))
            budget -= 1
        prefill = min(budget, self.prefill_chunk_tokens) if batch else budget  # prompt tokens this step
        for seq in self.running:  # 2. prefill chunks in progress
            if seq.num_uncomputed > 1 and prefill > 0:
                n = min(seq.num_uncomputed, prefill)
                batch.append(ScheduledChunk(seq, n))
                prefill -= n
        while (
            self.waiting
            and not preempted
            and prefill > 0  # 3. admissions, FCFS
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            cached = bm.cached_prefix(seq)
            if not bm.can_allocate(seq.num_tokens, cached):
                break
            self.waiting.popleft()
            bm.allocate(seq.block_table, seq.num_tokens, cached)
            seq.num_computed = len(cached) * bm.block_size
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, prefill)
            batch.append(ScheduledChunk(seq, n))
            prefill -= n
        return batch

    def advance(self, batch: list[ScheduledChunk]) -> list[Sequence]:
        """Record that the batch ran; returns the sequences whose next token is now due."""
        due = []
        for seq, n in batch:
            seq.num_computed += n
            self.block_manager.cache_computed(seq, seq.num_computed - n)
            if seq.num_uncomputed == 0:
                due.append(seq)
        return due

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (done, cancelled or failed) and free its KV blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.requests.pop(seq.request_id, None)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
