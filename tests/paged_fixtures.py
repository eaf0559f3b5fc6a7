"""Tiny factories and invariant checks shared by the paged tests."""

from __future__ import annotations

from collections import Counter

from kvcore.paged import KVCacheManager
from kvcore.paged.cache import PagedKVCache


def tokens(start: int, n: int) -> list[int]:
    """n distinct token ids start, start+1, ... (distinct prompts never share a block hash)."""
    return list(range(start, start + n))


def small_manager(num_blocks: int = 10, block_size: int = 4, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, caching)


def small_cache(num_blocks: int = 12, block_size: int = 4, caching: bool = True) -> PagedKVCache:
    return PagedKVCache(num_blocks, block_size, num_layers=2, num_kv_heads=2, head_dim=4,
                        enable_prefix_caching=caching)


def snapshot(manager: KVCacheManager) -> tuple:
    """Everything observable about the manager, to check that a refused call changed nothing."""
    return (manager.free_block_queue(), [(b.ref_cnt, b.block_hash) for b in manager.blocks],
            {r: (manager.block_table(r), manager.token_ids(r)) for r in manager.request_ids()},
            manager.step, len(manager.events), manager.num_free_blocks)


def assert_consistent(manager: KVCacheManager) -> None:
    """Free xor referenced; ref_cnt = number of tables holding the block; hash index matches the blocks."""
    queue = manager.free_block_queue()
    assert len(queue) == len(set(queue)) == manager.num_free_blocks
    holders = Counter(b for r in manager.request_ids() for b in manager.block_table(r))
    for block in manager.blocks:
        assert (block.block_id in set(queue)) == (block.ref_cnt == 0), block
        assert block.ref_cnt == holders[block.block_id], block
    for rid in manager.request_ids():
        table = manager.block_table(rid)
        assert len(table) == -(-manager.num_tokens(rid) // manager.block_size)
        assert len(set(table)) == len(table), f"{rid} holds a block twice: {table}"
    indexed = {bid for entries in manager._cached.values() for bid in entries}
    assert indexed == {b.block_id for b in manager.blocks if b.block_hash is not None}
    for block_hash, entries in manager._cached.items():
        assert all(b.block_hash == block_hash for b in entries.values())
