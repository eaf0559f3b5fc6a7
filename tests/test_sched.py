"""kvcore.sched: the scheduler step rule on the real block manager, narrated on tiny workloads.

Tiny pools (block_size 4, a handful of blocks) make every block decision visible; the cost model is
the real one (llama-3-8b on an H100), so times are checked against ``CostModel.step_time``.
"""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from kvcore.cli import main
from kvcore.sched import (
    CostModel,
    Request,
    SimConfig,
    Workload,
    WorkloadConfig,
    compare,
    engine_configs,
    make_workload,
    parse_trace,
    prefill_pairs,
    simulate,
)
from kvcore.shapes import GPU_PRESETS, PRESETS, kv_bytes

COST = CostModel(PRESETS["llama-3-8b"], GPU_PRESETS["H100 80GB"])


def workload(*specs: tuple, prefix_tokens: int = 0) -> Workload:
    """Requests from (arrival_s, prompt_tokens, output_tokens[, prefix_id]) tuples, in arrival order."""
    return Workload(tuple(Request(i, *spec) for i, spec in enumerate(specs)), prefix_tokens=prefix_tokens)


def config(policy: str = "continuous", **kw) -> SimConfig:
    """A tiny engine: 4-token blocks, 64 blocks, 64-token budget unless told otherwise."""
    kw = {"block_size": 4, "num_blocks": 64, "max_num_seqs": 8, "max_num_batched_tokens": 64} | kw
    return SimConfig(COST, policy=policy, **kw)


def check_invariants(result, wl: Workload) -> None:
    """What must hold for any run: conservation, causality, capacity, budget, tiled phases."""
    req, tl, cfg = result.requests, result.timeline, result.config
    # every output token generated exactly once: per request, and counted step by step
    assert (req["generated_tokens"] == req["output_tokens"]).all()
    assert tl["output_tokens"].sum() == wl.total_output_tokens
    # nothing starts before it arrives; tokens come in order
    assert (req["first_scheduled_s"] >= req["arrival_s"]).all()
    assert (req["first_token_s"] > req["first_scheduled_s"]).all()
    assert (req["finish_s"] >= req["first_token_s"]).all()
    # the pool is never over-committed, and the budget holds (static has none: one pass per batch)
    assert (tl["kv_blocks_used"] <= result.num_blocks).all()
    if cfg.policy != "static":
        assert (tl["batch_tokens"] <= cfg.max_num_batched_tokens).all()
    assert (tl["running"] <= cfg.max_num_seqs).all()
    # steps follow each other in time
    assert np.allclose(tl["time_s"].iloc[1:].to_numpy(),
                       np.maximum(tl["time_s"] + tl["step_s"], tl["time_s"].shift(-1)).iloc[:-1].to_numpy())
    # each request's phases tile [arrival, finish] without gap or overlap
    for index, part in result.phases.sort_values(["request", "start_s"]).groupby("request"):
        row = req.loc[index]
        assert part["start_s"].iloc[0] == pytest.approx(row["arrival_s"])
        assert np.allclose(part["start_s"].iloc[1:].to_numpy(), part["end_s"].iloc[:-1].to_numpy())
        assert part["end_s"].iloc[-1] == pytest.approx(row["finish_s"])


def test_one_request_prefills_whole_then_decodes_one_token_per_step():
    wl = workload((0.0, 10, 4))
    res = simulate(wl, config())
    tl = res.timeline
    # step 0 computes the 10 prompt tokens (3 blocks of 4) and samples token 1; then 3 decode steps
    assert tl["prefill_tokens"].tolist() == [10, 0, 0, 0]
    assert tl["decode_tokens"].tolist() == [0, 1, 1, 1]
    assert tl["output_tokens"].tolist() == [1, 1, 1, 1]
    # KV slots: 10, 11, 12 tokens fit 3 blocks; the 13th (the decode at position 12) opens a 4th
    assert tl["kv_blocks_used"].tolist() == [3, 3, 3, 4]
    # step times are the cost model's: prefill pairs for the prompt, context + 1 pairs per decode
    assert tl["step_s"].iloc[0] == pytest.approx(COST.step_time(10, prefill_pairs(10, 0), 0))
    assert tl["step_s"].iloc[3] == pytest.approx(COST.step_time(1, 13, 12))
    r = res.requests.iloc[0]
    assert r["ttft_ms"] == pytest.approx(tl["step_s"].iloc[0] * 1e3)
    assert r["e2e_ms"] == pytest.approx(tl["step_s"].sum() * 1e3)
    assert r["tpot_ms"] == pytest.approx(tl["step_s"].iloc[1:].sum() * 1e3 / 3)
    check_invariants(res, wl)


def test_continuous_batching_lets_a_late_request_join_the_running_batch():
    wl = workload((0.0, 8, 20), (0.05, 8, 2))
    res = simulate(wl, config())
    r0, r1 = res.requests.iloc[0], res.requests.iloc[1]
    # r1 starts at the first step boundary after it arrives, while r0 is still decoding
    starts = res.timeline["time_s"]
    assert r1["first_scheduled_s"] == starts[starts >= 0.05].iloc[0]
    assert r1["finish_s"] < r0["finish_s"]
    check_invariants(res, wl)


def test_static_batching_makes_a_late_request_wait_for_the_whole_batch():
    wl = workload((0.0, 8, 20), (0.05, 8, 2))
    res = simulate(wl, config("static"))
    r0, r1 = res.requests.iloc[0], res.requests.iloc[1]
    assert r1["first_scheduled_s"] == pytest.approx(r0["finish_s"])  # no joins
    check_invariants(res, wl)


def test_static_batch_holds_finished_members_blocks_until_the_batch_ends():
    wl = workload((0.0, 4, 2), (0.0, 4, 9))
    res = simulate(wl, config("static"))
    tl = res.timeline
    # r0 is done after step 1, but its 2 blocks stay: 2 + 3 blocks while r1 decodes positions 8..11
    assert tl["running"].tolist()[:3] == [2, 2, 1]
    assert tl["kv_blocks_used"].iloc[-1] == 2 + 3
    check_invariants(res, wl)


def test_chunked_prefill_splits_a_long_prompt_and_decodes_first():
    wl = workload((0.0, 4, 10), (0.0, 20, 2))
    res = simulate(wl, config("chunked", max_num_batched_tokens=8))
    tl = res.timeline
    # step 0: r0's whole prompt (4) + a 4-token chunk of r1; then r0's decode first and 7 tokens of r1,
    # twice; then r0's decode and r1's last 2 prompt tokens (4 + 7 + 7 + 2 = 20)
    assert tl["batch_tokens"].tolist()[:4] == [8, 8, 8, 3]
    assert tl["prefill_tokens"].tolist()[:4] == [8, 7, 7, 2]
    assert tl["decode_tokens"].tolist()[:4] == [0, 1, 1, 1]
    assert res.requests["ttft_ms"].iloc[1] == pytest.approx(tl["step_s"].iloc[:4].sum() * 1e3)
    check_invariants(res, wl)


def test_continuous_waits_for_budget_room_instead_of_chunking():
    wl = workload((0.0, 4, 10), (0.0, 20, 2))
    res = simulate(wl, config("continuous", max_num_batched_tokens=22))
    # r1's 20-token prompt does not fit next to r0's 4: it goes whole in step 1, after r0's first decode
    assert res.timeline["batch_tokens"].tolist()[:2] == [4, 21]
    check_invariants(res, wl)


def test_recompute_preemption_frees_the_last_request_and_it_still_finishes():
    # 4 blocks of 4 tokens; two requests of 4 + 8 tokens each need 3 blocks apiece: the pool runs out
    wl = workload((0.0, 4, 8), (0.0, 4, 8))
    res = simulate(wl, config(num_blocks=4))
    req, tl = res.requests, res.timeline
    assert req["preemptions"].tolist() == [0, 1]  # the last admitted is preempted, as in vLLM
    step = int(tl.index[tl["preemptions"] > 0][0])
    assert tl["running"][step] == 1
    assert tl["waiting"][step] == 1
    # r1 is recomputed: prompt and generated tokens are prefilled again (no prefix cache here)
    assert res.summary["recomputed_tokens"].iloc[0] > 0
    assert tl["prefill_tokens"].sum() == 8 + res.summary["recomputed_tokens"].iloc[0]
    check_invariants(res, wl)


def test_swap_preemption_moves_kv_over_the_host_link_and_back():
    wl = workload((0.0, 4, 8), (0.0, 4, 8))
    res = simulate(wl, config(num_blocks=4, preemption="swap"))
    s = res.summary.iloc[0]
    assert s["preemptions"] == 1
    assert s["recomputed_tokens"] == 0
    # r1 held 8 computed tokens (4 prompt + 4 decoded) when it was swapped out; they come back in
    assert s["swap_GB"] == pytest.approx(2 * kv_bytes(COST.shape, 8) / 1e9)
    swap_steps = res.timeline[res.timeline["swap_s"] > 0]
    assert len(swap_steps) == 2
    assert swap_steps["swap_s"].iloc[0] == pytest.approx(kv_bytes(COST.shape, 8) / COST.gpu.host_link_bandwidth)
    check_invariants(res, wl)


def test_a_full_host_pool_falls_back_to_recompute():
    wl = workload((0.0, 4, 8), (0.0, 4, 8))
    res = simulate(wl, config(num_blocks=4, preemption="swap", host_kv_blocks=1))
    s = res.summary.iloc[0]
    assert s["swap_fallbacks"] == 1
    assert s["swap_GB"] == 0
    assert s["recomputed_tokens"] > 0
    check_invariants(res, wl)


def test_prefix_cache_hits_count_once_per_request_and_readmissions_apart():
    # r1 shares r0's 8-token prefix (2 full blocks); it arrives after r0's prefill cached them
    wl = workload((0.0, 12, 3, 0), (0.5, 12, 3, 0), prefix_tokens=8)
    res = simulate(wl, config(enable_prefix_caching=True))
    assert res.requests["prefix_hit_tokens"].tolist() == [0, 8]
    assert res.summary["prefix_hit_rate"].iloc[0] == pytest.approx(8 / 24)
    assert res.timeline["prefill_tokens"].sum() == 12 + 4
    check_invariants(res, wl)


def test_recompute_readmission_hits_its_own_blocks_but_not_the_hit_rate():
    wl = workload((0.0, 4, 8), (0.0, 4, 8))
    res = simulate(wl, config(num_blocks=5, enable_prefix_caching=True))
    s = res.summary.iloc[0]
    assert s["preemptions"] >= 1
    assert s["readmit_hit_tokens"] > 0
    assert s["prefix_hit_rate"] == 0  # the two prompts share nothing
    check_invariants(res, wl)


@pytest.mark.parametrize("policy", ["static", "continuous", "chunked"])
@pytest.mark.parametrize(("preemption", "caching"), [("recompute", False), ("recompute", True), ("swap", True)])
def test_invariants_on_a_pressured_random_workload(policy, preemption, caching):
    wl = make_workload(WorkloadConfig(num_requests=40, rate=50, prompt_mean=24, output_mean=16, max_prompt=64,
                                      max_output=48, shared_prefix_fraction=0.5, prefix_tokens=12, seed=3))
    res = simulate(wl, config(policy, num_blocks=40, preemption=preemption, enable_prefix_caching=caching,
                              max_num_batched_tokens=128))
    check_invariants(res, wl)
    if policy != "static":
        assert res.summary["preemptions"].iloc[0] > 0


def test_same_seed_same_numbers():
    wl_config = WorkloadConfig(num_requests=30, rate=40, prompt_mean=32, output_mean=16, max_prompt=96,
                               max_output=48, seed=7)
    a = simulate(make_workload(wl_config), config("chunked", num_blocks=40, enable_prefix_caching=True))
    b = simulate(make_workload(wl_config), config("chunked", num_blocks=40, enable_prefix_caching=True))
    for table in ("requests", "timeline", "phases", "summary"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table))
    c = simulate(make_workload(replace(wl_config, seed=8)), a.config)
    assert not c.requests["prompt_tokens"].equals(a.requests["prompt_tokens"])


def test_static_takes_at_least_as_long_as_continuous():
    # Not a law for every workload: with a budget that admits one prompt per step, continuous batching
    # spreads a burst's prefills over several steps where a static batch does them in one. On arrivals
    # spread over time with mixed lengths, no joins and waiting for the longest member cost far more.
    wl = make_workload(WorkloadConfig(num_requests=60, rate=30, prompt_mean=32, output_mean=24, max_prompt=96,
                                      max_output=96, seed=1))
    results = compare(wl, engine_configs(config(), ["static", "continuous"], budget=128)).summary
    static, continuous = results["makespan_s"].tolist()
    assert static >= continuous


def test_progress_reports_rising_fractions_ending_at_one():
    seen = []
    wl = make_workload(WorkloadConfig(num_requests=30, rate=30, prompt_mean=16, output_mean=40, max_prompt=64))
    compare(wl, engine_configs(config(), ["continuous", "chunked"]), progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == 1.0
    assert 0 < seen[0] <= 0.5


def test_requests_that_can_never_run_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="needs 5 KV blocks of 4 tokens but the pool has 4"):
        simulate(workload((0.0, 16, 4)), config(num_blocks=4))
    with pytest.raises(ValueError, match="more than the token budget"):
        simulate(workload((0.0, 60, 10)), config("continuous", max_num_batched_tokens=64))
    simulate(workload((0.0, 60, 10)), config("chunked", max_num_batched_tokens=64))  # chunks it


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"policy": "fcfs"}, "policy must be one of"),
    ({"preemption": "drop"}, "preemption must be one of"),
    ({"max_num_seqs": 16, "max_num_batched_tokens": 8}, "must be an integer >= max_num_seqs"),
    ({"num_blocks": 0}, "num_blocks must be None"),
])
def test_config_errors_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


def test_default_pool_size_comes_from_the_cost_model():
    assert SimConfig(COST).pool_blocks() == COST.kv_capacity_blocks(16, 0.1)


# ------------------------------------------------------------------------------------------------ workloads
def test_workload_is_deterministic_and_shares_prefix_token_ids():
    cfg = WorkloadConfig(num_requests=50, shared_prefix_fraction=1.0, num_prefixes=2, prefix_tokens=32,
                         prompt_mean=64, lengths="uniform", spread=0.5, seed=5)
    wl = make_workload(cfg)
    assert wl == make_workload(cfg)
    by_prefix = {}
    for r in wl.requests:
        by_prefix.setdefault(r.prefix_id, []).append(wl.prompt_ids(r.index)[:32])
    assert set(by_prefix) == {0, 1}
    assert all(ids == group[0] for group in by_prefix.values() for ids in group)
    assert by_prefix[0][0] != by_prefix[1][0]
    assert wl.prompt_ids(3) == wl.prompt_ids(3)


@pytest.mark.parametrize("lengths", ["fixed", "uniform", "lognormal"])
def test_lengths_stay_within_bounds(lengths):
    wl = make_workload(WorkloadConfig(num_requests=300, lengths=lengths, prompt_mean=100, output_mean=50,
                                      spread=0.9 if lengths != "lognormal" else 1.5, max_prompt=300, max_output=120))
    prompts = np.array([r.prompt_tokens for r in wl.requests])
    assert prompts.min() >= 1
    assert prompts.max() <= 300
    if lengths == "fixed":
        assert set(prompts) == {100}


def test_bursty_arrivals_are_more_variable_than_poisson():
    def gap_cv(arrival):
        wl = make_workload(WorkloadConfig(num_requests=2000, arrival=arrival, rate=10, burst_cv=3.0))
        gaps = np.diff([r.arrival_s for r in wl.requests])
        return gaps.std() / gaps.mean()
    assert gap_cv("poisson") == pytest.approx(1.0, abs=0.15)
    assert gap_cv("bursty") > 2.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_requests": 0}, "num_requests must be in"),
    ({"arrival": "uniform"}, "arrival must be one of"),
    ({"rate": 0}, "rate must be > 0"),
    ({"lengths": "uniform", "spread": 1.5}, "spread must be in"),
    ({"shared_prefix_fraction": 2}, "shared_prefix_fraction must be in"),
])
def test_workload_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorkloadConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ traces
def test_trace_parses_sorts_and_keeps_prefix_ids():
    wl = parse_trace("arrival_s,prompt_tokens,output_tokens,prefix_id\n0.5,10,3,\n0.0,8,2,1\n",
                     prefix_tokens=4)
    assert [(r.arrival_s, r.prompt_tokens, r.prefix_id) for r in wl.requests] == [(0.0, 8, 1), (0.5, 10, None)]
    assert parse_trace(b"\xef\xbb\xbfarrival_s,prompt_tokens,output_tokens\n0,1,1\n").requests[0].prompt_tokens == 1


@pytest.mark.parametrize(("text", "message"), [
    ("arrival,prompt_tokens,output_tokens\n0,1,1\n", "missing column.*arrival_s"),
    ("arrival_s,prompt_tokens,output_tokens\n", "no rows"),
    ("arrival_s,prompt_tokens,output_tokens\n0,1,1\n1,abc,1\n", r"row 2, column prompt_tokens: 'abc'.*whole number"),
    ("arrival_s,prompt_tokens,output_tokens\n0,1,1\n-1,4,1\n", r"row 2, column arrival_s.*>= 0"),
    ("arrival_s,prompt_tokens,output_tokens\n0,1,0\n", r"row 1, column output_tokens: '0'.*1\.\."),
    ("arrival_s,prompt_tokens,output_tokens\n0,1.5,1\n", r"row 1, column prompt_tokens"),
    ("arrival_s,prompt_tokens,output_tokens,prefix_id\n0,1,1,x\n", r"row 1, column prefix_id: 'x'"),
    ("arrival_s,prompt_tokens,output_tokens\n0,1,1,9\n", "row 1: more values"),
    ("arrival_s,prompt_tokens,output_tokens\nnan,1,1\n", r"row 1, column arrival_s"),
])
def test_trace_errors_name_the_row_and_column(text, message):
    with pytest.raises(ValueError, match=message):
        parse_trace(text)


def test_trace_runs_through_the_simulator():
    wl = parse_trace("arrival_s,prompt_tokens,output_tokens,prefix_id\n0,12,3,0\n0.2,12,3,0\n", prefix_tokens=8)
    res = simulate(wl, config(enable_prefix_caching=True))
    assert res.requests["prefix_hit_tokens"].tolist() == [0, 8]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_batching_writes_the_metrics_table(tmp_path, capsys):
    out = tmp_path / "batching.csv"
    code = main(["batching", "--requests", "20", "--rate", "20", "--prompt-mean", "64", "--output-mean", "16",
                 "--max-prompt", "256", "--max-output", "64", "--num-blocks", "200", "--csv", str(out)])
    assert code == 0
    table = pd.read_csv(out)
    assert table["scheduler"].tolist() == ["static batching", "continuous batching", "chunked prefill"]
    assert (table["output_tokens"] == table["output_tokens"].iloc[0]).all()
    assert "chunked prefill" in capsys.readouterr().out


def test_cli_trace_error_is_a_message(tmp_path, capsys):
    bad = tmp_path / "t.csv"
    bad.write_text("arrival_s,prompt_tokens,output_tokens\n0,1,1\n0,-3,1\n")
    assert main(["batching", "--trace", str(bad)]) == 2
    assert "row 2, column prompt_tokens" in capsys.readouterr().err
