"""KV cache blocks and the free block queue (vLLM v1 ``KVCacheBlock`` / ``FreeKVCacheBlockQueue``).

Every block is created once, when the pool is built. The free block queue is a doubly linked list
threaded through the blocks themselves, so removing a block from the middle (a prefix-cache hit on
an evictable block) and popping from the head are both O(1) without allocating Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One physical block of ``block_size`` token slots.

    block_id: index into the KV pools, 0 .. num_blocks - 1 (or -1 for the queue's sentinels).
    ref_cnt: number of block tables holding this block; 0 means it sits in the free block queue.
    block_hash: set when the block becomes full and is cached; reset when it is evicted.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_id, int) or self.block_id < -1:
            raise ValueError(f"block_id must be an int >= 0 (or -1 for a sentinel), got {self.block_id!r}")

    @property
    def is_free(self) -> bool:
        """True while the block is in the free block queue (possibly still cached)."""
        return self.prev_free is not None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash})"


class FreeKVCacheBlockQueue:
    """Free blocks in eviction order: the head is evicted (reused) first.

    Follows vLLM v1: starts ordered by block id; freed blocks are appended at the tail, so the head
    is the least recently used. The manager appends a request's blocks in reverse order, so that
    among blocks freed together the tail of the hash chain is evicted first.
    """

    __slots__ = ("_head", "_tail", "num_free_blocks")

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        """Remove and return the head (least recently used) block; ValueError when empty."""
        block = self._head.next_free
        if block is self._tail or block is None:
            raise ValueError("no free blocks in the free block queue")
        self._head.next_free = block.next_free
        block.next_free.prev_free = self._head  # type: ignore[union-attr]
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1
        return block

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink a block from anywhere in the queue in O(1) (a prefix hit on a free block)."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise RuntimeError(f"block {block.block_id} is not in the free block queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Put a block at the tail (evicted last)."""
        if block.prev_free is not None:
            raise RuntimeError(f"block {block.block_id} is already in the free block queue")
        last = self._tail.prev_free
        last.next_free = block  # type: ignore[union-attr]
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def prepend(self, blocks: list[KVCacheBlock]) -> None:
        """Put blocks at the head in the given order (``blocks[0]`` is reused first): vLLM's ``prepend_n``."""
        for block in reversed(blocks):
            if block.prev_free is not None:
                raise RuntimeError(f"block {block.block_id} is already in the free block queue")
            first = self._head.next_free
            block.prev_free, block.next_free = self._head, first
            first.prev_free = block  # type: ignore[union-attr]
            self._head.next_free = block
            self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        """Block ids from head (evicted first) to tail; O(num_free_blocks), for views and tests."""
        ids = []
        block = self._head.next_free
        while block is not None and block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids
