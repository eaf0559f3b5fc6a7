"""Random allocate / append / fork / free against the paged cache, with real K/V in the store.

After every step: each block is free xor referenced, ref_cnt equals the number of block tables holding
it, and every request reads back exactly the K/V of its own tokens (so a prefix hit served the right
data and copy-on-write never touched a shared block). Refused calls change nothing; after freeing
everything, nothing leaks. 250 examples of up to 50 steps: over 10,000 operations.
"""

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvcore.paged.cache import PagedKVCache
from kvcore.paged.synthetic import synthetic_kv
from tests.paged_fixtures import assert_consistent, snapshot

# Prompts start with a piece of one of two fixed prefixes, so prefix-cache hits are common.
PREFIXES = ([0, 1, 2, 3, 0, 1, 2, 3], [3, 2, 1, 0, 3, 2, 1, 0])
TOKENS = st.builds(lambda prefix, n, tail: prefix[:n] + tail, st.sampled_from(PREFIXES), st.integers(0, 8),
                   st.lists(st.integers(0, 3), max_size=4)).filter(bool)
NEW_TOKENS = st.lists(st.integers(0, 3), min_size=1, max_size=5)
CHECKS = {"after_steps": 0}


class PagedCacheMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(3, 24), block_size=st.sampled_from([1, 2, 4]), caching=st.booleans())
    def build(self, num_blocks, block_size, caching):
        self.cache = PagedKVCache(num_blocks, block_size, num_layers=1, num_kv_heads=1, head_dim=2,
                                  enable_prefix_caching=caching)
        self.manager = self.cache.manager
        self.expected: dict[str, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
        self.count = 0

    def _pool(self):
        return torch.cat([self.cache.store.key_caches[0], self.cache.store.value_caches[0]]).clone()

    def _refused(self, before, pool_before):
        assert snapshot(self.manager) == before
        assert torch.equal(self._pool(), pool_before)

    @rule(token_ids=TOKENS)
    def allocate(self, token_ids):
        rid, before, pool = f"r{self.count}", snapshot(self.manager), self._pool()
        if self.cache.prefill(rid, token_ids) is None:
            assert not self.manager.can_allocate(len(token_ids))
            self._refused(before, pool)
            return
        self.count += 1
        keys, values = synthetic_kv(token_ids, 1, 1, 2)
        self.expected[rid] = (list(token_ids), keys[0].transpose(0, 1), values[0].transpose(0, 1))  # [Hkv, T, D]

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), new=NEW_TOKENS)
    def append(self, data, new):
        rid = data.draw(st.sampled_from(sorted(self.expected)))
        before, pool = snapshot(self.manager), self._pool()
        shared = {b.block_id for b in self.manager.blocks if b.ref_cnt > 1}
        can = self.manager.can_append(rid, len(new))
        if self.cache.decode(rid, new) is None:
            assert not can
            self._refused(before, pool)
            return
        assert can
        # Copy-on-write: a block that was shared before the write holds exactly what it held.
        after = self._pool()
        num_blocks = self.manager.num_blocks
        for b in shared:
            assert torch.equal(after[b], pool[b])
            assert torch.equal(after[num_blocks + b], pool[num_blocks + b])
        old_tokens = self.expected[rid][0]
        keys, values = synthetic_kv(old_tokens + new, 1, 1, 2)
        self.expected[rid] = (old_tokens + new, keys[0].transpose(0, 1), values[0].transpose(0, 1))

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def fork(self, data):
        parent, child = data.draw(st.sampled_from(sorted(self.expected))), f"r{self.count}"
        self.count += 1
        self.cache.fork(parent, child)
        self.expected[child] = self.expected[parent]

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.expected)))
        self.cache.free(rid)
        del self.expected[rid]

    @invariant()
    def blocks_are_consistent_and_hold_the_right_kv(self):
        CHECKS["after_steps"] += 1  # runs after initialization and after every rule
        assert_consistent(self.manager)
        for rid, (token_ids, keys, values) in self.expected.items():
            assert self.manager.token_ids(rid) == token_ids
            got_k, got_v = self.cache.gather(rid)
            assert torch.equal(got_k, keys), rid
            assert torch.equal(got_v, values), rid
            slots = [t for b in self.manager.block_table(rid) for t in self.cache.block_token_ids(b)]
            assert slots[:len(token_ids)] == token_ids

    def teardown(self):
        for rid in list(self.expected):
            self.cache.free(rid)
        assert self.manager.num_free_blocks == self.manager.num_blocks
        assert all(b.ref_cnt == 0 for b in self.manager.blocks)
        assert_consistent(self.manager)


def test_random_operations_keep_every_invariant():
    CHECKS["after_steps"] = 0
    run_state_machine_as_test(PagedCacheMachine,
                              settings=settings(max_examples=250, stateful_step_count=50, deadline=None))
    # Each example runs its initialization and up to 50 operations, checking after each one.
    assert CHECKS["after_steps"] - 250 >= 10_000
