"""The paged KV cache's physical blocks: reference counts, the free list, and the optional prefix cache."""

from __future__ import annotations

from collections import OrderedDict

from athena_runtime.prefix_cache import PrefixCache
from athena_runtime.sequence import Sequence


class BlockManager:
    """Hands out physical KV block ids in [0, num_blocks).

    A block is used while some block table holds it: one table, or several sharing a cached prefix
    block (read-only). Free blocks wait in `_free` in the order they are reused: blocks holding
    nothing first, then cached blocks, least recently released first. Reusing a cached block evicts
    it from the prefix cache.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: PrefixCache | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self.num_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(block_table) <= len(self._free)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Append blocks to `block_table` (in place) until it covers `num_tokens` tokens."""
        missing = self.blocks_for(num_tokens) - len(block_table)
        if missing > len(self._free):
            raise RuntimeError(f"KV cache out of blocks: need {missing}, {len(self._free)} free")
        for _ in range(missing):
            block, _ = self._free.popitem(last=False)
            if self.prefix_cache is not None:
                self.prefix_cache.evict(block)
            self._hold(block)
            block_table.append(block)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks of `seq`'s longest cached prefix ([] without a prefix cache)."""
        return [] if self.prefix_cache is None else self.prefix_cache.match(seq)

    def can_allocate(self, num_tokens: int, cached: list[int]) -> bool:
        """Whether a new sequence of `num_tokens` tokens whose prefix is in the `cached` blocks fits."""
        revived = sum(1 for block in cached if self._refs[block] == 0)  # cached, nobody holds them
        return self.blocks_for(num_tokens) - len(cached) + revived <= len(self._free)

    def allocate(self, block_table: list[int], num_tokens: int, cached: list[int]) -> None:
        """Fill an empty `block_table` for `num_tokens` tokens: the `cached` prefix blocks, then new ones."""
        for block in cached:
            if self._refs[block] == 0:
                del self._free[block]
            self._hold(block)
        block_table.extend(cached)
        self.grow(block_table, num_tokens)
        if self.prefix_cache is not None:
            self.prefix_cache.record(num_tokens, len(cached) * self.block_size)

    def cache_computed(self, seq: Sequence, computed_before: int) -> None:
        """Offer the blocks `seq` filled since it had `computed_before` tokens computed to the prefix cache."""
        first, end = computed_before // self.block_size, seq.num_computed // self.block_size
        if self.prefix_cache is not None and end > first:
            self.prefix_cache.insert(seq, first, end)

    def free(self, block_table: list[int]) -> None:
        """Release every block of `block_table` and empty it. The last blocks go first, so a prefix's
        deepest blocks are evicted before the blocks they extend."""
        for block in reversed(block_table):
            if self._refs[block] == 0:
                raise RuntimeError(f"double free of KV block {block}")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self.num_used -= 1
                self._free[block] = None
                if self.prefix_cache is None or not self.prefix_cache.is_cached(block):
                    self._free.move_to_end(block, last=False)  # holds nothing worth keeping: reuse first
        block_table.clear()

    def _hold(self, block: int) -> None:
        self._refs[block] += 1
        if self._refs[block] == 1:
            self.num_used += 1
