"""Free-list allocator for the paged KV cache's physical blocks."""
from __future__ import annotations

from collections import deque


class BlockManager:
    """Hands out physical KV block ids in [0, num_blocks); a block has one owner at a time."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

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
            block = self._free.popleft()
            self._used.add(block)
            block_table.append(block)

    def free(self, block_table: list[int]) -> None:
        """Return every block of `block_table` to the free list and empty it."""
        for block in block_table:
            if block not in self._used:
                raise RuntimeError(f"double free of KV block {block}")
            self._used.remove(block)
            self._free.append(block)
        block_table.clear()
