"""The block manager pinned step by step: exact block ids, ref counts, queue order, hashes and the event log.

Each test is a tiny pool (2-token blocks, a handful of blocks) narrated like vLLM's prefix-caching design
document; every number is counted by hand. ``NaiveManager`` at the end is a brute-force model of the free
block queue and the prefix cache (plain lists) that random sequences of calls must agree with, id for id.
"""

from __future__ import annotations

import random
import re

import pytest

from kvcore.paged import KVCacheManager
from kvcore.paged.hashing import hash_block_tokens
from kvcore.paged.manager import RequestBlocks
from tests.paged_fixtures import assert_consistent, snapshot


def exactly(message: str) -> str:
    """A ``pytest.raises`` pattern that matches the whole message, not a part of it."""
    return f"^{re.escape(message)}$"


def log(m: KVCacheManager) -> list[tuple]:
    """The event log as (step, kind, request, block, hash, detail) tuples."""
    return [(e.step, e.kind, e.request_id, e.block_id, e.block_hash, e.detail) for e in m.events]


def h(*blocks: list[int]) -> int:
    """The chained hash of the last of ``blocks`` (each a list of token ids)."""
    parent = None
    for block in blocks:
        parent = hash_block_tokens(parent, block)
    return parent


# ------------------------------------------------------------------------------------------ settings
def test_defaults_cache_prefixes_log_events_and_hand_out_every_block():
    m = KVCacheManager(3, 2)
    assert (m.num_blocks, m.block_size, m.num_usable_blocks) == (3, 2, 3)
    assert m.enable_prefix_caching is True
    assert m.log_events is True
    assert m.null_block is None
    assert m.prepend_unhashed is False
    assert m.on_copy is None
    assert (m.step, m.events, m.num_free_blocks, m.usage) == (0, [], 3, 0.0)
    assert m.free_block_queue() == [0, 1, 2]
    assert [(b.block_id, b.ref_cnt, b.block_hash) for b in m.blocks] == [(0, 0, None), (1, 0, None), (2, 0, None)]


def test_smallest_pools_and_exact_messages():
    assert KVCacheManager(1, 1).num_usable_blocks == 1
    assert KVCacheManager(2, 1, null_block=True).num_usable_blocks == 1
    with pytest.raises(ValueError, match=exactly("num_blocks must be an integer >= 1, got 0")):
        KVCacheManager(0, 4)
    with pytest.raises(ValueError, match=exactly("num_blocks must be an integer >= 2 (one is the null block), got 1")):
        KVCacheManager(1, 4, null_block=True)
    with pytest.raises(ValueError, match=exactly("num_blocks must be an integer >= 1, got 4.0")):
        KVCacheManager(4.0, 4)
    with pytest.raises(ValueError, match=exactly("block_size must be an integer >= 1, got 0")):
        KVCacheManager(4, 0)
    with pytest.raises(ValueError, match=exactly("block_size must be an integer >= 1, got 2.0")):
        KVCacheManager(4, 2.0)


def test_block_ids_outside_the_pool_are_refused_with_the_range():
    m = KVCacheManager(3, 2)
    assert m.block(0).block_id == 0
    assert m.block(2).block_id == 2
    assert m.ref_cnt(2) == 0
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=exactly(f"block_id must be in 0..2, got {bad}")):
            m.block(bad)


def test_unknown_requests_name_the_live_ones():
    m = KVCacheManager(4, 2)
    m.allocate("a", [1])
    with pytest.raises(KeyError, match=exactly(repr("unknown request 'zz'; live requests: ['a']"))):
        m.block_table("zz")
    with pytest.raises(ValueError, match=exactly("request 'a' is already allocated; free it first or use a new id")):
        m.allocate("a", [2])
    with pytest.raises(ValueError, match=exactly("a prompt needs at least one token")):
        m.allocate("b", [])
    with pytest.raises(ValueError, match=exactly("request 'a' already exists; fork into a new id")):
        m.fork("a", "a")


# ------------------------------------------------------------------------------------------ the event log
def test_allocate_fork_copy_on_write_free_and_hit_narrated_event_by_event():
    """6 blocks of 2 tokens. Every event of every step, with its hash and detail."""
    copies = []
    m = KVCacheManager(6, 2, on_copy=lambda src, dst: copies.append((src, dst)))
    h0, h1 = h([1, 2]), h([1, 2], [3, 4])

    # Step 1: a 3-token prompt takes blocks 0 and 1 from the head; block 0 is full and cached.
    assert m.allocate("a", [1, 2, 3]) == [0, 1]
    # Step 2: b shares both blocks (ref_cnt 2 each).
    m.fork("a", "b")
    assert [m.ref_cnt(0), m.ref_cnt(1)] == [2, 2]
    assert m.token_ids("b") == [1, 2, 3]
    # Step 3: b writes into shared, half-full block 1: it is copied into block 2 first, then block 2 fills
    # (tokens 3, 4 after block 0) and is cached.
    assert m.append("b", [4]) == [0, 2]
    assert copies == [(1, 2)]
    assert [m.ref_cnt(b) for b in range(4)] == [2, 1, 1, 0]
    # Step 4: a finishes. Block 1 (ref_cnt 1 -> 0) goes to the tail; block 0 is still held by b.
    m.free("a")
    assert m.free_block_queue() == [3, 4, 5, 1]
    # Step 5: c = b's 4 tokens + 1: both full blocks hit (4 of 5 tokens; the 5th is computed in block 3).
    assert m.allocate("c", [1, 2, 3, 4, 5]) == [0, 2, 3]
    assert m.num_cached_tokens("c") == 4
    assert [m.ref_cnt(b) for b in range(4)] == [2, 0, 2, 1]
    # Step 6: b's fifth token opens block 4 (the head of the queue 4 5 1).
    assert m.append("b", [5]) == [0, 2, 4]
    # Step 7: a fork inherits the hits its parent was served.
    m.fork("c", "d")
    assert m.num_cached_tokens("d") == 4

    assert log(m) == [
        (1, "allocate", "a", 0, None, ""),
        (1, "allocate", "a", 1, None, ""),
        (1, "cache", "a", 0, h0, "full"),
        (2, "fork", "b", 0, h0, "from a, ref_cnt=2"),
        (2, "fork", "b", 1, None, "from a, ref_cnt=2"),
        (3, "allocate", "b", 2, None, ""),
        (3, "copy_on_write", "b", 2, None, "1 -> 2, shared ref_cnt=1"),
        (3, "cache", "b", 2, h1, "full"),
        (4, "free", "a", 1, None, "to free queue"),
        (4, "free", "a", 0, h0, "still held, ref_cnt=1"),
        (5, "hit", "c", 0, h0, "ref_cnt=2"),
        (5, "hit", "c", 2, h1, "ref_cnt=2"),
        (5, "allocate", "c", 3, None, ""),
        (6, "allocate", "b", 4, None, ""),
        (7, "fork", "d", 0, h0, "from c, ref_cnt=3"),
        (7, "fork", "d", 2, h1, "from c, ref_cnt=3"),
        (7, "fork", "d", 3, None, "from c, ref_cnt=2"),
    ]
    assert m.step == 7
    assert m.num_cached_blocks == 2
    assert m.block_owners() == {0: ["b", "c", "d"], 2: ["b", "c", "d"], 4: ["b"], 3: ["c", "d"]}
    assert_consistent(m)


def test_reusing_a_cached_block_evicts_it_and_a_recomputed_block_is_a_duplicate():
    """3 blocks of 2 tokens: a cached block popped from the head loses its hash ("evict")."""
    m = KVCacheManager(3, 2)
    h0 = h([7, 8])
    m.allocate("a", [7, 8])  # a fully cached prompt: block 0, cached
    m.free("a")  # queue 1 2 0: block 0 keeps its hash at the tail
    assert m.free_block_queue() == [1, 2, 0]
    assert m.num_cached_blocks == 1
    # The same 2 tokens again: at most 1 token may hit, so no whole block hits; block 1 is computed and
    # cached as a duplicate of block 0 (same hash, two blocks).
    assert m.get_computed_blocks([7, 8]) == ([], 0)
    assert m.allocate("b", [7, 8]) == [1]
    assert m.block(1).block_hash == m.block(0).block_hash == h0
    assert m.num_cached_blocks == 2
    # A 6-token prompt needs 3 blocks: 2 then 0 (cached: evicted); b's block 1 is still held.
    assert not m.can_allocate(7)
    assert m.can_allocate(6) is False  # 3 blocks, 2 free
    m.free("b")
    assert m.can_allocate(6)
    # b's block 1 went to the tail: queue 2 0 1. A lookup hits the first cached copy of [7, 8]: block 0.
    assert m.get_computed_blocks([7, 8, 9]) == ([0], 2)
    assert m.allocate("c", [1, 2, 3, 4, 5, 6]) == [2, 0, 1]
    assert m.num_cached_blocks == 3
    assert [e for e in log(m) if e[0] == 5] == [
        (5, "allocate", "c", 2, None, ""),
        (5, "evict", "c", 0, h0, "LRU head was cached"),
        (5, "allocate", "c", 0, None, ""),
        (5, "evict", "c", 1, h0, "LRU head was cached"),
        (5, "allocate", "c", 1, None, ""),
        (5, "cache", "c", 2, h([1, 2]), "full"),
        (5, "cache", "c", 0, h([1, 2], [3, 4]), "full"),
        (5, "cache", "c", 1, h([1, 2], [3, 4], [5, 6]), "full"),
    ]
    assert [e.detail for e in m.events if e.kind == "cache"][:2] == ["full", "duplicate"]
    assert m.get_computed_blocks([7, 8, 9]) == ([], 0)  # both copies are gone
    assert_consistent(m)


def test_quiet_manager_logs_nothing_but_counts_steps():
    m = KVCacheManager(4, 2, log_events=False)
    m.allocate("a", [1, 2, 3])
    m.fork("a", "b")
    m.append("b", [4])
    m.free("a")
    m.free("b")
    m.allocate("c", [1, 2, 3])
    assert m.events == []
    assert m.step == 6


# ------------------------------------------------------------------------------------------ allocation
def test_hits_stop_at_the_first_missing_block_and_leave_the_last_token():
    m = KVCacheManager(10, 2)
    m.allocate("a", [1, 2, 3, 4, 5, 6, 7])  # blocks 0 1 2 cached, 3 partial
    assert m.get_computed_blocks([1, 2, 3, 4, 5, 6, 7, 8]) == ([0, 1, 2], 6)
    assert m.get_computed_blocks([1, 2, 3, 4, 5, 6]) == ([0, 1], 4)  # 5 of 6 tokens may hit: 2 blocks
    assert m.get_computed_blocks([1, 2, 9, 9, 5, 6, 7]) == ([0], 2)  # block 2 matches, its parent does not
    assert m.get_computed_blocks([9, 2, 3, 4]) == ([], 0)
    assert m.get_computed_blocks([]) == ([], 0)
    off = KVCacheManager(10, 2, enable_prefix_caching=False)
    off.allocate("a", [1, 2, 3, 4, 5])
    assert off.get_computed_blocks([1, 2, 3, 4, 5]) == ([], 0)
    assert off.num_cached_blocks == 0


def test_an_exact_fit_is_allocated_and_one_block_more_is_refused():
    m = KVCacheManager(3, 2)
    assert m.can_allocate(6)
    assert not m.can_allocate(7)
    before = snapshot(m)
    assert m.allocate("a", [1, 2, 3, 4, 5, 6, 7]) is None
    assert snapshot(m) == before
    assert m.allocate("a", [1, 2, 3, 4, 5, 6]) == [0, 1, 2]
    assert (m.num_free_blocks, m.usage, m.step) == (0, 1.0, 1)


def test_evictable_hits_count_against_the_free_blocks_and_held_hits_do_not():
    m = KVCacheManager(4, 2)
    m.allocate("a", [1, 2, 3, 4, 5])  # blocks 0 1 2; 0 and 1 cached
    m.free("a")  # queue 3 2 1 0
    # 2 evictable hits + 1 new block = 3 <= 4 free; 2 hits + 3 new = 5 > 4 would not fit.
    assert m.allocate("b", [1, 2, 3, 4, 9, 9, 9, 9, 9]) is None
    assert m.allocate("b", [1, 2, 3, 4, 9]) == [0, 1, 3]
    assert m.free_block_queue() == [2]
    # c hits the same blocks while b holds them: only its one new block counts against the 1 free block.
    assert m.allocate("c", [1, 2, 3, 4, 8]) == [0, 1, 2]
    assert [m.ref_cnt(b) for b in range(4)] == [2, 2, 1, 1]
    assert_consistent(m)


def test_fit_tokens_reserves_room_for_the_whole_sequence_but_allocates_the_chunk():
    m = KVCacheManager(4, 2)
    # A 3-token chunk of a 8-token sequence: 4 blocks must be free, 2 are taken.
    assert m.allocate("a", [1, 2, 3], fit_tokens=8) == [0, 1]
    assert m.num_free_blocks == 2
    assert m.allocate("b", [5], fit_tokens=5) is None  # 3 blocks for 5 tokens > 2 free
    assert m.allocate("b", [5], fit_tokens=4) == [2]
    assert m.allocate("c", [6, 7], fit_tokens=None) == [3]
    # A hit lowers what must fit, but a hit on a free block takes it from the queue. a's blocks go back
    # (queue 1 0, block 0 cached): [1, 2, 9] hits block 0, so a 6-token fit needs 2 more blocks + block 0
    # = 3 > 2 free; a 4-token fit needs 1 + block 0 = 2.
    m.free("a")
    assert m.allocate("d", [1, 2, 9], fit_tokens=6) is None
    assert m.allocate("d", [1, 2, 9], fit_tokens=4) == [0, 1]
    assert m.num_cached_tokens("d") == 2


def test_prefix_caching_off_pops_fresh_blocks_and_never_hashes():
    m = KVCacheManager(4, 2, enable_prefix_caching=False)
    m.allocate("a", [1, 2, 3])
    m.append("a", [4, 5])
    m.cache_blocks("a", 5)
    assert m.block_table("a") == [0, 1, 2]
    assert all(b.block_hash is None for b in m.blocks)
    assert [e.kind for e in m.events] == ["allocate", "allocate", "allocate"]


# ------------------------------------------------------------------------------------------ append
def test_append_pops_exactly_the_blocks_the_new_tokens_need():
    m = KVCacheManager(5, 2)
    m.allocate("a", [1])
    assert m.append("a", []) == [0]
    assert m.step == 1  # an empty append is not a step
    assert m.can_append("a", 1)
    assert m.append("a", [2]) == [0]  # fills block 0
    assert m.block(0).block_hash == h([1, 2])
    assert m.append("a", [3, 4, 5]) == [0, 1, 2]  # 5 tokens: 3 blocks
    assert m.block(1).block_hash == h([1, 2], [3, 4])
    assert m.block(2).block_hash is None
    assert m.num_tokens("a") == 5
    assert m.step == 3
    # 2 free blocks: 1 more token fits block 2, 5 more need 3 blocks (2 new + the slot in block 2 = 4 fit).
    assert m.can_append("a", 0)
    assert m.can_append("a", 5)
    assert not m.can_append("a", 6)
    assert m.append("a", [6, 7, 8, 9, 10, 11]) is None
    assert m.append("a", [6, 7, 8, 9, 10]) == [0, 1, 2, 3, 4]
    assert m.num_free_blocks == 0
    assert_consistent(m)


def test_copy_on_write_counts_one_block_and_only_for_a_shared_partial_block():
    m = KVCacheManager(4, 2)
    m.allocate("p", [1, 2, 3])  # blocks 0 (full) 1 (half)
    m.fork("p", "c")
    # c's write needs a copy of block 1 (1 block) and then fits: 2 free blocks.
    assert m.can_append("c", 1)
    assert m.can_append("c", 3)  # copy + 1 new block
    assert not m.can_append("c", 4)  # copy + 2 new blocks > 2
    assert m.append("c", [4, 5, 6, 7]) is None
    assert m.append("c", [4, 5, 6]) == [0, 2, 3]
    # p now holds block 1 alone: it writes in place, no copy, no block needed.
    assert m.ref_cnt(1) == 1
    assert m.can_append("p", 1)
    assert m.append("p", [9]) == [0, 1]
    # A shared *full* block is never copied: c goes (queue 3 2), p is forked and the fork opens a new block.
    m.free("c")
    assert m.free_block_queue() == [3, 2]
    m.fork("p", "q")
    assert m.append("q", [5]) == [0, 1, 3]
    assert [m.ref_cnt(b) for b in range(4)] == [2, 2, 0, 1]
    assert_consistent(m)


def test_can_append_counts_zero_one_and_full_shared_blocks():
    m = KVCacheManager(3, 2)
    m.allocate("p", [1, 2, 3, 4])  # two full blocks; 1 block free
    m.fork("p", "q")
    assert m.can_append("q")  # a shared *full* last block is not copied: 1 new block, 1 free
    assert m.can_append("q", 2)
    assert not m.can_append("q", 3)
    m.allocate("r", [9])  # the last free block
    assert m.can_append("q", 0)  # nothing to add always fits
    assert not m.can_append("q")  # one token needs a block and none is free
    assert m.can_append("r")  # the default is one token: it fits block 2's second slot
    assert not m.can_append("r", 2)
    m.fork("r", "s")  # now block 2 is shared and half full: a write must copy it first, and nothing is free
    assert m.can_append("s", 0)  # no write, no copy
    assert not m.can_append("s")


def test_copy_on_write_replaces_only_the_last_table_entry():
    """A parent of 5 tokens (blocks 0 1 2, the last half full) forked twice: ref_cnt 3 each. The first write
    by a child copies block 2 into block 3 (ref_cnt 3 -> 2) and replaces only the last entry."""
    m = KVCacheManager(5, 2)
    m.allocate("p", [1, 2, 3, 4, 5])
    m.fork("p", "a")
    m.fork("p", "b")
    assert [m.ref_cnt(x) for x in range(3)] == [3, 3, 3]
    assert m.append("a", [6]) == [0, 1, 3]
    assert [m.ref_cnt(x) for x in range(4)] == [3, 3, 2, 1]
    assert m.block_table("p") == m.block_table("b") == [0, 1, 2]
    assert m.append("b", [7]) == [0, 1, 4]
    assert [m.ref_cnt(x) for x in range(5)] == [3, 3, 1, 1, 1]
    assert [e.detail for e in m.events if e.kind == "copy_on_write"] == [
        "2 -> 3, shared ref_cnt=2", "2 -> 4, shared ref_cnt=1"]


def test_request_blocks_find_the_first_placeholder():
    req = RequestBlocks([], [], [None, 1, None], [])
    assert req.num_known == 3  # nothing marked yet
    req.find_unknown()
    assert (req.unknown_from, req.num_known) == (0, 0)
    req.find_unknown(1)
    assert req.unknown_from == 2
    req.find_unknown(3)
    assert (req.unknown_from, req.num_known) == (None, 3)


# ------------------------------------------------------------------------------------------ free order
def test_free_sends_blocks_to_the_tail_in_reverse_table_order():
    m = KVCacheManager(6, 2)
    m.allocate("a", [1, 2, 3])  # 0 1
    m.allocate("b", [4, 5, 6])  # 2 3
    m.free("b")
    assert m.free_block_queue() == [4, 5, 3, 2]
    m.free("a")
    assert m.free_block_queue() == [4, 5, 3, 2, 1, 0]
    assert m.request_ids() == []
    assert not m.has_request("a")


def test_prepend_unhashed_sends_partial_blocks_to_the_head_in_table_order_reversed():
    """vLLM 0.33's BlockPool.free_blocks: unhashed blocks are reused first."""
    m = KVCacheManager(7, 2, prepend_unhashed=True)
    m.allocate("a", [1, 2, 3, 4, 5])  # 0 1 cached, 2 partial
    m.allocate("b", [9, 9, 9])  # 3 cached, 4 partial
    m.free("a")
    # reversed table: 2 (unhashed: head), 1, 0 (hashed: tail)
    assert m.free_block_queue() == [2, 5, 6, 1, 0]
    m.free("b")
    assert m.free_block_queue() == [4, 2, 5, 6, 1, 0, 3]
    off = KVCacheManager(7, 2, enable_prefix_caching=False, prepend_unhashed=True)
    off.allocate("a", [1, 2, 3, 4, 5])
    off.free("a")  # nothing is hashed: all to the head, in reverse table order
    assert off.free_block_queue() == [2, 1, 0, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------ null block, window
def test_null_block_is_never_handed_out_nor_counted():
    m = KVCacheManager(4, 2, null_block=True)
    assert m.null_block is m.blocks[0]
    assert m.num_usable_blocks == 3
    assert m.free_block_queue() == [1, 2, 3]
    assert m.allocate("a", [1, 2, 3]) == [1, 2]
    assert m.usage == pytest.approx(2 / 3)
    assert m.can_allocate(2)
    assert not m.can_allocate(3)
    m.free("a")
    assert m.free_block_queue() == [3, 2, 1]
    assert m.ref_cnt(0) == 0


def test_blocks_outside_a_sliding_window_go_back_and_become_the_null_block():
    m = KVCacheManager(6, 2, null_block=True)
    m.allocate("w", [1, 2, 3, 4, 5, 6, 7])  # blocks 1 2 3 4; 1 2 3 cached
    m.fork("w", "x")  # every block held twice
    step = m.step
    # Tokens before position 5 are outside the window: blocks 0 and 1 of the table (positions 0..3).
    assert m.free_blocks_before("w", 5) == 2
    assert m.block_table("w") == [0, 0, 3, 4]
    assert m.step == step + 1
    assert [m.ref_cnt(b) for b in (1, 2)] == [1, 1]  # x still holds them
    assert m.free_block_queue() == [5]
    assert m.block_owners() == {1: ["x"], 2: ["x"], 3: ["w", "x"], 4: ["w", "x"]}
    # Again: nothing new is released and the step does not move.
    assert m.free_blocks_before("w", 5) == 0
    assert m.step == step + 1
    m.free("x")  # of x's blocks 4 3 2 1 (reverse order) only 2 and 1 reach ref_cnt 0
    assert m.free_block_queue() == [5, 2, 1]
    # Now the window releases block 3 (positions 4, 5) and it goes to the tail (it is cached).
    assert m.free_blocks_before("w", 7) == 1
    assert m.free_block_queue() == [5, 2, 1, 3]
    h1, h2, h3 = h([1, 2]), h([1, 2], [3, 4]), h([1, 2], [3, 4], [5, 6])
    assert [e for e in log(m) if e[1] == "free" and e[2] == "w"] == [
        (step + 1, "free", "w", 1, h1, "outside the sliding window"),
        (step + 1, "free", "w", 2, h2, "outside the sliding window"),
        (step + 3, "free", "w", 3, h3, "outside the sliding window"),
    ]
    # Freeing w skips its null entries: only block 4 goes back.
    m.free("w")
    assert m.free_block_queue() == [5, 2, 1, 3, 4]
    assert m.ref_cnt(0) == 0
    assert m.request_ids() == []


def test_a_window_larger_than_the_table_releases_every_block_and_unhashed_ones_go_first():
    m = KVCacheManager(5, 2, null_block=True, prepend_unhashed=True)
    m.allocate("w", [1, 2, 3])  # 1 (cached) 2 (partial)
    assert m.free_blocks_before("w", 100) == 2
    assert m.block_table("w") == [0, 0]
    assert m.free_block_queue() == [2, 3, 4, 1]


def test_the_window_needs_the_null_block():
    m = KVCacheManager(4, 2)
    m.allocate("w", [1, 2, 3])
    message = "releasing blocks outside a sliding window needs the null block (null_block=True)"
    with pytest.raises(ValueError, match=exactly(message)):
        m.free_blocks_before("w", 2)


# ------------------------------------------------------------------------------------------ reserved slots
def test_a_reserved_slot_holds_back_hashing_until_its_token_is_filled():
    """An asynchronous scheduler appends a placeholder (None) for a sample in flight."""
    m = KVCacheManager(6, 2)
    m.allocate("a", [1, 2, 3])
    assert m.append("a", [None]) == [0, 1]  # block 1 is full of slots but token 3's id is unknown
    assert m.block(1).block_hash is None
    assert m.append("a", [None]) == [0, 1, 2]  # a second placeholder: the first one still rules
    m.fill("a", 4, [5])  # the later slot first: block 1 still waits for position 3
    m.cache_blocks("a", 5)
    assert m.block(1).block_hash is None
    m.fill("a", 3, [4])
    assert m.token_ids("a") == [1, 2, 3, 4, 5]
    m.cache_blocks("a", 3)  # only the first 3 tokens: nothing new is full
    assert m.block(1).block_hash is None
    m.cache_blocks("a", 4)
    assert m.block(1).block_hash == h([1, 2], [3, 4])
    assert log(m)[-1] == (3, "cache", "a", 1, h([1, 2], [3, 4]), "full")  # filling and caching are not steps
    assert m.get_computed_blocks([1, 2, 3, 4, 5]) == ([0, 1], 4)


def test_cache_blocks_stops_at_the_first_unknown_slot():
    m = KVCacheManager(6, 2)
    m.allocate("a", [1])
    m.append("a", [2, 3, None, 5, 6])  # positions 3 is unknown: only block 0 is hashed
    assert [m.block(b).block_hash is not None for b in range(3)] == [True, False, False]
    m.cache_blocks("a", 6)
    assert m.block(1).block_hash is None
    m.fill("a", 3, [4])
    m.cache_blocks("a", 6)
    assert [m.block(b).block_hash for b in range(3)] == [h([1, 2]), h([1, 2], [3, 4]), h([1, 2], [3, 4], [5, 6])]


def test_fill_checks_the_slots_it_writes():
    m = KVCacheManager(6, 2)
    m.allocate("a", [1, 2, 3])
    m.append("a", [None, None])
    m.fill("a", 3, [4, 5])  # the last two slots exactly
    assert m.token_ids("a") == [1, 2, 3, 4, 5]
    m.fill("a", 0, [1])
    for position, ids in ((4, [7, 8]), (-1, [7]), (5, [7])):
        message = f"request 'a' holds 5 slots; cannot fill {len(ids)} from position {position}"
        with pytest.raises(ValueError, match=exactly(message)):
            m.fill("a", position, ids)


def test_a_fork_inherits_the_reserved_slot():
    m = KVCacheManager(6, 2)
    m.allocate("a", [1, 2, 3])
    m.append("a", [None])
    m.fork("a", "b")
    m.cache_blocks("b", 4)  # b's block 1 still waits for position 3
    assert m.block(1).block_hash is None
    m.fill("b", 3, [4])
    m.cache_blocks("b", 4)
    m.cache_blocks("a", 4)
    assert m.token_ids("a") == [1, 2, 3, None]
    assert m.block(1).block_hash == h([1, 2], [3, 4])  # b's fill hashed the shared block


# ------------------------------------------------------------------------------------------ accessors copy
def test_accessors_return_copies():
    m = KVCacheManager(4, 2)
    m.allocate("a", [1, 2, 3])
    m.block_table("a").append(99)
    m.token_ids("a").append(99)
    m.request_ids().append("zz")
    m.free_block_queue().append(99)
    assert m.block_table("a") == [0, 1]
    assert m.token_ids("a") == [1, 2, 3]
    assert m.request_ids() == ["a"]
    assert m.free_block_queue() == [2, 3]
    table = m.allocate("b", [5])
    table.append(99)
    assert m.block_table("b") == [2]


# ------------------------------------------------------------------------------------------ brute force
class NaiveManager:
    """The free block queue and the prefix cache as plain lists: what the manager must do, without its links."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.queue, self.bs = list(range(num_blocks)), block_size
        self.ref = [0] * num_blocks
        self.hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, list[int]] = {}  # hash -> block ids, oldest first
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}

    def _full_hashes(self, tokens: list[int]) -> list[int]:
        out, parent = [], None
        for i in range(len(tokens) // self.bs):
            parent = hash_block_tokens(parent, tokens[i * self.bs:(i + 1) * self.bs])
            out.append(parent)
        return out

    def _pop(self) -> int:
        b = self.queue.pop(0)
        if self.hash[b] is not None:  # evict
            self.cached[self.hash[b]].remove(b)
            self.hash[b] = None
        self.ref[b] = 1
        return b

    def _cache(self, b: int, block_hash: int) -> None:
        self.hash[b] = block_hash
        self.cached.setdefault(block_hash, []).append(b)

    def allocate(self, rid: str, tokens: list[int]) -> list[int] | None:
        hashes = self._full_hashes(tokens)
        hits = []
        for block_hash in hashes[:(len(tokens) - 1) // self.bs]:
            if not self.cached.get(block_hash):
                break
            hits.append(self.cached[block_hash][0])
        new = -(-len(tokens) // self.bs) - len(hits)
        if new + sum(self.ref[b] == 0 for b in hits) > len(self.queue):
            return None
        for b in hits:
            if self.ref[b] == 0:
                self.queue.remove(b)
            self.ref[b] += 1
        table = hits + [self._pop() for _ in range(new)]
        for i in range(len(hits), len(hashes)):
            self._cache(table[i], hashes[i])
        self.tables[rid], self.tokens[rid] = table, list(tokens)
        return list(table)

    def append(self, rid: str, new: list[int]) -> list[int] | None:
        table, tokens = self.tables[rid], self.tokens[rid]
        need = -(-(len(tokens) + len(new)) // self.bs) - len(table)
        if need > len(self.queue):
            return None
        table += [self._pop() for _ in range(need)]
        old_full = len(tokens) // self.bs
        tokens += new
        for i, block_hash in enumerate(self._full_hashes(tokens)[old_full:], start=old_full):
            self._cache(table[i], block_hash)
        return list(table)

    def free(self, rid: str) -> None:
        for b in reversed(self.tables.pop(rid)):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.queue.append(b)
        del self.tokens[rid]


@pytest.mark.parametrize("seed", range(6))
def test_random_calls_agree_with_a_naive_list_model(seed):
    """Allocate / append / free at random on 12 blocks of 2 tokens, from a 2-token vocabulary so prompts share
    prefixes: block tables, ref counts, hashes and the queue match the list model after every call."""
    rng = random.Random(seed)
    m, naive = KVCacheManager(12, 2), NaiveManager(12, 2)
    live, count = [], 0
    for _ in range(80):
        op = rng.choice(["allocate", "allocate", "append", "free"]) if live else "allocate"
        if op == "allocate":
            rid, count = f"r{count}", count + 1
            prompt = [rng.choice([1, 2]) for _ in range(rng.randint(1, 7))]
            got = m.allocate(rid, prompt)
            assert got == naive.allocate(rid, prompt)
            if got is not None:
                live.append(rid)
        elif op == "append":
            rid = rng.choice(live)
            new = [rng.choice([1, 2]) for _ in range(rng.randint(1, 3))]
            assert m.append(rid, new) == naive.append(rid, new)
        else:
            rid = live.pop(rng.randrange(len(live)))
            m.free(rid)
            naive.free(rid)
        assert m.free_block_queue() == naive.queue
        assert [b.ref_cnt for b in m.blocks] == naive.ref
        assert [b.block_hash for b in m.blocks] == naive.hash
    assert_consistent(m)
