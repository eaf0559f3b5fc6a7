"""Eviction policies pinned on handmade attention maps: exact scores, exact kept indices, exact messages.

One 5-token causal attention map (a single KV head) is counted by hand below; every attention-based policy
is scored on it and its choice is checked against a brute-force top-k that protects the recent window.
The shared machinery (budgets, grouping, causal attention, gathers, the state, labels, the kvpress
presets, the attention masks and the decode-time hook) is pinned the same way.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from kvcore.eviction import (
    H2O,
    LRU,
    POLICIES,
    TOVA,
    AttentionWindow,
    EvictionState,
    FullCache,
    KNorm,
    ObservedAttention,
    RandomEviction,
    SlidingWindow,
    SnapKV,
    StreamingLLM,
    causal_attention,
    gather_kv,
    group_attention,
    kvpress_budget,
    kvpress_compatible,
    kvpress_hyperparameters,
    make_policy,
    resolve_budget,
)
from kvcore.eviction.base import EvictionPolicy, gather_tokens, pad_tokens
from kvcore.eviction.hook import EvictionHook, eviction_plan
from kvcore.eviction.masks import additive_mask, decode_mask, prefill_mask
from kvcore.models.cache import LabCache
from kvcore.models.plan import StepState

# Row t = the attention of query t over keys 0..t (each row sums to 1). Column sums (what H2O accumulates):
# key 0: 1 + .5 + .6 + .4 + .5 = 3.0; key 1: .5 + .1 + .2 + .05 = .85; key 2: .3 + .1 + .15 = .55;
# key 3: .3 + .15 = .45; key 4: .15.
MAP = [
    [1.0, 0.0, 0.0, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.0, 0.0],
    [0.6, 0.1, 0.3, 0.0, 0.0],
    [0.4, 0.2, 0.1, 0.3, 0.0],
    [0.5, 0.05, 0.15, 0.15, 0.15],
]
COLUMN_SUMS = [3.0, 0.85, 0.55, 0.45, 0.15]



def exactly(message: str) -> str:
    """A ``pytest.raises`` pattern that matches the whole message, not a part of it."""
    return f"^{re.escape(message)}$"


def attn(rows: list[list[float]]) -> torch.Tensor:
    """A one-head map ``[1, 1, Tq, T]``."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def observed(policy: EvictionPolicy, rows: list[list[float]] = MAP, heads: int = 1) -> EvictionState:
    """The state after a prompt of ``len(rows[0])`` tokens whose queries gave ``rows``."""
    a = attn(rows) if heads == 1 else torch.tensor(rows, dtype=torch.float32)[None]
    state = EvictionState.empty(1, a.shape[1])
    state.append(a.shape[-1])
    policy.observe(state, a)
    return state


def keys_for(state: EvictionState, d: int = 2) -> torch.Tensor:
    return torch.zeros(*state.positions.shape, d)


def kept(policy: EvictionPolicy, state: EvictionState, budget) -> list[list[int]]:
    keys = keys_for(state)
    return policy.select(state, keys, keys, budget)[0].tolist()


def brute_force_keep(scores: list[float], k: int, recent: int) -> list[int]:
    """The newest ``recent`` tokens, then the best scores, by a sort of Python floats (distinct scores)."""
    T = len(scores)
    if k >= T:
        return list(range(T))
    protected = set(range(T - recent, T))
    rest = sorted((i for i in range(T) if i not in protected), key=lambda i: -scores[i])[:k - len(protected)]
    return sorted(protected | set(rest))


def approx(values: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in values.flatten()]


# ------------------------------------------------------------------------------------------ H2O
def test_h2o_accumulates_each_columns_attention():
    state = observed(H2O())
    assert approx(state.stats["acc"]) == COLUMN_SUMS


@pytest.mark.parametrize(("fraction", "budget", "want"), [
    (0.5, 4, [0, 1, 3, 4]),  # round(2.0) = 2 newest (3, 4) + the 2 heaviest of 0..2
    (0.5, 3, [0, 3, 4]),  # round(1.5) = 2 newest + key 0
    (0.25, 4, [0, 1, 2, 4]),  # round(1.0) = 1 newest + 3 heaviest
    (0.0, 3, [0, 1, 2]),  # no window: the 3 heaviest
    (0.9, 2, [3, 4]),  # round(1.8) = 2: the window is the whole budget
])
def test_h2o_keeps_its_window_then_the_heaviest(fraction, budget, want):
    policy = H2O(recent_fraction=fraction)
    state = observed(policy)
    assert policy.recent_window(budget) == round(fraction * budget)
    assert kept(policy, state, budget) == [want]
    assert want == brute_force_keep(COLUMN_SUMS, budget, policy.recent_window(budget))


def test_h2o_decode_step_pads_the_new_token_and_adds_its_row():
    policy = H2O()
    state = observed(policy)
    state.append(1)
    policy.observe(state, attn([[0.1, 0.2, 0.3, 0.1, 0.2, 0.1]]))
    assert approx(state.stats["acc"]) == [3.1, 1.05, 0.85, 0.55, 0.35, 0.1]


# ------------------------------------------------------------------------------------------ observed attention
def test_observed_attention_divides_by_the_queries_that_saw_each_token():
    policy = ObservedAttention()
    state = observed(policy)
    assert state.stats["seen"].flatten().tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]
    scores = policy.score_tokens(state, keys_for(state), keys_for(state))
    means = [3.0 / 5, 0.85 / 4, 0.55 / 3, 0.45 / 2, 0.15 / 1]
    assert approx(scores) == [round(m, 6) for m in means]
    assert kept(policy, state, 2) == [[0, 3]]  # no window: 0.6 and 0.225
    assert kept(policy, state, 3) == [[0, 1, 3]]
    assert policy.recent_window(3) == 0
    # One decode query more: every token (the new one too) has one more query that saw it.
    state.append(1)
    policy.observe(state, attn([[0.1, 0.2, 0.3, 0.1, 0.2, 0.1]]))
    assert state.stats["seen"].flatten().tolist() == [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    assert approx(state.stats["acc"]) == [3.1, 1.05, 0.85, 0.55, 0.35, 0.1]


def test_observed_attention_counts_seen_queries_for_a_partial_window():
    """The last 2 queries of a 5-token prompt: token j is seen by min(2, 5 - j) of them."""
    policy = ObservedAttention()
    state = EvictionState.empty(1, 1)
    state.append(5)
    policy.observe(state, attn(MAP[3:]))
    assert state.stats["seen"].flatten().tolist() == [2.0, 2.0, 2.0, 2.0, 1.0]
    assert approx(state.stats["acc"]) == [0.9, 0.25, 0.25, 0.45, 0.15]


# ------------------------------------------------------------------------------------------ TOVA
TOVA_ROWS = [[[0.1, 0.2, 0.3, 0.4]], [[0.6, 0.3, 0.06, 0.04]]]  # the last query of each of 2 KV heads


def test_tova_averages_the_newest_query_over_heads():
    policy = TOVA()
    state = observed(policy, TOVA_ROWS, heads=2)
    assert approx(state.stats["last"]) == [0.35, 0.25, 0.18, 0.22] * 2
    assert kept(policy, state, 2) == [[0, 1], [0, 1]]
    assert policy.recent_window(2) == 0


def test_tova_per_head_and_keep_last():
    per_head = TOVA(per_head=True)
    assert kept(per_head, observed(per_head, TOVA_ROWS, heads=2), 2) == [[2, 3], [0, 1]]
    last = TOVA(keep_last=True)
    assert last.recent_window(2) == 1
    assert kept(last, observed(last, TOVA_ROWS, heads=2), 2) == [[0, 3], [0, 3]]


def test_tova_averages_heads_within_each_batch_row():
    rows = torch.tensor([TOVA_ROWS, [[[0.4, 0.3, 0.2, 0.1]], [[0.2, 0.2, 0.2, 0.4]]]])  # [B=2, Hkv=2, 1, 4]
    policy = TOVA()
    state = EvictionState.empty(2, 2)
    state.append(4)
    policy.observe(state, rows)
    assert approx(state.stats["last"][0]) == [0.35, 0.25, 0.18, 0.22] * 2
    assert approx(state.stats["last"][1]) == [0.3, 0.25, 0.2, 0.25] * 2


def test_tova_reads_only_the_last_row():
    policy = TOVA()
    state = observed(policy)
    assert approx(state.stats["last"]) == MAP[-1]


# ------------------------------------------------------------------------------------------ SnapKV
# A 6-token prompt; the observation window is its last 2 queries (rows 4 and 5). Their mean over keys
# 0..5 is [.1, .3, .05, .12, .4, .03]; keys 4, 5 (the window) are zeroed; then a 3-wide average pool
# (zero padding counted): [.4/3, .45/3, .47/3, .17/3, .12/3, 0].
SNAP_ROWS = [
    [1.0, 0, 0, 0, 0, 0],
    [0.5, 0.5, 0, 0, 0, 0],
    [0.2, 0.2, 0.6, 0, 0, 0],
    [0.25, 0.25, 0.25, 0.25, 0, 0],
    [0.1, 0.4, 0.0, 0.14, 0.36, 0.0],
    [0.1, 0.2, 0.1, 0.1, 0.44, 0.06],
]


def snap_scores(policy: SnapKV) -> list[float]:
    state = observed(policy, SNAP_ROWS)
    return approx(policy.score_tokens(state, keys_for(state), keys_for(state)))


def test_snapkv_keeps_the_last_window_rows_only():
    policy = SnapKV(window=2, kernel_size=3)
    state = observed(policy, SNAP_ROWS)
    assert approx(state.stats["rows"]) == approx(torch.tensor(SNAP_ROWS[4:]))


def test_snapkv_zeroes_the_window_then_pools():
    assert snap_scores(SnapKV(window=2, kernel_size=3)) == [round(v, 6) for v in (0.4 / 3, 0.45 / 3, 0.47 / 3,
                                                                                  0.17 / 3, 0.12 / 3, 0.0)]
    assert snap_scores(SnapKV(window=2, kernel_size=1)) == [0.1, 0.3, 0.05, 0.12, 0.0, 0.0]
    assert snap_scores(SnapKV(window=2, kernel_size=3, pooling="max")) == [0.3, 0.3, 0.3, 0.12, 0.12, 0.0]


def test_snapkv_keeps_the_window_then_the_pooled_best():
    policy = SnapKV(window=2, kernel_size=3)
    state = observed(policy, SNAP_ROWS)
    assert policy.recent_window(3) == 2
    assert policy.recent_window(1) == 1
    # Key 2 (pooled .157) beats key 3: without the zeroing key 3 would pool the window's .4 and win.
    assert kept(policy, state, 3) == [[2, 4, 5]]
    assert kept(policy, state, 4) == [[1, 2, 4, 5]]
    assert kept(policy, state, 1) == [[5]]


def test_snapkv_topk_ties_score_the_window_above_everything():
    policy = SnapKV(window=2, kernel_size=3, window_ties="topk")
    assert policy.recent_window(3) == 0
    top = 0.47 / 3 + 1.0
    assert snap_scores(policy) == [round(v, 6) for v in (0.4 / 3, 0.45 / 3, 0.47 / 3, 0.17 / 3, top, top)]
    assert kept(policy, observed(policy, SNAP_ROWS), 3) == [[2, 4, 5]]
    # A window as long as the prompt: every token scores 1.
    whole = SnapKV(window=8, kernel_size=3, window_ties="topk")
    assert snap_scores(whole) == [1.0] * 6


def test_snapkv_window_longer_than_the_prompt_keeps_every_row():
    policy = SnapKV(window=8, kernel_size=1)
    state = observed(policy, SNAP_ROWS)
    assert state.stats["rows"].shape == (1, 1, 6, 6)


def test_snapkv_wider_pooling_and_several_heads():
    """Kernel 5 (padding 2) over the zeroed means [.1, .3, .05, .12, 0, 0]: sums of 5 neighbours / 5."""
    assert snap_scores(SnapKV(window=2, kernel_size=5)) == [round(v / 5, 6) for v in (
        0.45, 0.57, 0.57, 0.47, 0.17, 0.12)]
    policy = SnapKV(window=2, kernel_size=3)
    rows = torch.tensor(SNAP_ROWS)
    two = torch.stack([rows, rows.flip(-1).tril()])[None]  # [1, Hkv=2, 6, 6]: the second head differs
    state = EvictionState.empty(1, 2)
    state.append(6)
    policy.observe(state, two)
    keys = keys_for(state)
    scores = policy.score_tokens(state, keys, keys)
    assert approx(scores[0, 0]) == snap_scores(policy)
    one = EvictionState.empty(1, 1)
    one.append(6)
    policy.observe(one, two[:, 1:])
    assert torch.equal(scores[0, 1], policy.score_tokens(one, keys[:, :1], keys[:, :1])[0, 0])


def test_snapkv_decode_rows_slide():
    policy = SnapKV(window=2, kernel_size=1)
    state = observed(policy, SNAP_ROWS)
    state.append(1)
    policy.observe(state, attn([[0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.5]]))
    assert approx(state.stats["rows"]) == approx(torch.tensor([SNAP_ROWS[5] + [0.0],
                                                                [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.5]]))


# ------------------------------------------------------------------------------------------ LRU
def test_lru_last_use_on_the_map():
    """Threshold 1: query t uses key j when attn >= 1 / (t + 1). Key 0 is used last by query 4, key 1 by
    query 1, key 3 by query 3; keys 2 and 4 only when they entered. Ties break toward the newer position."""
    policy = LRU(threshold=1.0)
    state = observed(policy)
    assert state.stats["last_use"].flatten().tolist() == [4.0, 1.0, 2.0, 3.0, 4.0]
    scores = policy.score_tokens(state, keys_for(state), keys_for(state))
    assert approx(scores) == [round(v, 6) for v in (4.0, 1 + 1 / 6, 2 + 2 / 6, 3 + 3 / 6, 4 + 4 / 6)]
    assert kept(policy, state, 2) == [[0, 4]]
    assert kept(policy, state, 3) == [[0, 3, 4]]


def test_lru_lower_threshold_counts_more_uses():
    policy = LRU(threshold=0.5)
    state = observed(policy)
    assert state.stats["last_use"].flatten().tolist() == [4.0, 3.0, 4.0, 4.0, 4.0]
    assert kept(policy, state, 2) == [[3, 4]]


def test_lru_decode_step_marks_only_the_new_token_as_entered():
    policy = LRU(threshold=1.0)
    state = observed(policy)
    state.append(1)
    policy.observe(state, attn([[0.1, 0.6, 0.1, 0.1, 0.05, 0.05]]))  # query 5 uses key 1 only (>= 1/6)
    assert state.stats["last_use"].flatten().tolist() == [4.0, 5.0, 2.0, 3.0, 4.0, 5.0]  # key 5: it entered


def test_lru_attention_exactly_at_the_threshold_is_a_use():
    policy = LRU(threshold=1.0)
    rows = [[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.8, 0.1, 0.1, 0], [0.25, 0.25, 0.25, 0.25]]
    state = observed(policy, rows)
    assert state.stats["last_use"].flatten().tolist() == [3.0, 3.0, 3.0, 3.0]


def test_lru_a_token_never_used_again_keeps_its_entry_step():
    policy = LRU(threshold=1.0)
    state = observed(policy, [[1.0, 0, 0], [0.1, 0.9, 0], [0.1, 0.1, 0.8]])
    assert state.stats["last_use"].flatten().tolist() == [0.0, 1.0, 2.0]


def test_lru_a_first_look_at_the_last_queries_marks_every_token_as_entered():
    policy = LRU(threshold=1.0)
    state = EvictionState.empty(1, 1)
    state.append(5)
    policy.observe(state, attn(MAP[3:]))  # queries 3 and 4 only
    assert state.stats["last_use"].flatten().tolist() == [4.0, 1.0, 2.0, 3.0, 4.0]


# ------------------------------------------------------------------------------------------ position policies
def test_streaming_llm_keeps_sinks_by_original_position():
    policy = StreamingLLM(n_sink=2)
    assert policy.min_budget() == 3
    state = EvictionState.empty(1, 1)
    state.append(6)
    assert kept(policy, state, 4) == [[0, 1, 4, 5]]
    scores = policy.score_tokens(state, keys_for(state), keys_for(state))
    assert scores.flatten().tolist() == [math.inf, math.inf, 2.0, 3.0, 4.0, 5.0]
    # After evictions the cache holds positions 0 1 5 6 7 8: the sinks are still the first two entries.
    state.positions = torch.tensor([[[0, 1, 5, 6, 7, 8]]])
    assert kept(policy, state, 3) == [[0, 1, 5]]


def test_streaming_llm_refuses_a_budget_of_only_sinks():
    policy = StreamingLLM(n_sink=2)
    state = EvictionState.empty(1, 1)
    state.append(6)
    with pytest.raises(ValueError, match=exactly("streaming_llm(n_sink=2) needs a budget of at least 3 tokens, got 2")):
        kept(policy, state, 2)
    assert kept(policy, state, 3) == [[0, 1, 5]]


def test_windows_keep_the_newest_and_the_attention_window_stores_everything():
    state = EvictionState.empty(1, 1)
    state.append(6)
    assert kept(SlidingWindow(), state, 2) == [[4, 5]]
    assert kept(AttentionWindow(), state, 2) == [[4, 5]]
    keys = torch.arange(12.0).view(1, 1, 6, 2)
    k, v, idx = AttentionWindow().compress(keys, keys + 1, None, 2)
    assert torch.equal(k, keys)
    assert torch.equal(v, keys + 1)
    assert idx.tolist() == [[[0, 1, 2, 3, 4, 5]]]
    k, _, idx = SlidingWindow().compress(keys, keys, None, 2)
    assert idx.tolist() == [[[4, 5]]]
    assert k.tolist() == [[[[8.0, 9.0], [10.0, 11.0]]]]


def test_knorm_keeps_the_smallest_key_norms():
    keys = torch.tensor([[[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [6.0, 8.0]]]])  # norms 5 1 2 10
    policy = KNorm()
    assert policy.score(keys, keys, None).flatten().tolist() == [-5.0, -1.0, -2.0, -10.0]
    assert policy.compress(keys, keys, None, 2)[2].tolist() == [[[1, 2]]]


def test_full_cache_keeps_everything_whatever_the_budget():
    keys = torch.zeros(1, 2, 5, 2)
    policy = FullCache()
    assert policy.score(keys, keys, None).tolist() == torch.ones(1, 2, 5).tolist()
    state = policy.prefill_state(keys, None)
    assert policy.select(state, keys, keys, 1).tolist() == [[[0, 1, 2, 3, 4]] * 2]


def test_random_scores_come_from_the_seed_layer_and_step():
    keys = torch.zeros(1, 2, 5, 2)
    state = EvictionState.empty(1, 2, layer=3)
    state.append(5)
    policy = RandomEviction(seed=7)
    gen = torch.Generator().manual_seed(hash((7, 3, 5)) & (2**63 - 1))
    assert torch.equal(policy.score_tokens(state, keys, keys), torch.rand(1, 2, 5, generator=gen))
    negative = EvictionState.empty(1, 2)  # hash((0, 0, 3)) is negative and odd: the mask keeps 63 bits
    negative.append(3)
    gen = torch.Generator().manual_seed(hash((0, 0, 3)) & (2**63 - 1))
    assert torch.equal(RandomEviction(seed=0).score_tokens(negative, keys[:, :, :3], keys[:, :, :3]),
                       torch.rand(1, 2, 3, generator=gen))
    other_layer = EvictionState.empty(1, 2, layer=4)
    other_layer.append(5)
    assert not torch.equal(policy.score_tokens(other_layer, keys, keys), policy.score_tokens(state, keys, keys))


# ------------------------------------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize(("build", "message"), [
    (lambda: H2O(1.0), "recent_fraction must be in [0, 1) (share of the budget for recent tokens), got 1.0"),
    (lambda: H2O(-0.5), "recent_fraction must be in [0, 1) (share of the budget for recent tokens), got -0.5"),
    (lambda: TOVA(per_head=1), "per_head must be True or False, got 1"),
    (lambda: TOVA(keep_last="yes"), "keep_last must be True or False, got 'yes'"),
    (lambda: StreamingLLM(n_sink=0), "n_sink must be an integer >= 1 (the first tokens kept as sinks), got 0"),
    (lambda: StreamingLLM(n_sink=1.5), "n_sink must be an integer >= 1 (the first tokens kept as sinks), got 1.5"),
    (lambda: StreamingLLM(n_sink=True), "n_sink must be an integer >= 1 (the first tokens kept as sinks), got True"),
    (lambda: RandomEviction(seed=1.5), "seed must be an integer, got 1.5"),
    (lambda: RandomEviction(seed=True), "seed must be an integer, got True"),
    (lambda: LRU(threshold=0.0), "threshold must be > 0 (a multiple of the uniform attention share), got 0.0"),
    (lambda: SnapKV(window=0), "window must be an integer >= 1 (observation queries), got 0"),
    (lambda: SnapKV(window=2.0), "window must be an integer >= 1 (observation queries), got 2.0"),
    (lambda: SnapKV(window=True), "window must be an integer >= 1 (observation queries), got True"),
    (lambda: SnapKV(kernel_size=4), "kernel_size must be an odd integer >= 1 (tokens), got 4"),
    (lambda: SnapKV(kernel_size=-1), "kernel_size must be an odd integer >= 1 (tokens), got -1"),
    (lambda: SnapKV(kernel_size=3.0), "kernel_size must be an odd integer >= 1 (tokens), got 3.0"),
    (lambda: SnapKV(kernel_size=True), "kernel_size must be an odd integer >= 1 (tokens), got True"),
    (lambda: SnapKV(pooling="median"), "pooling must be one of ('avg', 'max'), got 'median'"),
    (lambda: SnapKV(window_ties="oldest"), "window_ties must be one of ('newest', 'topk'), got 'oldest'"),
])
def test_bad_hyperparameters_say_exactly_what_is_allowed(build, message):
    with pytest.raises(ValueError, match=exactly(message)):
        build()


def test_the_smallest_hyperparameters_are_allowed():
    assert StreamingLLM(n_sink=1).min_budget() == 2
    assert SnapKV(window=1, kernel_size=1).recent_window(5) == 1
    assert H2O(0.0).recent_window(9) == 0
    assert LRU(threshold=0.05).threshold == 0.05
    assert RandomEviction(seed=-3).seed == -3
    assert TOVA(per_head=True, keep_last=True).recent_window(4) == 1


# ------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize(("budget", "length", "rule", "want"), [
    (5, 10, "round", 5), (15, 10, "round", 10), (1, 10, "round", 1), (10, 10, "round", 10),
    (0.35, 10, "round", 4), (0.25, 10, "round", 2), (0.01, 10, "round", 1), (1.0, 10, "round", 10),
    (0.2, 100, "kvpress", 19), (0.25, 31, "kvpress", 7), (0.01, 10, "kvpress", 1), (1.0, 10, "kvpress", 10),
    (7, 10, "kvpress", 7),
])
def test_budgets_resolve_to_exact_counts(budget, length, rule, want):
    assert resolve_budget(budget, length, rule) == want


@pytest.mark.parametrize(("budget", "rule", "message"), [
    (5, "floor", "budget rule must be one of ('round', 'kvpress'), got 'floor'"),
    (True, "round", "budget must be a token count (int >= 1) or a ratio (float in (0, 1]), got True"),
    ("8", "round", "budget must be a token count (int >= 1) or a ratio (float in (0, 1]), got '8'"),
    (0, "round", "budget must be >= 1 token, got 0"),
    (0.0, "round", "a budget ratio must lie in (0, 1], got 0.0"),
    (1.5, "round", "a budget ratio must lie in (0, 1], got 1.5"),
    (math.nan, "round", "a budget ratio must lie in (0, 1], got nan"),
])
def test_bad_budgets_say_exactly_what_is_wrong(budget, rule, message):
    with pytest.raises(ValueError, match=exactly(message)):
        resolve_budget(budget, 10, rule)


# ------------------------------------------------------------------------------------------ tensor helpers
def test_group_attention_averages_query_groups_exactly():
    a = torch.tensor([1.0, 3.0, 5.0, 9.0]).view(1, 4, 1, 1)  # 4 query heads, 2 per KV head
    assert group_attention(a, 2).flatten().tolist() == [2.0, 7.0]
    assert group_attention(a, 1).flatten().tolist() == [4.5]
    assert group_attention(a, 4).flatten().tolist() == [1.0, 3.0, 5.0, 9.0]
    with pytest.raises(ValueError, match=exactly("query heads (4) must be a multiple of KV heads (3)")):
        group_attention(a, 3)


def test_causal_attention_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)  # last 3 of 5 positions
    got = causal_attention(q, k)
    for h in range(4):
        for i in range(3):
            t = 2 + i  # the query's position
            logits = torch.tensor([float(q[0, h, i] @ k[0, h // 2, j]) / math.sqrt(8) for j in range(t + 1)])
            want = torch.cat([logits.softmax(-1), torch.zeros(4 - t)])
            assert torch.allclose(got[0, h, i], want, atol=1e-6)
    message = "more queries (6) than keys (5): queries must be the last Tq prompt positions"
    with pytest.raises(ValueError, match=exactly(message)):
        causal_attention(torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 5, 8))


def test_gathers_and_padding():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)  # [B, H, w, T]
    idx = torch.tensor([[[0, 3], [1, 2]]])
    assert gather_tokens(x, idx).tolist() == [[[[0.0, 3.0], [4.0, 7.0], [8.0, 11.0]],
                                               [[13.0, 14.0], [17.0, 18.0], [21.0, 22.0]]]]
    kv = torch.arange(2 * 4 * 2, dtype=torch.float32).view(1, 2, 4, 2)  # [B, H, T, D]
    assert gather_kv(kv, idx).tolist() == [[[[0.0, 1.0], [6.0, 7.0]], [[10.0, 11.0], [12.0, 13.0]]]]
    # k = 3 kept of T = 4, for 2 batch rows and 1 head: shapes where k, H and B differ
    x3 = torch.arange(2 * 4, dtype=torch.float32).view(2, 1, 4)
    idx3 = torch.tensor([[[0, 1, 3]], [[1, 2, 3]]])
    assert gather_tokens(x3, idx3).tolist() == [[[0.0, 1.0, 3.0]], [[5.0, 6.0, 7.0]]]
    kv3 = torch.arange(2 * 4, dtype=torch.float32).view(2, 1, 4, 1)
    assert gather_kv(kv3, idx3).flatten().tolist() == [0.0, 1.0, 3.0, 5.0, 6.0, 7.0]
    assert pad_tokens(torch.tensor([[[1.0, 2.0]]]), 4, torch.zeros(1, 1, 4)).tolist() == [[[1.0, 2.0, 0.0, 0.0]]]
    fresh = pad_tokens(None, 3, torch.ones(1, 1, 3, dtype=torch.float64))
    assert (fresh.tolist(), fresh.dtype) == ([[[0.0, 0.0, 0.0]]], torch.float32)


def test_state_appends_positions_and_keeps_statistics_aligned():
    assert EvictionState.empty(1, 1).layer == 0
    state = EvictionState.empty(1, 2, layer=5)
    assert (state.positions.shape, state.step, state.layer, state.length) == ((1, 2, 0), 0, 5, 0)
    assert state.positions.dtype == torch.long
    state.append(3)
    state.append(2)
    assert state.positions.tolist() == [[[0, 1, 2, 3, 4]] * 2]
    assert (state.step, state.length) == (5, 5)
    state.stats["acc"] = torch.tensor([[[10.0, 11, 12, 13, 14], [20, 21, 22, 23, 24]]])
    state.keep(torch.tensor([[[0, 4], [2, 3]]]))
    assert state.positions.tolist() == [[[0, 4], [2, 3]]]
    assert state.stats["acc"].tolist() == [[[10.0, 14.0], [22.0, 23.0]]]
    assert (state.step, state.length) == (5, 2)
    state.append(1)
    assert state.positions.tolist() == [[[0, 4, 5], [2, 3, 5]]]


# ------------------------------------------------------------------------------------------ the base class
def test_labels_show_fields_and_hide_unset_reproduction_options():
    assert FullCache().label() == "full"
    assert SnapKV().label() == "snapkv(window=16, kernel_size=5, pooling=avg)"
    assert SnapKV(window_ties="topk").label() == "snapkv(window=16, kernel_size=5, pooling=avg, window_ties=topk)"
    assert TOVA().label() == "tova(per_head=False)"
    assert TOVA(keep_last=True).label() == "tova(per_head=False, keep_last=True)"
    assert StreamingLLM(n_sink=2).hyperparameters() == {"n_sink": 2}
    assert FullCache().hyperparameters() == {}


def test_registry_names_and_flags():
    assert list(POLICIES) == ["full", "sliding_window", "streaming_llm", "h2o", "tova", "snapkv", "knorm", "lru",
                              "random", "attention_window", "observed_attention"]
    assert [n for n, c in POLICIES.items() if c.needs_attention] == ["h2o", "tova", "snapkv", "lru",
                                                                      "observed_attention"]
    assert [n for n, c in POLICIES.items() if c.keeps_all] == ["full"]
    assert [n for n, c in POLICIES.items() if c.stores_all] == ["attention_window"]
    for name, cls in POLICIES.items():
        assert not hasattr(cls(), "__dict__"), f"{name} is not a slotted dataclass"


def test_attention_policies_need_the_prompts_queries():
    keys = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match=exactly("policy 'h2o' reads attention: pass the prompt's queries")):
        H2O().prefill_state(keys, None)
    state = SlidingWindow().prefill_state(keys, None, layer=2)
    assert (state.positions.tolist(), state.step, state.layer, state.stats) == ([[[0, 1, 2, 3]]], 4, 2, {})
    assert SlidingWindow().prefill_state(keys, None).layer == 0


def test_select_keeps_everything_at_or_above_the_length_and_compress_gathers():
    keys = torch.arange(8.0).view(1, 1, 4, 2)
    policy = SlidingWindow()
    state = policy.prefill_state(keys, None)
    assert policy.select(state, keys, keys, 4).tolist() == [[[0, 1, 2, 3]]]
    assert policy.select(state, keys, keys, 9).tolist() == [[[0, 1, 2, 3]]]
    assert policy.select(state, keys, keys, 0.5).tolist() == [[[2, 3]]]
    k, v, idx = policy.compress(keys, keys * 10, None, 1)
    assert (k.tolist(), v.tolist(), idx.tolist()) == ([[[[6.0, 7.0]]]], [[[[60.0, 70.0]]]], [[[3]]])


def test_a_budget_of_the_whole_cache_keeps_it_even_below_the_minimum():
    keys = torch.zeros(1, 1, 3, 2)
    policy = StreamingLLM(n_sink=4)  # needs 5, but 3 of 3 tokens evicts nothing
    state = policy.prefill_state(keys, None)
    assert policy.select(state, keys, keys, 3).tolist() == [[[0, 1, 2]]]


def test_compress_observes_the_prompts_queries():
    g = torch.Generator().manual_seed(3)
    keys, queries = torch.randn(1, 1, 6, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)
    policy = H2O(recent_fraction=0.0)
    acc = group_attention(causal_attention(queries, keys), 1).sum(dim=-2)[0, 0]
    want = sorted(acc.topk(2).indices.tolist())
    assert policy.compress(keys, keys, queries, 2)[2].tolist() == [[want]]


def test_the_score_contract_is_prefill_then_score_tokens():
    g = torch.Generator().manual_seed(1)
    keys, queries = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 4, 6, 4, generator=g)
    policy = H2O()
    want = group_attention(causal_attention(queries, keys), 2).sum(dim=-2)
    assert torch.allclose(policy.score(keys, keys, queries), want)


def test_the_base_class_scores_nothing_itself():
    with pytest.raises(NotImplementedError):
        EvictionPolicy().score_tokens(EvictionState.empty(1, 1), torch.zeros(1, 1, 0, 2), torch.zeros(1, 1, 0, 2))
    assert EvictionPolicy().min_budget() == 1
    assert EvictionPolicy().recent_window(8) == 0


# ------------------------------------------------------------------------------------------ kvpress presets
@pytest.mark.parametrize(("press", "kwargs", "message"), [
    ("h2o", {}, "unknown press 'h2o'; choose from streaming_llm, knorm, snapkv, tova, observed_attention"),
    ("knorm", {"compression_ratio": 0.5}, "compression_ratio is not a policy setting: pass kvpress_budget("
                                          "num_tokens, compression_ratio) as the budget of compress()"),
    ("knorm", {"x": 1}, "press 'knorm' has no kwargs ['x']; it takes none"),
    ("snapkv", {"window": 1, "a": 2}, "press 'snapkv' has no kwargs ['a', 'window']; it takes window_size, "
                                      "kernel_size"),
])
def test_kvpress_errors_name_what_is_allowed(press, kwargs, message):
    with pytest.raises(ValueError, match=exactly(message)):
        kvpress_compatible(press, **kwargs)


def test_kvpress_budget_truncates_and_checks_its_inputs():
    assert kvpress_budget(100, 0.8) == 19
    assert kvpress_budget(100, 0.0) == 100
    assert kvpress_budget(3, 0.9) == 1
    assert kvpress_budget(1, 0.5) == 1
    for n, ratio, message in [
        (0, 0.5, "num_tokens must be an integer >= 1, got 0"),
        (True, 0.5, "num_tokens must be an integer >= 1, got True"),
        (10, 1.0, "compression_ratio (the share of tokens removed) must lie in [0, 1), got 1.0"),
        (10, -0.1, "compression_ratio (the share of tokens removed) must lie in [0, 1), got -0.1"),
        (10, True, "compression_ratio (the share of tokens removed) must lie in [0, 1), got True"),
        (10, math.inf, "compression_ratio (the share of tokens removed) must lie in [0, 1), got inf"),
        (10, "0.5", "compression_ratio (the share of tokens removed) must lie in [0, 1), got '0.5'"),
    ]:
        with pytest.raises(ValueError, match=exactly(message)):
            kvpress_budget(n, ratio)


def test_kvpress_preset_skips_policies_without_a_press_of_their_name():
    assert kvpress_hyperparameters(["streaming_llm", "h2o", "knorm", "tova"]) == {
        "streaming_llm": {"n_sink": 4}, "knorm": {}, "tova": {"per_head": False, "keep_last": True}}
    assert kvpress_hyperparameters([]) == {}


def test_make_policy_errors():
    assert make_policy("h2o", recent_fraction=0.25) == H2O(0.25)
    with pytest.raises(ValueError, match=exactly(f"unknown policy 'lfu'; choose from {', '.join(POLICIES)}")):
        make_policy("lfu")


# ------------------------------------------------------------------------------------------ masks
def test_additive_mask_repeats_each_kv_head_for_its_query_group():
    allowed = torch.tensor([[[True, False]], [[False, True]]])  # [Hkv=2, Tq=1, T=2]
    mask = additive_mask(allowed, 2, torch.float32)
    low = torch.finfo(torch.float32).min
    assert mask.shape == (1, 4, 1, 2)
    assert mask[0, :, 0].tolist() == [[0.0, low], [0.0, low], [low, 0.0], [low, 0.0]]


def test_decode_mask_reads_the_kept_positions_and_itself():
    low = torch.finfo(torch.float16).min
    mask = decode_mask(torch.tensor([[0, 2, 3], [1, 2, 4]]), 6, 1, torch.float16)  # [Hkv=2, m=3], length 6
    assert (mask.shape, mask.dtype) == ((1, 2, 1, 6), torch.float16)
    assert mask[0, :, 0].tolist() == [[0.0, low, 0.0, 0.0, low, 0.0], [low, 0.0, 0.0, low, 0.0, 0.0]]


def test_prefill_mask_reads_kept_prompt_positions_and_the_continuation_causally():
    low = torch.finfo(torch.float32).min
    mask = prefill_mask(torch.tensor([[1]]), 3, 5, 1, torch.float32)  # prompt 3 (keep 1), continuation 2
    assert mask.shape == (1, 1, 2, 5)
    assert mask[0, 0].tolist() == [[low, 0.0, low, 0.0, low], [low, 0.0, low, 0.0, 0.0]]
    two = prefill_mask(torch.tensor([[0, 2], [1, 2]]), 3, 4, 2, torch.float32)  # 2 KV heads keep 2 each
    assert two.shape == (1, 4, 1, 4)
    assert two[0, :, 0].tolist() == [[0.0, low, 0.0, 0.0]] * 2 + [[low, 0.0, 0.0, 0.0]] * 2


# ------------------------------------------------------------------------------------------ the hook
def feed(cache: LabCache, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in range(2):
        cache.update(torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g), layer)


def step_state(cache: LabCache, start: int, n: int, attentions=None) -> StepState:
    return StepState(cache, torch.arange(start, start + n)[None], attentions=attentions)


def test_the_hook_holds_every_layer_at_the_budget_and_counts_evictions():
    hook = EvictionHook(SlidingWindow(), 3)
    assert hook.evicts
    cache = LabCache(2)
    feed(cache, 5, 0)
    hook(step_state(cache, 0, 5))  # 5 > 3: keep the newest 3 in both layers (2 tokens x 2 layers x 2 heads)
    assert [cache.num_tokens(i) for i in range(2)] == [3, 3]
    assert hook.evicted == 8
    assert [s.positions.tolist() for s in hook.states] == [[[[2, 3, 4]] * 2]] * 2
    assert [s.layer for s in hook.states] == [0, 1]
    feed(cache, 1, 1)
    hook(step_state(cache, 5, 1))
    assert hook.evicted == 12
    assert hook.states[0].positions.tolist() == [[[3, 4, 5]] * 2]
    cache_at_budget = LabCache(2)
    feed(cache_at_budget, 3, 3)
    hook(step_state(cache_at_budget, 0, 3))  # a new cache: the states and the count start afresh; 3 <= 3 stays
    assert (hook.cache, hook.evicted, hook.states[0].step) == (cache_at_budget, 0, 3)
    assert cache_at_budget.num_tokens(0) == 3


def test_the_hook_never_evicts_for_full_or_attention_only_policies():
    for policy in (FullCache(), AttentionWindow()):
        hook = EvictionHook(policy, 2)
        assert not hook.evicts
        cache = LabCache(2)
        feed(cache, 5, 0)
        hook(step_state(cache, 0, 5))
        assert (cache.num_tokens(0), hook.evicted) == (5, 0)
    hook = EvictionHook(AttentionWindow(), 2)
    cache = LabCache(2)
    feed(cache, 5, 0)
    hook(step_state(cache, 0, 5))
    assert hook.readable(cache).tolist() == [[3, 4], [3, 4]]


def test_the_hook_feeds_grouped_attention_to_attention_policies():
    hook = EvictionHook(H2O(recent_fraction=0.0), 2)
    cache = LabCache(2)
    feed(cache, 3, 0)
    rows = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.1, 0.7]])
    per_head = torch.stack([rows, rows, rows, rows])[None]  # [1, Hq=4, 3, 3]: 2 query heads per KV head
    message = "h2o(recent_fraction=0.0) reads attention: its plan must need_attentions"
    with pytest.raises(ValueError, match=exactly(message)):
        hook(step_state(cache, 0, 3))
    hook = EvictionHook(H2O(recent_fraction=0.0), 2)
    hook(step_state(cache, 0, 3, attentions=(per_head, per_head)))
    # column sums 1.7, .6, .7: keep keys 0 and 2 in every layer and head
    assert hook.states[1].positions.tolist() == [[[0, 2], [0, 2]]]
    assert approx(hook.states[1].stats["acc"]) == [1.7, 0.7] * 2


def test_the_hook_counts_evictions_over_batch_rows_heads_and_layers():
    hook = EvictionHook(SlidingWindow(), 1)  # the smallest budget
    cache = LabCache(2)
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        cache.update(torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g), layer)
    hook(step_state(cache, 0, 4))  # 3 of 4 tokens x 2 rows x 3 KV heads x 2 layers
    assert hook.evicted == 3 * 2 * 3 * 2
    assert hook.states[1].positions.tolist() == [[[3]] * 3] * 2


def test_the_hook_checks_its_settings():
    for policy, budget, message in [
        (object(), 4, "EvictionHook needs a kvcore.eviction policy, got object"),
        (H2O(), 0, "budget must be an integer >= 1 token, got 0"),
        (H2O(), True, "budget must be an integer >= 1 token, got True"),
        (H2O(), 2.0, "budget must be an integer >= 1 token, got 2.0"),
    ]:
        with pytest.raises(ValueError, match=exactly(message)):
            EvictionHook(policy, budget)


def test_eviction_plan_names_the_policy_and_budget():
    plan = eviction_plan(H2O(), 8, "rerotate")
    assert (plan.name, plan.positions, plan.needs_attentions) == ("h2o(recent_fraction=0.5) @ 8", "rerotate", True)
    assert (plan.hook.policy, plan.hook.budget) == (H2O(), 8)
    assert eviction_plan(SlidingWindow(), 4).needs_attentions is False
    assert eviction_plan(SlidingWindow(), 4).positions == "original"
