"""What an eviction run measures, pinned: counters, mass, error, sinks and the visibility map.

The meter is fed a handmade reference (one layer, two query heads sharing one KV head, four tokens) and
every number is counted by hand; a slow loop over (layer, head, key) is the reference for random maps.
On a tiny random Llama, a sliding window's counters are recomputed from the full-cache attention alone
(query t reads tokens t - k .. t), so a run's hits, misses, mass and evictions are checked end to end.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcore.eviction import POLICIES, SlidingWindow, StreamingLLM
from kvcore.eviction.claims import COLUMNS as CLAIM_COLUMNS
from kvcore.eviction.evaluate import (
    TIMED_STEPS,
    EvictionConfig,
    RunSpec,
    decode_speed,
    evaluate,
    result_row,
    run_all,
    run_key,
    summarize,
    token_table,
)
from kvcore.eviction.metrics import AttentionMeter
from kvcore.eviction.reference import Reference, received_vs_uniform, reference_pass
from kvcore.eviction.runner import run_decode, run_policy, run_prefill
from kvcore.models.attention import AttentionPatterns, detect_patterns
from kvcore.models.runtime import attention_implementation

# attn[layer 0][query head][query t] over keys 0..3
HEAD0 = [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.7, 0.1, 0.2, 0], [0.4, 0.1, 0.1, 0.4]]
HEAD1 = [[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0.2, 0.2, 0.6, 0], [0.1, 0.5, 0.2, 0.2]]



def exactly(message: str) -> str:
    """A ``pytest.raises`` pattern that matches the whole message, not a part of it."""
    return f"^{re.escape(message)}$"


def handmade(sinks: tuple[int, ...] = (0,), attn: torch.Tensor | None = None, num_kv_heads: int = 1) -> Reference:
    a = torch.tensor([[HEAD0, HEAD1]]) if attn is None else attn  # [L, Hq, T, T]
    L, _, T, _ = a.shape
    outputs = torch.zeros(L, T, 2)
    outputs[..., 0], outputs[..., 1] = 3.0, 4.0  # every full-cache output is (3, 4): norm 5
    patterns = pd.DataFrame({"sink": [i in sinks for i in range(T)]})
    return Reference(ids=torch.zeros(1, T + 1, dtype=torch.long), nll=torch.zeros(T), attn=a, outputs=outputs,
                     num_kv_heads=num_kv_heads, kv_bytes=0, seconds=0.0, patterns=patterns)


def vis(*positions: int) -> torch.Tensor:
    return torch.tensor([[list(positions)]])  # [L=1, Hkv=1, m]


def test_a_query_that_lost_keys_counts_its_hits_misses_mass_and_error():
    """Query 3 reads keys 0 and 3. Uniform share 1/4: head 0 needs keys 0 and 3 (0.4, 0.4), head 1 needs
    key 1 (0.5). Lookups 3; hits 2 (head 0's); mass (0.4 + 0.4 + 0.1 + 0.2) / 2 = 0.55."""
    meter = AttentionMeter(handmade(), hit_ratio=1.0)
    meter.step(3, vis(0, 3), torch.tensor([[3.0, 0.0]]))
    assert (meter.lookups, meter.hits, meter.steps) == (3, 2, 1)
    mass, error = meter.means()
    assert mass.tolist() == pytest.approx([0.55])
    assert error.tolist() == pytest.approx([4.0 / 5.0])  # |(3, 0) - (3, 4)| / |(3, 4)|
    assert meter.visible[3].tolist() == [255, 0, 0, 255]
    assert meter.visible[2].tolist() == [255, 255, 255, 0]  # not measured: the whole prefix


def test_a_higher_hit_ratio_counts_fewer_lookups():
    meter = AttentionMeter(handmade(), hit_ratio=2.0)  # needs >= 0.5: only head 1's key 1
    meter.step(3, vis(0, 3), torch.tensor([[3.0, 4.0]]))
    assert (meter.lookups, meter.hits) == (1, 0)
    assert meter.means()[1].tolist() == [0.0]
    meter = AttentionMeter(handmade(), hit_ratio=1.6)  # needs >= 0.4: head 0's keys 0 and 3, head 1's key 1
    meter.step(3, vis(1, 3), torch.tensor([[3.0, 4.0]]))
    assert (meter.lookups, meter.hits) == (3, 2)


def test_steps_accumulate_and_means_divide_by_the_steps():
    meter = AttentionMeter(handmade(), hit_ratio=1.0)
    # Query 2 reads keys 1, 2: head 0 needs key 0 (0.7) [1/3 = 0.333]; head 1 needs key 2 (0.6).
    meter.step(2, vis(1, 2), torch.tensor([[3.0, 2.0]]))  # error |(0, -2)| / 5
    assert (meter.lookups, meter.hits) == (2, 1)
    meter.step(3, vis(0, 3), torch.tensor([[0.0, 4.0]]))  # error |(-3, 0)| / 5
    assert (meter.lookups, meter.hits, meter.steps) == (5, 3, 2)
    mass, error = meter.means()
    assert mass.tolist() == pytest.approx([((0.1 + 0.2 + 0.2 + 0.6) / 2 + 0.55) / 2])
    assert error.tolist() == pytest.approx([(2.0 / 5.0 + 3.0 / 5.0) / 2])
    assert meter.visible[2].tolist() == [0, 255, 255, 0]
    assert meter.visible.dtype == np.uint8


def test_output_error_is_relative_per_layer():
    """Two layers: layer 0 is off by (0, 4) of (3, 4), layer 1 is exact; a small reference output (norm 0.5)
    is not rounded up."""
    a = torch.tensor([[HEAD0, HEAD1], [HEAD1, HEAD0]])
    ref = handmade(attn=a, num_kv_heads=2)
    meter = AttentionMeter(ref, hit_ratio=1.0)
    meter.step(3, torch.tensor([[[0, 3]], [[0, 3]]]).expand(2, 2, 2), torch.tensor([[3.0, 0.0], [3.0, 4.0]]))
    assert meter.means()[1].tolist() == pytest.approx([0.8, 0.0])
    small = handmade()
    small.outputs = small.outputs / 10  # (0.3, 0.4): norm 0.5
    meter = AttentionMeter(small, hit_ratio=1.0)
    meter.step(3, vis(0, 3), torch.tensor([[0.3, 0.0]]))
    assert meter.means()[1].tolist() == pytest.approx([0.4 / 0.5])


def test_no_measured_step_means_full_mass_and_no_error():
    meter = AttentionMeter(handmade(), hit_ratio=1.0)
    mass, error = meter.means()
    assert (mass.tolist(), error.tolist()) == ([1.0], [0.0])
    assert (meter.lookups, meter.hits, meter.steps) == (0, 0, 0)
    assert meter.visible.tolist() == [[255, 0, 0, 0], [255, 255, 0, 0], [255, 255, 255, 0], [255, 255, 255, 255]]
    message = "hit_ratio must be > 0 (a multiple of the uniform attention share), got 0.0"
    with pytest.raises(ValueError, match=exactly(message)):
        AttentionMeter(handmade(), hit_ratio=0.0)


def test_sinks_retained_counts_readable_sink_entries():
    meter = AttentionMeter(handmade(sinks=(0, 1)), hit_ratio=1.0)
    assert meter.sinks_retained(vis(0, 3)) == (1, 2)
    assert meter.sinks_retained(vis(2, 3)) == (0, 2)
    assert meter.sinks_retained(vis(0, 1, 3)) == (2, 2)
    assert meter.sinks_retained(None) == (2, 2)  # nothing measured: nothing was evicted
    assert AttentionMeter(handmade(sinks=()), hit_ratio=1.0).sinks_retained(vis(0, 3)) == (0, 0)


def test_sinks_and_visibility_count_layers_and_kv_heads():
    """2 layers x 2 KV heads (one query head each): 4 (layer, KV head) pairs."""
    a = torch.tensor([[HEAD0, HEAD1], [HEAD1, HEAD0]])  # [L=2, Hq=2, 4, 4]
    meter = AttentionMeter(handmade(sinks=(0,), attn=a, num_kv_heads=2), hit_ratio=1.0)
    read = torch.tensor([[[0, 3], [1, 3]], [[1, 3], [2, 3]]])  # [L, Hkv, m]: key 0 readable in 1 of 4 pairs
    assert meter.sinks_retained(read) == (1, 4)
    meter.step(3, read, torch.tensor([[3.0, 4.0], [3.0, 4.0]]))
    assert meter.visible[3].tolist() == [64, 128, 64, 255]  # 1/4, 2/4, 1/4, 4/4 of 255, rounded
    # layer 0: KV head 0 reads 0, 3 of HEAD0's row 3 (0.8), KV head 1 reads 1, 3 of HEAD1's (0.7);
    # layer 1: KV head 0 reads 1, 3 of HEAD1's row 3 (0.7), KV head 1 reads 2, 3 of HEAD0's (0.5)
    assert meter.means()[0].tolist() == pytest.approx([(0.8 + 0.7) / 2, (0.7 + 0.5) / 2])


def brute_force(ref: Reference, t: int, read: torch.Tensor, hit_ratio: float) -> tuple[int, int, list[float]]:
    """Lookups, hits and per-layer mass of query ``t`` by loops over layers, query heads and keys."""
    L, Hq = ref.attn.shape[:2]
    groups = Hq // ref.num_kv_heads
    lookups = hits = 0
    mass = []
    for layer in range(L):
        total = 0.0
        for h in range(Hq):
            readable = set(read[layer, h // groups].tolist())
            for j in range(t + 1):
                a = float(ref.attn[layer, h, t, j])
                if a >= hit_ratio / (t + 1):
                    lookups += 1
                    hits += j in readable
                if j in readable:
                    total += a
        mass.append(total / Hq)
    return lookups, hits, mass


@pytest.mark.parametrize("seed", range(4))
def test_counters_match_a_loop_over_random_maps(seed):
    g = torch.Generator().manual_seed(seed)
    L, Hq, Hkv, T = 2, 4, 2, 9
    logits = torch.randn(L, Hq, T, T, generator=g) * 2
    a = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
    ref = handmade(attn=a, num_kv_heads=Hkv)
    ref.outputs = torch.randn(L, T, 8, generator=g)
    meter = AttentionMeter(ref, hit_ratio=1.5)
    want_lookups = want_hits = 0
    want_mass = torch.zeros(L)
    for t in range(4, T):
        read = torch.stack([torch.stack([torch.randperm(t, generator=g)[:3] for _ in range(Hkv)])
                            for _ in range(L)])
        read = torch.cat([read, torch.full((L, Hkv, 1), t)], dim=-1)  # [L, Hkv, 4]: 3 old keys and itself
        meter.step(t, read, ref.outputs[:, t])
        lookups, hits, mass = brute_force(ref, t, read, 1.5)
        want_lookups, want_hits, want_mass = want_lookups + lookups, want_hits + hits, want_mass + torch.tensor(mass)
    assert (meter.lookups, meter.hits) == (want_lookups, want_hits)
    assert meter.hits < meter.lookups
    assert torch.allclose(meter.means()[0], want_mass / 5)
    assert meter.means()[1].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------------ on a tiny model
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 21), generator=torch.Generator().manual_seed(2))
    return model, reference_pass(model, ids)


def window_counters(ref: Reference, k: int) -> tuple[int, int, list[float]]:
    """A sliding window of ``k``: query t (t >= k) reads t - k .. t. Summed over every measured query."""
    lookups = hits = 0
    mass = [0.0] * ref.num_layers
    for t in range(k, ref.num_fed):
        read = torch.arange(t - k, t + 1).expand(ref.num_layers, ref.num_kv_heads, -1)
        n_lookups, n_hits, per_layer = brute_force(ref, t, read, 1.0)
        lookups, hits = lookups + n_lookups, hits + n_hits
        mass = [m + p for m, p in zip(mass, per_layer, strict=True)]
    steps = ref.num_fed - k
    return lookups, hits, [m / steps for m in mass]


def test_the_reference_records_the_full_cache(tiny):
    _, ref = tiny
    assert (ref.num_fed, ref.num_layers, ref.groups, ref.num_kv_heads) == (20, 2, 2, 2)
    assert ref.attn.shape == (2, 4, 20, 20)
    assert torch.allclose(ref.attn.sum(-1), torch.ones(2, 4, 20))
    assert float(ref.attn.triu(1).abs().sum()) == 0.0
    assert ref.outputs.shape == (2, 20, 16)
    assert ref.sinks == ref.patterns.index[ref.patterns["sink"]].tolist()


def test_a_sliding_window_run_counts_what_a_loop_over_the_reference_counts(tiny):
    model, ref = tiny
    run = run_decode(model, ref, SlidingWindow(), 6)
    lookups, hits, mass = window_counters(ref, 6)
    assert (run.lookups, run.hits) == (lookups, hits)
    assert 0 < run.hits < run.lookups
    assert run.mass.tolist() == pytest.approx(mass, abs=1e-5)
    assert run.evictions == (20 - 6) * 2 * 2
    assert (run.policy, run.label, run.budget, run.mode, run.positions, run.scored_from) == (
        "sliding_window", "sliding_window", 6, "decode", "original", 1)
    assert run.nll.shape == (20,)
    assert torch.equal(run.nll[:6], ref.nll[:6])  # the first 6 tokens go in one forward, nothing evicted yet
    assert run.visible[10].tolist() == [0] * 4 + [255] * 7 + [0] * 9
    assert run.visible[3].tolist() == [255] * 4 + [0] * 16


def with_sinks(ref: Reference, *sinks: int) -> Reference:
    """The same reference with these positions flagged as sinks (the tiny random model has none)."""
    return replace(ref, patterns=ref.patterns.assign(sink=[i in sinks for i in range(ref.num_fed)]))


def test_streaming_llm_keeps_its_sinks_readable_to_the_end(tiny):
    model, ref = tiny
    ref = with_sinks(ref, 0, 1, 9)
    run = run_decode(model, ref, StreamingLLM(n_sink=2), 6)
    # The last query (19) reads 0, 1 and 15..19: sinks 0 and 1 in each of 2 layers x 2 KV heads (8 entries of
    # 3 sinks x 4 = 12); 9 is gone.
    assert (run.sinks_retained, run.sinks_total) == (8, 12)
    full = run_decode(model, ref, POLICIES["full"](), 6)
    assert (full.sinks_retained, full.sinks_total) == (12, 12)
    assert (full.hits, full.evictions) == (full.lookups, 0)


def test_prefill_compression_scores_the_continuation_against_the_kept_prompt(tiny):
    model, ref = tiny
    run = run_prefill(model, with_sinks(ref, 0, 9), SlidingWindow(), 4, prompt_tokens=10)
    assert (run.budget, run.scored_from, run.nll.shape, run.mode, run.positions) == (4, 11, (10,), "prefill",
                                                                                       "original")
    assert (run.sinks_retained, run.sinks_total) == (4, 8)  # 9 is kept in 2 layers x 2 KV heads, 0 is not
    assert run.load_1min >= 0
    assert run.evictions == (10 - 4) * 2 * 2
    # query t >= 10 reads the kept prompt tokens 6..9 and the continuation 10..t
    lookups = hits = 0
    for t in range(10, 20):
        read = torch.cat([torch.arange(6, 10), torch.arange(10, t + 1)]).expand(2, 2, -1)
        n_lookups, n_hits, _ = brute_force(ref, t, read, 1.0)
        lookups, hits = lookups + n_lookups, hits + n_hits
    assert (run.lookups, run.hits) == (lookups, hits)
    assert run_policy(model, ref, SlidingWindow(), 4, mode="prefill", prompt_tokens=10).hits == hits
    assert run_policy(model, ref, SlidingWindow(), 4, mode="prefill", prompt_tokens=8).scored_from == 9
    default = run_prefill(model, ref, SlidingWindow(), 4)  # half the fed tokens
    assert (default.scored_from, default.nll.shape) == (11, (10,))
    one = run_prefill(model, ref, SlidingWindow(), 1, prompt_tokens=1)  # the shortest prompt
    assert (one.scored_from, one.budget, one.evictions) == (2, 1, 0)
    assert result_row(ref, one)["budget_share"] == 1.0
    with pytest.raises(ValueError, match=exactly("prompt_tokens must be in [1, 19] for this text, got 20")):
        run_prefill(model, ref, SlidingWindow(), 4, prompt_tokens=20)
    with pytest.raises(ValueError, match=exactly("prompt_tokens must be in [1, 19] for this text, got 0")):
        run_prefill(model, ref, SlidingWindow(), 4, prompt_tokens=0)


def test_runs_refuse_unknown_modes_and_positions(tiny):
    model, ref = tiny
    with pytest.raises(ValueError, match=exactly("positions must be one of ('original', 'rerotate'), got 'absolute'")):
        run_policy(model, ref, SlidingWindow(), 4, positions="absolute")
    with pytest.raises(ValueError, match=exactly("mode must be one of ('decode', 'prefill'), got 'offline'")):
        run_policy(model, ref, SlidingWindow(), 4, mode="offline")


def test_decode_step_times_are_one_per_decoded_token_and_add_up(tiny):
    """Timings are checked only against each other and the time around the call, never against a speed."""
    model, ref = tiny
    seen = []
    start = time.perf_counter()
    run = run_decode(model, ref, SlidingWindow(), 6, on_step=lambda t, cache: seen.append((t, cache.num_tokens(0))))
    elapsed = time.perf_counter() - start
    assert seen == [(t, 6) for t in range(6, 20)]
    assert isinstance(run.step_ms, np.ndarray)
    assert len(run.step_ms) == 20 - 6
    assert (run.step_ms > 0).all()
    assert run.step_ms.sum() / 1e3 <= run.seconds <= elapsed
    assert run.load_1min >= 0
    start = time.perf_counter()
    prefill = run_prefill(model, ref, SlidingWindow(), 4, prompt_tokens=10)
    assert 0 < prefill.seconds <= time.perf_counter() - start
    assert len(prefill.step_ms) == 0


def test_the_full_cache_decodes_one_by_one_after_its_first_forward(tiny):
    model, ref = tiny
    whole = run_decode(model, ref, POLICIES["full"](), 6)  # no full_prefill: the whole text in one forward
    assert (whole.budget, len(whole.step_ms), whole.evictions) == (20, 0, 0)
    stepped = run_decode(model, ref, POLICIES["full"](), 6, full_prefill=5)
    assert (stepped.budget, len(stepped.step_ms), stepped.evictions) == (20, 15, 0)
    assert torch.allclose(stepped.nll, ref.nll, atol=1e-5)
    assert stepped.hits == stepped.lookups > 0
    assert len(run_decode(model, ref, POLICIES["full"](), 6, full_prefill=1).step_ms) == 19
    assert len(run_decode(model, ref, POLICIES["full"](), 6, full_prefill=20).step_ms) == 0
    for bad in (0, 21):
        with pytest.raises(ValueError, match=exactly(f"full_prefill must be in 1..20, got {bad}")):
            run_decode(model, ref, POLICIES["full"](), 6, full_prefill=bad)


def test_rerotated_positions_reach_the_cache(tiny):
    """StreamingLLM keeps sinks and a window that are not contiguous: re-rotating them changes the numbers
    (a contiguous window would not change: RoPE sees relative positions only)."""
    model, ref = tiny
    original = run_decode(model, ref, StreamingLLM(n_sink=2), 6)
    rerotated = run_decode(model, ref, StreamingLLM(n_sink=2), 6, "rerotate")
    assert rerotated.positions == "rerotate"
    assert not torch.equal(original.nll, rerotated.nll)  # the tiny random model moves by about 1e-4
    compressed = run_prefill(model, ref, StreamingLLM(n_sink=2), 5, "rerotate", prompt_tokens=10)
    assert not torch.equal(compressed.nll, run_prefill(model, ref, StreamingLLM(n_sink=2), 5, prompt_tokens=10).nll)


# ------------------------------------------------------------------------------------------ the sweep's rows
def test_a_result_row_derives_its_counters_shares_and_speed(tiny):
    model, ref = tiny
    run = replace(run_decode(model, ref, SlidingWindow(), 5), lookups=10, hits=7, kv_bytes_held=ref.kv_bytes // 4,
                  nll=torch.full((20,), math.log(3.0)), step_ms=np.array([50.0, 4.0, 2.0, 3.0, 1.0]))
    row = result_row(ref, run)
    assert (row["policy"], row["label"], row["mode"], row["positions"]) == (
        "sliding_window", "sliding_window", "decode", "original")
    assert (row["budget_tokens"], row["budget_share"], row["scored_tokens"]) == (5, 5 / 20, 20)
    assert (row["lookups"], row["hits"], row["misses"], row["hit_rate"]) == (10, 7, 3, 0.7)
    assert row["ppl"] == pytest.approx(3.0)
    assert row["ppl_full"] == pytest.approx(math.exp(float(ref.nll.double().mean())))
    assert row["mass_retained"] == pytest.approx(float(run.mass.mean()))
    assert row["output_error"] == pytest.approx(float(run.output_error.mean()))
    assert (row["evictions"], row["sinks_retained"], row["sinks_total"]) == (
        run.evictions, run.sinks_retained, run.sinks_total)
    assert (row["kv_bytes_held"], row["kv_bytes_full"], row["kv_share"]) == (
        ref.kv_bytes // 4, ref.kv_bytes, (ref.kv_bytes // 4) / ref.kv_bytes)
    # decode speed: the first step is warm-up; the median of 4, 2, 3, 1 is 2.5 ms (1, 2, 3, 4: quartiles 1.75, 3.25)
    assert (row["decode_ms"], row["decode_ms_q1"], row["decode_ms_q3"], row["decode_steps"]) == (2.5, 1.75, 3.25, 4)
    assert row["tokens_per_s"] == pytest.approx(400.0)
    empty = result_row(ref, replace(run, lookups=0, hits=0))
    assert (empty["hit_rate"], empty["misses"]) == (1.0, 0)
    assert row["vs_full"] != "baseline"
    assert result_row(ref, replace(run, policy="full"))["vs_full"] == "baseline"
    assert math.isnan(result_row(replace(ref, kv_bytes=0), run)["kv_share"])


def test_a_prefill_row_shares_the_budget_of_the_prompt(tiny):
    model, ref = tiny
    run = run_prefill(model, ref, SlidingWindow(), 4, prompt_tokens=10)
    row = result_row(ref, run)
    assert (row["budget_share"], row["scored_tokens"]) == (4 / 10, 10)
    assert row["ppl_full"] == pytest.approx(math.exp(float(ref.nll[10:].double().mean())))
    assert (row["decode_steps"], math.isnan(row["decode_ms"]), math.isnan(row["tokens_per_s"])) == (0, True, True)
    assert run_key(run) == "sliding_window@4"


def test_decode_speed_without_steps_or_with_zero_time():
    run = SimpleNamespace(step_ms=np.array([9.0, 0.0, 0.0]), load_1min=1.5)
    speed = decode_speed(run)
    assert (speed["decode_ms"], speed["decode_steps"], speed["load_1min"]) == (0.0, 2, 1.5)
    assert math.isnan(speed["tokens_per_s"])
    assert decode_speed(run, warmup=0)["decode_steps"] == 3
    fast = decode_speed(SimpleNamespace(step_ms=np.array([9.0, 0.5]), load_1min=0.5))
    assert (fast["decode_ms"], fast["tokens_per_s"]) == (0.5, 2000.0)
    none = decode_speed(SimpleNamespace(step_ms=np.array([9.0]), load_1min=0.5))
    assert (none["decode_steps"], none["load_1min"]) == (0, 0.5)
    assert all(math.isnan(none[k]) for k in ("decode_ms", "decode_ms_q1", "decode_ms_q3", "tokens_per_s"))


# ------------------------------------------------------------------------------------------ the sweep's config
def test_a_sweep_runs_full_once_then_every_policy_at_every_distinct_budget():
    config = EvictionConfig(("h2o", "random", "h2o", "full"), (8, 0.5, 8), {"h2o": {"recent_fraction": 0.25}},
                            seed=3, max_tokens=64)
    runs = config.runs()
    assert [(r.policy, r.budget) for r in runs] == [("full", 1.0), ("h2o", 8), ("h2o", 0.5), ("random", 8),
                                                    ("random", 0.5)]
    assert runs[1].hyperparameters == (("recent_fraction", 0.25),)
    assert runs[3].make_policy() == POLICIES["random"](seed=3)
    assert runs[1].label == "h2o(recent_fraction=0.25) @ 8"
    assert EvictionConfig(("random",), (8,), {"random": {"seed": 9}}, seed=3).runs()[1].hyperparameters == (
        ("seed", 9),)
    assert (runs[0].positions, runs[0].mode, runs[0].prompt_tokens, runs[0].hit_ratio, runs[0].budget_rule) == (
        "original", "decode", None, 1.0, "round")
    other = EvictionConfig(("h2o",), (0.5,), positions="rerotate", mode="prefill", prompt_tokens=12, hit_ratio=2.0,
                           budget_rule="kvpress").runs()[1]
    assert (other.positions, other.mode, other.prompt_tokens, other.hit_ratio, other.budget_rule) == (
        "rerotate", "prefill", 12, 2.0, "kvpress")


def test_the_page_limit_counts_runs_times_tokens():
    config = EvictionConfig(("h2o", "tova"), (8, 16), max_tokens=100)  # 5 runs x 100 tokens
    config.check_cost(500)
    with pytest.raises(ValueError, match=exactly(
            "this sweep streams 500 tokens (5 runs x 100 tokens); the page allows 499 so one view stays near half "
            "a minute of CPU: pick fewer policies or budgets, or fewer tokens (`python -m kvcore eviction` has no "
            "limit)")):
        config.check_cost(499)


@pytest.mark.parametrize(("settings", "message"), [
    ({"policies": ()}, "pick at least one policy"),
    ({"policies": ("lfu",)}, f"unknown policies ['lfu']; choose from {', '.join(POLICIES)}"),
    ({"hyperparameters": {"lfu": {}}}, f"unknown policies ['lfu']; choose from {', '.join(POLICIES)}"),
    ({"budgets": ()}, "pick at least one budget"),
    ({"budgets": (0,)}, "budget must be >= 1 token, got 0"),
    ({"budget_rule": "floor"}, "budget rule must be one of ('round', 'kvpress'), got 'floor'"),
    ({"positions": "absolute"}, "positions must be one of ('original', 'rerotate'), got 'absolute'"),
    ({"mode": "offline"}, "mode must be one of ('decode', 'prefill'), got 'offline'"),
    ({"max_tokens": 3}, "max_tokens must be >= 4, got 3"),
    ({"hit_ratio": 0.0}, "hit_ratio must be > 0, got 0.0"),
])
def test_sweep_settings_say_exactly_what_is_wrong(settings, message):
    with pytest.raises(ValueError, match=exactly(message)):
        EvictionConfig(**settings)
    EvictionConfig(max_tokens=4)  # the smallest text allowed


def test_run_all_reports_progress_after_each_run():
    seen = []
    specs = EvictionConfig(("h2o",), (8, 16)).runs()
    out = run_all(specs, lambda spec: spec.budget, lambda done, total, label: seen.append((done, total, label)))
    assert out == [1.0, 8, 16]
    assert seen == [(1, 3, "full @ 1.0"), (2, 3, "h2o(recent_fraction=0.5) @ 8"),
                    (3, 3, "h2o(recent_fraction=0.5) @ 16")]
    assert run_all(specs[:1], lambda spec: 0) == [0]


# ------------------------------------------------------------------------------------------ more runs
def test_an_attention_window_reads_what_a_sliding_window_keeps_and_stores_everything(tiny):
    model, ref = tiny
    run = run_decode(model, ref, POLICIES["attention_window"](), 6)
    lookups, hits, mass = window_counters(ref, 6)
    assert (run.lookups, run.hits, run.evictions) == (lookups, hits, 0)
    assert run.mass.tolist() == pytest.approx(mass, abs=1e-5)
    assert run.kv_bytes_held == ref.kv_bytes
    assert run.visible[10].tolist() == [0] * 4 + [255] * 7 + [0] * 9
    assert torch.allclose(run.nll, run_decode(model, ref, SlidingWindow(), 6).nll, atol=1e-5)
    prefill = run_prefill(model, ref, POLICIES["attention_window"](), 4, prompt_tokens=10)
    window = run_prefill(model, ref, SlidingWindow(), 4, prompt_tokens=10)
    assert (prefill.lookups, prefill.hits, prefill.evictions) == (window.lookups, window.hits, 0)
    assert torch.allclose(prefill.nll, window.nll, atol=1e-5)


def test_the_hit_ratio_and_the_budget_rule_reach_the_run(tiny):
    model, ref = tiny
    run = run_policy(model, ref, SlidingWindow(), 6, hit_ratio=2.0)
    lookups = hits = 0
    for t in range(6, 20):
        n_lookups, n_hits, _ = brute_force(ref, t, torch.arange(t - 6, t + 1).expand(2, 2, -1), 2.0)
        lookups, hits = lookups + n_lookups, hits + n_hits
    assert (run.lookups, run.hits) == (lookups, hits)
    # 0.29 of 20 tokens: rounded 5.8 -> 6; kvpress truncates 20 * (1 - (1 - 0.29)) -> 5
    assert run_policy(model, ref, SlidingWindow(), 0.29).budget == 6
    assert run_policy(model, ref, SlidingWindow(), 0.29, budget_rule="kvpress").budget == 5
    # 0.29 of a 10-token prompt: rounded 2.9 -> 3; truncated -> 2
    assert run_policy(model, ref, SlidingWindow(), 0.29, mode="prefill", prompt_tokens=10).budget == 3
    assert run_policy(model, ref, SlidingWindow(), 0.29, mode="prefill", prompt_tokens=10,
                      budget_rule="kvpress").budget == 2


def test_the_reference_is_one_plain_forward(tiny):
    model, fixture = tiny
    ids = fixture.ids
    start = time.perf_counter()
    ref = reference_pass(model, ids)  # here, not in a fixture, so that every line of it belongs to this test
    elapsed = time.perf_counter() - start
    with torch.no_grad(), attention_implementation(model, "eager"):
        out = model(ids[:, :-1], output_attentions=True, use_cache=True)
    want = torch.nn.functional.cross_entropy(out.logits[0], ids[0, 1:], reduction="none")
    assert ref.nll.shape == (20,)
    assert torch.allclose(ref.nll, want, atol=1e-5)
    assert torch.allclose(ref.attn, torch.stack([a[0] for a in out.attentions]), atol=1e-6)
    keys = [layer.keys[0] for layer in out.past_key_values.layers]  # [Hkv, T, D] per layer
    assert torch.allclose(ref.key_norms, torch.stack([k.norm(dim=-1) for k in keys]), atol=1e-5)
    # fp32 keys and values: 2 tensors x 2 layers x 2 KV heads x 20 tokens x head_dim 4 x 4 bytes
    assert ref.kv_bytes == 2 * 2 * 2 * 20 * 4 * 4
    assert ref.ids.shape == (1, 21)
    assert ref.thresholds == AttentionPatterns()
    assert 0 < ref.seconds <= elapsed
    pd.testing.assert_frame_equal(ref.patterns, detect_patterns(ref.attn.mean(dim=1), AttentionPatterns()))
    strict = AttentionPatterns(sink_ratio=1.5, min_distance=2, min_queries=2)
    assert reference_pass(model, ids, strict).thresholds == strict


def test_received_attention_over_the_uniform_share_by_a_loop(tiny):
    _, ref = tiny
    got = received_vs_uniform(ref)  # [L, Hkv, T]
    grouped = ref.attn.view(2, 2, 2, 20, 20).mean(dim=2)
    for layer in range(2):
        for head in range(2):
            for j in range(19):
                want = sum(float(grouped[layer, head, t, j]) * (t + 1) for t in range(j + 1, 20)) / (19 - j)
                assert float(got[layer, head, j]) == pytest.approx(want, rel=1e-5)
            assert math.isnan(float(got[layer, head, 19]))


def test_a_sweep_on_the_tiny_model_is_its_runs_rows(tiny):
    """evaluate() = reference + every run + one row each, in the config's policy order, full first."""
    model, fixture = tiny
    config = EvictionConfig(("h2o", "sliding_window"), (6,), max_tokens=21)
    progress = []
    results = evaluate(model, fixture.ids, config, on_progress=lambda done, total, label: progress.append(done))
    table = results.table
    assert table["policy"].tolist() == ["full", "h2o", "sliding_window"]
    assert progress == [1, 2, 3]
    ref = reference_pass(model, fixture.ids)
    want = result_row(ref, run_decode(model, ref, SlidingWindow(), 6))
    got = table.iloc[2]
    for column in ("lookups", "hits", "misses", "evictions", "kv_bytes_held", "kv_bytes_full", "budget_tokens",
                   "scored_tokens", "sinks_total"):
        assert got[column] == want[column], column
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert table["decode_steps"].tolist() == [TIMED_STEPS] * 3  # every run: the same real steps, warm-up left out
    assert results.layers[["policy", "layer"]].values.tolist() == [
        ["full", 0], ["full", 1], ["h2o", 0], ["h2o", 1], ["sliding_window", 0], ["sliding_window", 1]]
    assert sorted(results.visible) == ["full@20", "h2o@6", "sliding_window@6"]
    assert results.tokens["token_id"].tolist() == fixture.ids[0, :20].tolist()
    assert results.attention.shape == (2, 20, 20)
    assert results.thresholds == AttentionPatterns()
    assert results.config is config
    spec = config.runs()[2]
    assert spec.run(model, ref).hits == want["hits"]


def test_summarize_orders_rows_names_columns_and_measures_the_claims(tiny):
    model, ref = tiny
    runs = [run_decode(model, ref, POLICIES["knorm"](), 6), run_decode(model, ref, POLICIES["h2o"](), 6),
            run_decode(model, ref, POLICIES["full"](), 6, full_prefill=1)]
    config = EvictionConfig(("h2o",), (6,), max_tokens=21)
    tokenizer = SimpleNamespace(decode=lambda ids: f"<{ids[0]}>")
    results = summarize(ref, runs, config, tokenizer)
    assert results.table["policy"].tolist() == ["full", "h2o", "knorm"]  # knorm is not in the config: last
    assert list(results.layers.columns) == ["policy", "budget_tokens", "layer", "mass_retained", "output_error"]
    assert results.layers["budget_tokens"].tolist() == [20, 20, 6, 6, 6, 6]
    assert results.layers["mass_retained"].tolist() == pytest.approx([*runs[2].mass.tolist(), *runs[1].mass.tolist(),
                                                                      *runs[0].mass.tolist()])
    assert results.layers["output_error"].tolist()[2:4] == pytest.approx(runs[1].output_error.tolist())
    assert list(results.tokens.columns[:3]) == [ref.patterns.columns[0], "token_id", "token"]
    assert results.tokens["token"].tolist() == [f"<{i}>" for i in ref.ids[0, :20].tolist()]
    assert list(results.verdicts.columns) == list(CLAIM_COLUMNS)
    assert len(results.verdicts) >= 2
    assert (results.attention.shape, results.attention.dtype) == ((2, 20, 20), np.float16)
    assert results.thresholds is ref.thresholds
    assert list(token_table(ref).columns[:2]) == [ref.patterns.columns[0], "token_id"]


def test_a_run_spec_runs_what_it_names(tiny):
    model, ref = tiny
    full = RunSpec("full", (), 1.0, hit_ratio=2.0).run(model, ref)
    assert (full.mode, len(full.step_ms), full.budget) == ("decode", TIMED_STEPS + 1, 20)  # timed like every run
    assert full.lookups == run_decode(model, ref, POLICIES["full"](), 1.0, hit_ratio=2.0, full_prefill=1).lookups
    compressed = RunSpec("full", (), 1.0, mode="prefill", prompt_tokens=8).run(model, ref)
    assert (compressed.mode, compressed.scored_from) == ("prefill", 9)
    kvpress = RunSpec("sliding_window", (), 0.29, budget_rule="kvpress").run(model, ref)
    assert kvpress.budget == 5
