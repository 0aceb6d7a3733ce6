"""Test doubles for the engine: a fake model runner and a tiny offline tokenizer.

FakeRunner has ModelRunner's interface. Its "KV cache" stores, per physical slot, the token and a
hash chain of the sequence up to it; every step it re-reads each sequence's whole history from the
cache through the block table and checks the chain, so a wrong block table, a wrong start_pos, a
block written while another sequence holds it or a block reused before it was freed shows up as an assertion
error (or as different logits, caught by comparing against a solo run). Logits are a
deterministic function of (history, position) only, never of the rest of the batch.
"""

from __future__ import annotations

import hashlib
import time

import torch

from athena_runtime.batch import SequenceChunk

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "Stop here. Do not go further than the end of the line.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u65e5\u672c\u8a9e \U0001f600 emoji and accents.",
    "Paged attention keeps the KV cache in blocks of sixteen tokens.",
]


def tiny_tokenizer():
    """A byte-level BPE trained on a few sentences (multi-byte characters span several tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _chain(prev: int, token: int, pos: int) -> int:
    digest = hashlib.blake2b(f"{prev}:{token}:{pos}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class FakeRunner:
    def __init__(
        self,
        vocab_size: int = 300,
        num_blocks: int = 64,
        block_size: int = 4,
        max_model_len: int = 256,
        banned: tuple[int, ...] = (),
        fail_when=None,
        delay_s: float = 0.0,
    ) -> None:
        self.vocab_size = vocab_size
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.banned = banned  # token ids whose logit is -inf (e.g. eos, for long runs)
        self.fail_when = fail_when  # callable(chunks) -> bool: raise RuntimeError in that step
        self.delay_s = delay_s  # sleep per step (async tests: keep requests in flight)
        self.kv: dict[tuple[int, int], tuple[int, int]] = {}  # (block, slot) -> (token, chain hash)
        self.calls: list[list[SequenceChunk]] = []

    def execute(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        assert chunks, "empty batch"
        self.calls.append(chunks)
        if self.delay_s:
            time.sleep(self.delay_s)
        bs = self.block_size
        # chunks may share cached prefix blocks (read-only), never a block one of them writes
        owned = [set(c.block_table[: -(-(c.start_pos + len(c.token_ids)) // bs)]) for c in chunks]
        written = [set(c.block_table[c.start_pos // bs : -(-(c.start_pos + len(c.token_ids)) // bs)]) for c in chunks]
        for i in range(len(chunks)):
            for j in range(len(chunks)):
                assert i == j or not written[i] & owned[j], f"chunk {i} writes KV blocks {written[i] & owned[j]} of {j}"
        if self.fail_when is not None and self.fail_when(chunks):
            raise RuntimeError("injected model failure")
        rows = []
        for c in chunks:
            end = c.start_pos + len(c.token_ids)
            assert len(c.block_table) * bs >= end, "block table too small"
            assert all(0 <= b < self.num_blocks for b in c.block_table), "block id out of range"
            h = 0
            for pos in range(c.start_pos):  # history already in the cache
                entry = self.kv.get((c.block_table[pos // bs], pos % bs))
                assert entry is not None, f"position {pos} was never written"
                token, stored = entry
                h = _chain(h, token, pos)
                assert stored == h, f"KV slot for position {pos} holds another sequence's token"
            for k, token in enumerate(c.token_ids):  # write the new tokens
                pos = c.start_pos + k
                h = _chain(h, token, pos)
                self.kv[(c.block_table[pos // bs], pos % bs)] = (token, h)
            g = torch.Generator().manual_seed(h & 0x7FFF_FFFF_FFFF_FFFF)
            rows.append(torch.randn(self.vocab_size, generator=g) * 3.0)
        logits = torch.stack(rows)
        if self.banned:
            logits[:, list(self.banned)] = float("-inf")
        return logits


def drain(core, max_steps: int = 10_000) -> dict[str, list]:
    """Step an EngineCore until idle; returns each request's outputs in order."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not core.has_work():
            return outputs
        for out in core.step():
            assert not (outputs.get(out.request_id) and outputs[out.request_id][-1].finished), "output after finish"
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def joined(outs: list) -> tuple[list[int], str, str | None]:
    """(all token ids, all text, finish reason) of one request's outputs."""
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1].finish_reason
