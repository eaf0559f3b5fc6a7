"""The paged KV store: slots from block tables, real K/V written by prefill/decode, copied on write."""

import pytest
import torch

from kvcore.paged import PagedKVStore, slot_mapping, synthetic_kv
from tests.paged_fixtures import small_cache, tokens


def expected_kv(token_ids, layer=0):
    keys, values = synthetic_kv(token_ids, 2, 2, 4)
    return keys[layer].transpose(0, 1), values[layer].transpose(0, 1)  # [Hkv, T, D]


def test_slot_mapping_follows_the_block_table():
    # positions 2..6 of a sequence in blocks [5, 2] of size 4 -> 5*4+2, 5*4+3, 2*4+0, 2*4+1, 2*4+2
    assert slot_mapping([5, 2], 4, 2, 5).tolist() == [22, 23, 8, 9, 10]
    with pytest.raises(ValueError, match="do not fit"):
        slot_mapping([5, 2], 4, 6, 3)


def test_store_layout_and_bytes():
    store = PagedKVStore(8, 4, num_layers=3, num_kv_heads=2, head_dim=16, dtype=torch.float16)
    assert store.key_caches[0].shape == (8, 4, 2, 16)
    assert store.nbytes == 2 * 3 * 8 * 4 * 2 * 16 * 2
    with pytest.raises(ValueError, match="head_dim must be an integer >= 1"):
        PagedKVStore(8, 4, 1, 1, 0)


def test_prefix_hit_reads_the_same_kv_without_writing_it():
    cache = small_cache(num_blocks=8, block_size=4)
    cache.prefill("a", tokens(0, 10))
    before = cache.store.key_caches[0].clone()
    cache.prefill("b", [*tokens(0, 8), 50, 51, 52])  # hits blocks 0, 1
    assert cache.manager.block_table("b")[:2] == [0, 1]
    assert torch.equal(cache.store.key_caches[0][:2], before[:2])  # hit blocks were not rewritten
    for rid, toks in (("a", tokens(0, 10)), ("b", [*tokens(0, 8), 50, 51, 52])):
        for layer in (0, 1):
            k, v = cache.gather(rid, layer)
            ek, ev = expected_kv(toks, layer)
            assert torch.equal(k, ek)
            assert torch.equal(v, ev)


def test_copy_on_write_copies_real_data_and_keeps_the_shared_block():
    cache = small_cache(num_blocks=8, block_size=4)
    cache.prefill("p", tokens(0, 6))
    cache.fork("p", "c")
    shared = cache.store.value_caches[1][1].clone()
    cache.decode("c", [40])
    assert cache.manager.block_table("c") == [0, 2]
    assert torch.equal(cache.store.value_caches[1][1], shared)  # the parent's block did not change
    assert torch.equal(cache.store.value_caches[1][2][:2], shared[:2])  # the copy took its first 2 slots
    assert cache.block_token_ids(2) == [4, 5, 40, -1]
    k, _ = cache.gather("c", 1)
    assert torch.equal(k, expected_kv([*tokens(0, 6), 40], 1)[0])


def test_explicit_kv_is_written_where_the_block_table_says():
    cache = small_cache(num_blocks=4, block_size=2, caching=False)
    keys = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)  # [L, T, Hkv, D]
    cache.prefill("a", [1, 2, 3], keys, -keys)
    k, v = cache.gather("a", 1)
    assert torch.equal(k, keys[1].transpose(0, 1))
    assert torch.equal(v, -keys[1].transpose(0, 1))
    new = torch.ones(2, 1, 2, 4)
    cache.decode("a", [4], new, new)
    assert torch.equal(cache.gather("a", 0)[0][:, 3], new[0, 0])
    with pytest.raises(ValueError, match="tokens of K/V but"):
        cache.decode("a", [5], torch.ones(2, 2, 2, 4), torch.ones(2, 2, 2, 4))
