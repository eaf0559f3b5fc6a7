"""Serving-config search: the Pareto front and the capacity bracket against brute force and hand cases, the best
configuration against its own table, the CLI, and the Continuous batching page's bounded section."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcore.cli import main
from kvcore.sched import WorkloadConfig, make_workload
from kvcore.study.search import (
    SLO,
    Deployment,
    SearchSpace,
    best_index,
    capacity_bracket,
    offered_rate,
    pareto_front,
    scale_arrivals,
    search,
)

SMALL = WorkloadConfig(num_requests=40, rate=8.0, prompt_mean=256, output_mean=64, max_prompt=1024, max_output=256)


def test_pareto_front_by_hand():
    # (throughput, latency): A beats B on both; C trades; D ties A exactly (neither beats the other); E is NaN
    front = pareto_front([100, 90, 120, 100, float("nan")], [10, 12, 20, 10, 5])
    assert front == [True, False, True, True, False]


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=30))
def test_pareto_front_matches_brute_force(points):
    t, lat = [p[0] for p in points], [p[1] for p in points]
    expected = [not any((t[j] >= t[i] and lat[j] <= lat[i]) and (t[j] > t[i] or lat[j] < lat[i])
                        for j in range(len(points))) for i in range(len(points))]
    assert pareto_front(t, lat) == expected


@pytest.mark.parametrize(("rates", "met", "bracket"), [
    ([1, 2, 4, 8], [True, True, False, False], (2, 4)),
    ([8, 1, 4, 2], [False, True, False, True], (2, 4)),  # any order
    ([1, 2, 4, 8], [True, False, True, False], (1, 2)),  # a pass above the first miss does not count
    ([1, 2, 4], [True, True, True], (4, math.inf)),
])
def test_capacity_bracket(rates, met, bracket):
    assert capacity_bracket(rates, met) == bracket


def test_capacity_bracket_when_even_the_lowest_rate_misses():
    low, high = capacity_bracket([0.5, 1.0], [False, False])
    assert math.isnan(low)
    assert high == 0.5


def test_best_is_the_most_throughput_meeting_the_slos_then_the_lowest_latency():
    table = pd.DataFrame({"output_tok_per_s": [300.0, 200.0, 200.0, 200.0, 100.0],
                          "ttft_ms_p99": [900.0, 50.0, 40.0, 40.0, 10.0], "tpot_ms_p99": [5.0, 9.0, 9.0, 8.0, 1.0],
                          "meets_slo": [False, True, True, True, True]})
    assert best_index(table) == 3
    assert best_index(table.assign(meets_slo=False)) is None


def test_scaling_arrivals_scales_the_offered_rate():
    workload = make_workload(SMALL)
    faster = scale_arrivals(workload, 4.0)
    assert [r.arrival_s * 4 for r in faster.requests] == pytest.approx([r.arrival_s for r in workload.requests])
    assert offered_rate(faster) == pytest.approx(4 * offered_rate(workload))
    assert [r.prompt_tokens for r in faster.requests] == [r.prompt_tokens for r in workload.requests]
    # a synthetic workload drawn at 4x the rate is the same requests arriving 4x as fast
    drawn = make_workload(replace(SMALL, rate=SMALL.rate * 4))
    assert [r.arrival_s for r in drawn.requests] == pytest.approx([r.arrival_s for r in faster.requests])


def test_the_space_leaves_out_budgets_under_the_sequences_and_checks_its_values():
    space = SearchSpace((64, 256), (128, 8192), ("chunked",), (16,), (False,))
    assert [(c.max_num_seqs, c.max_num_batched_tokens) for c in space.configs()] == [(64, 128), (64, 8192),
                                                                                       (256, 8192)]
    with pytest.raises(ValueError, match="schedulers"):
        SearchSpace(schedulers=("static",))
    with pytest.raises(ValueError, match="block_sizes"):
        SearchSpace(block_sizes=(0,))
    with pytest.raises(ValueError, match="tpot_p99_ms"):
        SLO(100.0, -1.0)


@pytest.fixture(scope="module")
def found():
    space = SearchSpace((4, 32), (256, 2048), ("continuous", "chunked"), (16,), (False,))
    return search(make_workload(SMALL), Deployment(), space, SLO(200.0, 12.0), rate=SMALL.rate, probes=2)


def test_the_best_configuration_is_the_best_of_its_own_table(found):
    table = found.configs
    assert len(table) == 8
    ok = table[table["meets_slo"]]
    assert (ok["ttft_ms_p99"] <= 200).all()
    assert (ok["tpot_ms_p99"] <= 12).all()
    assert found.best is not None
    assert found.best["output_tok_per_s"] == ok["output_tok_per_s"].max()
    assert table["best"].sum() == 1
    assert table.loc[table["best"], "meets_slo"].all()
    # continuous batching with a 256-token budget cannot take the 1024-token prompts whole
    refused = table[(table["scheduler"] == "continuous") & (table["max_num_batched_tokens"] == 256)]
    assert refused["error"].str.contains("token budget").all()
    assert not refused["meets_slo"].any()
    assert not refused["pareto"].any()


def test_the_capacity_is_bracketed_by_probes_that_meet_and_miss_the_slos(found):
    cap = found.capacity
    assert cap["rate_rps"].is_monotonic_increasing
    assert cap.loc[cap["rate_rps"] == found.capacity_rps, "meets_slo"].all()
    assert not cap.loc[cap["rate_rps"] == found.failing_rps, "meets_slo"].any()
    assert (cap.loc[cap["rate_rps"] <= found.capacity_rps, "meets_slo"]).all()
    assert SMALL.rate <= found.capacity_rps < found.failing_rps
    assert found.simulations == 8 + 2 + 2
    assert any("Capacity" in line for line in found.lines)


def test_when_no_configuration_meets_the_slos_the_closest_one_is_probed_downwards():
    space = SearchSpace((32,), (2048,), ("chunked",), (16,), (False,))
    result = search(make_workload(replace(SMALL, rate=400.0)), Deployment(), space, SLO(100.0, 20.0), rate=400.0,
                    probes=3)
    assert result.best is None
    assert result.probed is not None
    assert 50.0 <= result.capacity_rps < result.failing_rps <= 100.0  # halving: 200 and 100 miss, 50 meets
    assert result.capacity["rate_rps"].min() == 50.0
    assert "No configuration meets the SLOs" in result.lines[1]
    assert "SLO binds" in result.lines[1] or "Both SLOs bind" in result.lines[1]


def test_when_none_meets_the_slos_the_binding_one_is_named():
    from kvcore.study.search import binding_slo

    def table(*rows):  # (ttft p99, tpot p99, error)
        return pd.DataFrame(rows, columns=["ttft_ms_p99", "tpot_ms_p99", "error"])

    slo = SLO(2000.0, 50.0)
    ttft = binding_slo(table((23_582.5, 27.9, None), (18_203.6, 41.5, None), (math.nan, math.nan, "too long")), slo)
    assert ttft == ("The TTFT SLO binds: the lowest TTFT p99 is 18,204 ms against 2,000 ms (2 of 2 configurations "
                    "meet the TPOT SLO).")
    assert binding_slo(table((900.0, 61.0, None), (1500.0, 55.25, None)), slo).startswith(
        "The TPOT SLO binds: the lowest TPOT p99 is 55.2 ms against 50 ms (2 of 2")
    assert binding_slo(table((2500.0, 61.0, None)), slo).startswith("Both SLOs bind: the lowest TTFT p99 is 2,500 ms")
    assert binding_slo(table((2500.0, 40.0, None), (1000.0, 60.0, None)), slo).startswith(
        "Each SLO is met on its own (1 configuration meets the TTFT SLO, 1 the TPOT SLO)")
    assert binding_slo(table((math.nan, math.nan, "x")), slo).startswith("No configuration could serve")


def test_search_command_prints_the_answer_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "configs.csv"
    code = main(["search", "--requests", "30", "--prompt-mean", "256", "--output-mean", "32", "--max-num-seqs", "8",
                 "32", "--max-num-batched-tokens", "2048", "--block-sizes", "16", "--prefix-caching", "off",
                 "--probes", "1", "--csv", str(out), "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert "Best: " in err
    table = pd.read_csv(out)
    assert len(table) == 4
    assert table["best"].sum() == 1


def test_the_page_section_answers_within_30_seconds():
    from tests.app.conftest import open_page

    started = time.perf_counter()
    at = open_page("continuous_batching", {"so_on": "true"})
    took = time.perf_counter() - started
    assert not at.exception, [e.value for e in at.exception]
    assert [m.label for m in at.metric][-3:] == ["Configurations meeting the SLOs", "Best: output tokens/s",
                                                 "Capacity (requests/s)"]
    assert any("configurations meet" in c.value for c in at.caption)
    assert took < 60  # 30 s on a quiet 2-core machine; a shared one gets slack
    frame = next(d.value for d in at.dataframe if "meets_slo" in d.value.columns and "pareto" in d.value.columns)
    assert len(frame) == 2 * 2 * 2  # max_num_seqs x max_num_batched_tokens x schedulers by default


def test_the_page_section_refuses_a_grid_over_its_bound():
    from tests.app.conftest import open_page

    at = open_page("continuous_batching", {"so_on": "true", "so_seqs": ["16", "32", "64", "128", "256"]})
    assert not at.exception
    assert any("the page searches at most 16" in w.value for w in at.warning)
