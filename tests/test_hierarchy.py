"""Tiered KV store and the offload simulation: conservation, eviction order, load vs recompute."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore.hierarchy import (
    POLICIES,
    ChatWorkload,
    OffloadConfig,
    RagWorkload,
    Request,
    Tier,
    TieredStore,
    chunk_keys,
    default_tiers,
    recompute_time,
    should_load,
    simulate_offload,
)
from kvcore.sched.cost import CostModel, prefill_pairs
from kvcore.shapes import GPU_PRESETS, PRESETS, kv_bytes

H100 = GPU_PRESETS["H100 80GB"]
COST = CostModel(PRESETS["llama-3-8b"], H100)
CHUNK = 256
CHUNK_BYTES = kv_bytes(PRESETS["llama-3-8b"], CHUNK)


def tier(name: str, chunks: int, read_bandwidth: float = 1e10, latency_s: float = 0.0) -> Tier:
    """A tier that holds ``chunks`` chunks of CHUNK_BYTES."""
    return Tier(name, chunks * CHUNK_BYTES, read_bandwidth, read_bandwidth, latency_s)


# -- eviction order, narrated ----------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "evicted"), [("lru", ["B", "A"]), ("fifo", ["A", "B"]), ("lfu", ["B", "D"])])
def test_eviction_order_step_by_step(policy, evicted):
    # GPU holds 3 chunks; what it evicts is demoted into a roomy CPU tier, in eviction order.
    store = TieredStore([tier("gpu", 3), tier("cpu", 10)], CHUNK_BYTES, policy)
    for key in "ABC":
        store.write(key)  # GPU: A B C (A oldest)
    store.touch("A", 0)  # A: 2 uses
    store.touch("A", 0)  # A: 3 uses
    store.touch("C", 0)  # C: 2 uses; recency now B < A < C; B has 1 use
    store.write("D")
    # LRU evicts B (least recent), FIFO evicts A (first in), LFU evicts B (1 use).
    assert list(store.orders[1]) == evicted[:1]
    store.write("E")
    # LRU: A (recency A < C < D); FIFO: B (entered after A); LFU: D (1 use, vs A 3 and C 2).
    assert list(store.orders[1]) == evicted
    assert store.evictions == [2, 0]
    assert store.moved[("gpu", "cpu", "demote")] == 2 * CHUNK_BYTES
    assert sorted(store.orders[0]) == sorted(set("ABCDE") - set(evicted))


def test_lfu_ties_go_to_the_least_recently_used():
    order = POLICIES["lfu"]()
    for key in ("x", "y", "z"):
        order.insert(key)  # all one use
    order.touch("x")  # x: 2 uses
    assert order.victim() == "y"  # y and z have one use; y entered first
    order.touch("y")  # y: 2 uses, z still 1
    assert order.victim() == "z"


def test_clean_chunk_leaves_without_a_write_and_last_tier_drops():
    # Write-through: every chunk is in GPU and CPU; GPU evictions find a copy below and move nothing.
    store = TieredStore([tier("gpu", 1), tier("cpu", 2)], CHUNK_BYTES, "lru", "write-through")
    store.write("A")  # gpu [A], cpu [A]
    store.write("B")  # gpu evicts A (clean: cpu has it); gpu [B], cpu [A, B]
    assert store.where("A") == [1]
    assert ("gpu", "cpu", "demote") not in store.moved
    store.write("C")  # gpu evicts B (clean); cpu evicts A, held nowhere else -> dropped
    assert store.drops == 1
    assert store.dropped == {"A"}
    assert store.where("B") == [1]
    assert store.where("C") == [0, 1]


def test_rewriting_a_demoted_chunk_is_not_a_drop():
    store = TieredStore([tier("gpu", 1), tier("cpu", 1)], CHUNK_BYTES, "fifo")
    store.write(0)  # gpu [0]
    store.write(1)  # gpu evicts 0 -> cpu [0]; gpu [1]
    store.write(0)  # gpu evicts 1 -> cpu must evict 0 to take it, but 0 is on its way into gpu
    assert store.where(0) == [0]
    assert store.where(1) == [1]
    assert store.drops == 0
    assert store.dropped == set()


def test_promote_keeps_the_lower_copy():
    store = TieredStore([tier("gpu", 1), tier("cpu", 4)], CHUNK_BYTES)
    store.write("A")
    store.write("B")  # A demoted to cpu
    store.promote("A", 1, 0)  # load A: gpu [A] (B demoted), cpu [A, B]
    assert store.where("A") == [0, 1]
    assert store.moved[("cpu", "gpu", "load")] == CHUNK_BYTES
    with pytest.raises(ValueError, match="moves a chunk up"):
        store.promote("A", 0, 1)


# -- conservation under random workloads -----------------------------------------------------------

ops = st.lists(st.tuples(st.sampled_from(["write", "load", "prefetch"]), st.integers(0, 11)), max_size=60)


@settings(max_examples=80)
@given(caps=st.lists(st.integers(0, 4), min_size=1, max_size=4), policy=st.sampled_from(sorted(POLICIES)),
       mode=st.sampled_from(["write-back", "write-through"]), steps=ops)
def test_every_written_chunk_is_somewhere_or_counted_dropped(caps, policy, mode, steps):
    store = TieredStore([tier(f"t{i}", c) for i, c in enumerate(caps)], CHUNK_BYTES, policy, mode)
    written: set[int] = set()
    for op, key in steps:
        if op == "write":
            store.write(key)
            written.add(key)
        elif (src := store.fastest(key)) is not None and src > (dst := 0 if op == "load" else 1):
            store.promote(key, src, dst)
        for i, order in enumerate(store.orders):
            assert len(order) <= store.capacity[i], f"tier {i} over capacity"
        live = {k for k in written if store.fastest(k) is not None}
        assert live | store.dropped == written
        assert not live & store.dropped
        assert store.drops >= len(store.dropped)


@settings(max_examples=12)
@given(seed=st.integers(0, 1000), turns=st.floats(1, 5), policy=st.sampled_from(sorted(POLICIES)),
       mode=st.sampled_from(["write-back", "write-through"]), prefetch=st.sampled_from(["off", "gpu", "cpu"]),
       gpu=st.integers(0, 6), cpu=st.integers(0, 12), disk=st.integers(0, 30))
def test_simulation_never_overfills_a_tier(seed, turns, policy, mode, prefetch, gpu, cpu, disk):
    reqs = ChatWorkload(num_requests=60, session_rate=2.0, mean_turns=turns, system_tokens=300, user_tokens=100,
                        output_tokens=150, think_time_s=5.0, seed=seed).generate()
    tiers = [tier("gpu", gpu), tier("cpu", cpu), tier("disk", disk)]
    res = simulate_offload(reqs, tiers, COST, OffloadConfig(policy=policy, write_mode=mode, prefetch=prefetch,
                                                            prefetch_lead_s=2.0, snapshots=60))
    assert (res.tiers["peak_chunks"] <= res.tiers["capacity_chunks"]).all()
    per_snapshot = res.residency.groupby(["snapshot", "tier"]).size()
    caps = dict(zip(res.tiers["tier"], res.tiers["capacity_chunks"], strict=True))
    assert all(n <= caps[t] for (_, t), n in per_snapshot.items())
    sources = [*res.tiers["tier"], "recomputed (cheaper than loading)", "computed (not cached)"]
    assert (res.requests[sources].sum(axis=1) == res.requests["prompt_tokens"]).all()
    assert res.sources["share"].sum() == pytest.approx(1.0)


# -- load vs recompute ------------------------------------------------------------------------------

def test_choice_flips_exactly_at_the_recompute_time():
    rc = recompute_time(COST, 3, CHUNK)
    assert rc == pytest.approx(COST.step_time(CHUNK, prefill_pairs(CHUNK, 3 * CHUNK), 3 * CHUNK)
                               - COST.step_overhead_s)
    faster = tier("fast", 1, read_bandwidth=CHUNK_BYTES / (rc * (1 - 1e-9)))
    slower = tier("slow", 1, read_bandwidth=CHUNK_BYTES / (rc * (1 + 1e-9)))
    assert should_load(faster, CHUNK_BYTES, COST, 3, CHUNK)
    assert not should_load(slower, CHUNK_BYTES, COST, 3, CHUNK)


def test_simulation_loads_one_chunk_and_recomputes_the_other():
    # Chunk 1 attends over chunk 0, so it costs more to recompute. A tier whose load time sits between the two
    # recompute times is skipped for chunk 0 (recomputed) and used for chunk 1 (loaded).
    rc0, rc1 = recompute_time(COST, 0, CHUNK), recompute_time(COST, 1, CHUNK)
    assert rc0 < rc1
    load = (rc0 + rc1) / 2
    tiers = [tier("gpu", 0), tier("store", 8, read_bandwidth=CHUNK_BYTES / load)]  # GPU keeps nothing
    prompt = ((7, 600),)  # 2 full chunks + 88 tokens
    reqs = [Request(0, 0.0, 0, 0, prompt, (8, 10)), Request(1, 100.0, 1, 0, prompt, (9, 10))]
    res = simulate_offload(reqs, tiers, COST, OffloadConfig(store_output=False))
    second = res.requests.iloc[1]
    assert second["store"] == CHUNK  # chunk 1 loaded
    assert second["recomputed (cheaper than loading)"] == CHUNK  # chunk 0 recomputed
    assert second["computed (not cached)"] == 600 - 2 * CHUNK
    pairs = prefill_pairs(CHUNK, 0) + prefill_pairs(600 - 2 * CHUNK, 2 * CHUNK)
    assert second["ttft_s"] == pytest.approx(load + COST.step_time(CHUNK + 88, pairs, CHUNK))
    assert res.requests.iloc[0]["ttft_s"] == pytest.approx(res.requests.iloc[0]["ttft_recompute_s"])


def test_gpu_hit_is_reused_in_place():
    tiers = default_tiers(H100)
    prompt = ((7, 1024),)
    reqs = [Request(0, 0.0, 0, 0, prompt, (8, 10)), Request(1, 1.0, 1, 0, prompt, (9, 10))]
    res = simulate_offload(reqs, tiers, COST, OffloadConfig(store_output=False))
    second = res.requests.iloc[1]
    assert second["GPU HBM"] == 1024
    assert second["load_s"] == 0
    assert res.links.empty  # nothing crossed a link


# -- workloads and keys ------------------------------------------------------------------------------

def test_chunk_keys_chain_over_the_prefix():
    a = chunk_keys([(0, 300), (1, 300)], 256)  # 600 tokens: 2 full chunks
    b = chunk_keys([(0, 300), (2, 300)], 256)  # same first 300 tokens
    c = chunk_keys([(5, 300), (1, 300)], 256)  # different start
    assert len(a) == 2
    assert a[0] == b[0]
    assert a[1] != b[1]  # chunk 1 covers tokens 256-511, half from segment 1 vs 2
    assert not set(a) & set(c)
    assert chunk_keys([(0, 255)], 256) == []


def test_chat_sessions_extend_their_previous_turn():
    reqs = ChatWorkload(num_requests=200, seed=3).generate()
    assert reqs == ChatWorkload(num_requests=200, seed=3).generate()
    for r in reqs:
        if r.next_index is not None:
            nxt = reqs[r.next_index]
            assert nxt.session == r.session
            assert nxt.segments[: len(r.segments)] == r.segments
            assert nxt.segments[len(r.segments)] == r.output


def test_rag_popular_documents_recur():
    reqs = RagWorkload(num_requests=300, seed=1).generate()
    firsts = [r.segments[1][0] for r in reqs]
    assert max(firsts.count(d) for d in set(firsts)) > 10  # Zipf: the top document leads many prompts


def test_bad_settings_say_what_is_allowed():
    with pytest.raises(ValueError, match="capacity_bytes must be a finite number >= 0"):
        Tier("x", -1, 1e9, 1e9)
    with pytest.raises(ValueError, match="read_bandwidth must be > 0"):
        Tier("x", 1, 0, 1e9)
    with pytest.raises(ValueError, match="policy must be"):
        OffloadConfig(policy="random")
    with pytest.raises(ValueError, match="prefetch must be one of"):
        OffloadConfig(prefetch="disk")
    with pytest.raises(ValueError, match="mean_turns must be >= 1"):
        ChatWorkload(mean_turns=0.5)
    with pytest.raises(ValueError, match="host_link must be one of"):
        default_tiers(H100, "usb")
    assert math.isinf(Tier("inf", 1, math.inf, math.inf).read_bandwidth)


def test_default_run_fills_every_tier():
    reqs = ChatWorkload().generate()
    res = simulate_offload(reqs, default_tiers(H100), COST)
    hits = dict(zip(res.tiers["tier"], res.tiers["hit_rate_tokens"], strict=True))
    assert hits["GPU HBM"] > 0.3
    assert hits["CPU DRAM"] > 0.05
    assert hits["Local NVMe"] > 0.05
    summary = res.ttft_summary().set_index("setup")
    assert summary.loc["with hierarchy", "p50_ms"] < summary.loc["recompute whole prompt", "p50_ms"]
