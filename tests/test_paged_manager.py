"""The block manager, narrated like vLLM's design docs: exact block ids, ref counts and queue order per step."""

import pytest

import kvcore.paged.manager as manager_module
from kvcore.paged import KVCacheManager, events_frame
from tests.paged_fixtures import assert_consistent, small_manager, snapshot, tokens


def test_design_doc_automatic_prefix_caching_example():
    """vLLM docs/design/prefix_caching.md, "Example": block size 4, 10 blocks."""
    m = small_manager(num_blocks=10, block_size=4)
    req0 = tokens(100, 15)

    # Time 1: a 15-token request gets 4 blocks; 3 are full and cached, the 4th holds 3 of 4 tokens.
    assert m.allocate("req0", req0) == [0, 1, 2, 3]
    assert [m.block(b).block_hash is not None for b in range(4)] == [True, True, True, False]
    assert m.free_block_queue() == [4, 5, 6, 7, 8, 9]

    # Time 2-3: decoding fills block 3 (cached at once), the next token needs block 4.
    assert m.append("req0", [115]) == [0, 1, 2, 3]
    assert m.block(3).block_hash is not None
    assert m.append("req0", [116]) == [0, 1, 2, 3, 4]
    assert m.free_block_queue() == [5, 6, 7, 8, 9]

    # Time 4: a 14-token request shares its first 10 tokens: only 2 blocks (8 tokens) hit, since the
    # 3rd block matches 2 of 4 tokens. Hits are touched (ref_cnt 2); new blocks come from the head.
    req1 = req0[:10] + tokens(900, 4)
    assert m.allocate("req1", req1) == [0, 1, 5, 6]
    assert m.num_cached_tokens("req1") == 8
    assert [m.ref_cnt(b) for b in (0, 1, 5, 6)] == [2, 2, 1, 1]
    assert m.free_block_queue() == [7, 8, 9]

    # Time 5: req0 finishes. Blocks 4, 3, 2 go to the tail in reverse order (2 and 3 stay cached);
    # 0 and 1 are still used by req1.
    m.free("req0")
    assert m.free_block_queue() == [7, 8, 9, 4, 3, 2]
    assert [m.ref_cnt(b) for b in (0, 1)] == [1, 1]
    assert m.block(2).block_hash is not None
    assert m.block(3).block_hash is not None

    # Time 6: req1 finishes.
    m.free("req1")
    assert m.free_block_queue() == [7, 8, 9, 4, 3, 2, 6, 5, 1, 0]

    # Time 7: a 29-token request shares 12 tokens with req0. Hits 0, 1, 2 are touched and leave the
    # queue first (7-8-9-4-3-6-5), then 5 new blocks come from the head; block 3 was cached: evicted.
    evicted_hash = m.block(3).block_hash
    req2 = req0[:12] + tokens(500, 17)
    assert m.allocate("req2", req2) == [0, 1, 2, 7, 8, 9, 4, 3]
    assert m.num_cached_tokens("req2") == 12
    assert m.free_block_queue() == [6, 5]
    evictions = [e for e in m.events if e.kind == "evict"]
    assert [(e.block_id, e.block_hash) for e in evictions] == [(3, evicted_hash)]
    assert_consistent(m)


def test_design_doc_duplicated_blocks_are_kept():
    """docs/design/prefix_caching.md, "Duplicated blocks": v1 block tables are append-only."""
    m = small_manager(num_blocks=10, block_size=4)
    A, B, C, D, E, F, G, H, I = range(1, 10)
    m.allocate("req1", [A, B, C, D, E, F])
    for t in (G, H, I):
        m.append("req1", [t])
    assert m.block_table("req1") == [0, 1, 2]  # 0 (ABCD), 1 (EFGH), 2 (I)

    # The same request again: ABCD hits block 0; EFG goes to a new block 3.
    assert m.allocate("req2", [A, B, C, D, E, F]) == [0, 3]
    m.append("req2", [G])
    m.append("req2", [H])
    # Block 3 is now full with EFGH: cached too, a duplicate of block 1; the table stays [0, 3].
    assert m.block_table("req2") == [0, 3]
    assert m.block(3).block_hash == m.block(1).block_hash
    assert m.num_cached_blocks == 3  # blocks 0, 1, 3
    # A later lookup returns the first cached copy (block 1).
    assert m.get_computed_blocks([A, B, C, D, E, F, G, H, 99]) == ([0, 1], 8)
    assert_consistent(m)


def test_fully_cached_prompt_recomputes_its_last_block():
    """At most num_tokens - 1 tokens hit (the last must be computed); hits are whole blocks."""
    m = small_manager(num_blocks=6, block_size=4)
    prompt = tokens(0, 8)
    m.allocate("a", prompt)
    m.free("a")  # queue: 2 3 4 5 1 0, blocks 0 and 1 cached
    assert m.allocate("b", prompt) == [0, 2]  # block 0 hit; the second block is recomputed in block 2
    assert m.num_cached_tokens("b") == 4
    assert m.block(2).block_hash == m.block(1).block_hash  # a duplicate, allowed
    assert_consistent(m)


def test_hashes_are_chained_over_the_prefix():
    m = small_manager(num_blocks=8, block_size=2)
    m.allocate("a", [1, 2, 3, 4])
    m.allocate("b", [9, 9, 3, 4, 5])  # same second block tokens, different parent
    assert m.block_table("b") == [2, 3, 4]
    assert m.num_cached_tokens("b") == 0
    assert m.block(1).block_hash != m.block(3).block_hash


def test_refused_allocate_changes_nothing_and_counts_evictable_hits():
    """A hit on a free (evictable) block takes it out of the queue, so it counts against free blocks."""
    m = small_manager(num_blocks=3, block_size=4)
    m.allocate("a", tokens(0, 9))  # blocks 0 1 2; 0 and 1 cached
    m.free("a")
    assert m.free_block_queue() == [2, 1, 0]
    before = snapshot(m)
    # 13 tokens: 2 hits (both evictable) + 2 new = 4 blocks > 3 free -> refused, nothing touched.
    assert m.allocate("b", tokens(0, 8) + tokens(50, 5)) is None
    assert snapshot(m) == before
    assert not m.has_request("b")
    # 12 tokens: 2 hits + 1 new = 3 -> fits; block 2 (uncached) is popped.
    assert m.allocate("b", tokens(0, 8) + tokens(50, 4)) == [0, 1, 2]
    assert m.num_free_blocks == 0
    assert_consistent(m)


def test_refused_append_changes_nothing():
    m = small_manager(num_blocks=2, block_size=2)
    m.allocate("a", [1, 2, 3])
    assert not m.can_append("a", 2)
    before = snapshot(m)
    assert m.append("a", [4, 5]) is None
    assert snapshot(m) == before
    assert m.can_append("a", 1)
    assert m.append("a", [4]) == [0, 1]


def test_fork_shares_blocks_and_copy_on_write_splits_the_last_one():
    m = small_manager(num_blocks=8, block_size=4)
    m.allocate("p", tokens(0, 6))  # [0 (full, cached), 1 (2 of 4)]
    m.fork("p", "c")
    assert m.block_table("c") == [0, 1]
    assert [m.ref_cnt(0), m.ref_cnt(1)] == [2, 2]

    # The child writes into shared, not-full block 1: it is copied to block 2 first.
    copies = []
    m.on_copy = lambda src, dst: copies.append((src, dst))
    assert m.can_append("c", 1)
    assert m.append("c", [77]) == [0, 2]
    assert copies == [(1, 2)]
    assert [m.ref_cnt(0), m.ref_cnt(1), m.ref_cnt(2)] == [2, 1, 1]
    assert m.events[-1].kind == "copy_on_write"

    # The parent is now the only holder of block 1: it writes in place.
    assert m.append("p", [6]) == [0, 1]
    assert copies == [(1, 2)]
    # Full shared blocks are never written, so no copy when a new block starts.
    m.append("p", [7, 8])
    assert m.block_table("p") == [0, 1, 3]
    assert m.num_cached_tokens("c") == m.num_cached_tokens("p") == 0

    m.free("p")
    m.free("c")
    assert m.num_free_blocks == 8
    assert all(b.ref_cnt == 0 for b in m.blocks)
    assert_consistent(m)


def test_copy_on_write_needs_a_free_block():
    m = small_manager(num_blocks=2, block_size=4)
    m.allocate("p", tokens(0, 6))
    m.fork("p", "c")
    assert m.num_free_blocks == 0
    assert not m.can_append("c", 1)  # 1 token fits block 1's slots, but it must be copied first
    assert m.append("c", [1]) is None


def test_prefix_caching_off_never_hashes():
    m = small_manager(num_blocks=6, block_size=2, caching=False)
    m.allocate("a", [1, 2, 3, 4])
    m.free("a")
    assert m.free_block_queue() == [2, 3, 4, 5, 1, 0]
    assert m.allocate("b", [1, 2, 3, 4]) == [2, 3]  # no hit: new blocks from the head
    assert m.num_cached_tokens("b") == 0
    assert all(b.block_hash is None for b in m.blocks)


def test_free_queue_is_lru_with_reverse_order_per_request():
    m = small_manager(num_blocks=6, block_size=1)
    m.allocate("a", [1, 2])
    m.allocate("b", [3, 4])
    m.free("b")
    m.free("a")
    assert m.free_block_queue() == [4, 5, 3, 2, 1, 0]
    # Reuse pops from the head: the never-used blocks first, then b's tail block 3.
    assert m.allocate("c", [7, 8, 9]) == [4, 5, 3]
    assert [e.kind for e in m.events if e.request_id == "c"] == ["allocate", "allocate", "evict", "allocate",
                                                                  "cache", "cache", "cache"]


def test_append_hashes_each_block_once(monkeypatch):
    """append is O(1) amortized: a block is hashed when it fills, from its parent's hash."""
    calls = []
    real = manager_module.hash_block_tokens
    monkeypatch.setattr(manager_module, "hash_block_tokens", lambda p, t: calls.append(1) or real(p, t))
    m = KVCacheManager(100, 4)
    m.allocate("a", [0])
    for t in range(1, 200):
        m.append("a", [t])
    assert len(calls) == 200 // 4


def test_usage_and_can_allocate():
    m = small_manager(num_blocks=4, block_size=4)
    assert m.usage == 0.0
    assert m.can_allocate(16)
    assert not m.can_allocate(17)
    m.allocate("a", tokens(0, 5))
    assert m.usage == 0.5
    assert m.can_allocate(8)
    assert not m.can_allocate(9)


def test_errors_say_what_is_wrong():
    m = small_manager()
    with pytest.raises(ValueError, match="at least one token"):
        m.allocate("a", [])
    m.allocate("a", [1])
    with pytest.raises(ValueError, match="already allocated"):
        m.allocate("a", [1])
    with pytest.raises(KeyError, match="unknown request 'zz'"):
        m.append("zz", [1])
    with pytest.raises(ValueError, match="already exists"):
        m.fork("a", "a")
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0)


def test_event_log_frame_and_step_numbers():
    m = small_manager(num_blocks=4, block_size=2)
    m.allocate("a", [1, 2, 3])
    m.fork("a", "b")
    m.append("b", [4])
    m.free("a")
    frame = events_frame(m.events)
    assert list(frame.columns) == ["step", "event", "request", "block", "hash", "detail"]
    assert frame["step"].tolist() == sorted(frame["step"].tolist())
    assert set(frame["event"]) == {"allocate", "cache", "fork", "copy_on_write", "free"}
    assert frame["step"].max() == m.step == 4
    quiet = KVCacheManager(4, 2, log_events=False)
    quiet.allocate("a", [1, 2, 3])
    assert quiet.events == []
