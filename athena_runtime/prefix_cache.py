"""Automatic prefix caching: full KV blocks, found by the hash chain of their tokens, reused across requests.

Block i of a sequence holds the K/V of its tokens [i·B, (i+1)·B). Its key is

    key_i = BLAKE2b-128(key_{i-1} ‖ tokens of block i)        key_{-1} = `root`

so two sequences whose keys agree up to block i have the same tokens up to the end of block i, hence
the same K/V there: a token's K/V depend on it and the tokens before it only. Anything else that
changed them (an adapter, image embeddings) would go into `root` or into the chain. The hash is
cryptographic so that no client can make its prefix collide with another's.

A block enters the cache once it is full and its K/V are all computed; from then on nobody writes it
(a sequence only writes past its last cached block). The block manager keeps cached blocks nobody
holds until it needs them for new contents, least recently released first (`block_manager.py`).
"""

from __future__ import annotations

import array
import hashlib

from athena_runtime.sequence import Sequence


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array.array("q", tokens).tobytes(), digest_size=16).digest()


class PrefixCache:
    """Key -> block of the cached blocks, and hit counts in tokens."""

    def __init__(self, block_size: int, root: bytes = b"") -> None:
        self.block_size = block_size
        self.root = root
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self.queries = 0  # prompt tokens looked up at admission (again after a preemption)
        self.hits = 0  # of those, tokens found cached

    def keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The keys of `seq`'s first `num_blocks` (full) blocks, computed once per sequence."""
        keys, bs = seq.block_hashes, self.block_size
        if len(keys) < num_blocks:
            tokens = seq.token_ids
            for i in range(len(keys), num_blocks):
                keys.append(block_key(keys[-1] if keys else self.root, tokens[i * bs : (i + 1) * bs]))
        return keys[:num_blocks]

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks of `seq`'s longest cached prefix; its last token is never among them, so
        at least that one is computed and gives the logits of the next token."""
        blocks = []
        for key in self.keys(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def insert(self, seq: Sequence, first: int, end: int) -> None:
        """Cache `seq`'s blocks [first, end), now full and computed. A block whose key is cached already
        (the same prefix computed twice at once) stays out: it is freed like any other."""
        for i, key in enumerate(self.keys(seq, end)[first:], start=first):
            block = seq.block_table[i]
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def evict(self, block: int) -> None:
        """Forget `block` (it is about to get new contents); nothing happens if it is not cached."""
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]

    def record(self, queried_tokens: int, hit_tokens: int) -> None:
        self.queries += queried_tokens
        self.hits += hit_tokens

    @property
    def num_blocks(self) -> int:
        return len(self._block_of)
