"""Serving engine page: real requests on the engine beside transformers, the pool, the simulator's prediction."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"eg_n": "4", "eg_pmax": "32", "eg_omax": "8"}


def test_defaults_serve_on_both_systems_and_predict_the_run(page):
    at = page("serving_engine")
    assert at.title[0].value == "Serving engine"
    assert [m.label for m in at.metric] == ["Output tokens/s", "TTFT p50", "TPOT p50", "Peak KV blocks",
                                            "Prefix-cache hits"]
    systems = at.dataframe[0].value
    assert systems["system"].tolist() == ["engine", "transformers generate (static, batch 16)"]
    assert (systems["output_tokens"] == systems["output_tokens"].iloc[0]).all()
    prediction = next(d.value for d in at.dataframe if "error_pct" in d.value.columns)
    assert prediction.set_index("metric").loc["steps", "error_pct"] == 0  # the simulator's scheduler is the engine's


def test_url_restores_the_view_and_a_shared_prefix_hits(page):
    at = page("serving_engine", {**SMALL, "eg_n": "6", "eg_prefix": "32", "eg_share": "1.0", "eg_hf": "false",
                                 "eg_seqs": "1"})
    assert at.slider(key="eg_n").value == 6
    systems = at.dataframe[0].value
    assert systems["system"].tolist() == ["engine"]
    requests = next(d.value for d in at.dataframe if "prefix_hit_tokens" in d.value.columns)
    assert requests["prefix_hit_tokens"].iloc[1:].gt(0).all()  # one at a time: each later request hits the prefix


def test_quantized_pools_and_the_step_slider(page):
    at = page("serving_engine", {**SMALL, "eg_bits": "4-bit", "eg_hf": "false"})
    steps = at.select_slider(key="eg_step").options
    at.select_slider(key="eg_step").set_value(steps[0]).run()
    assert not at.exception
    pool = next(d.value for d in at.dataframe if "owners" in d.value.columns)
    assert set(pool["step"]) == {int(steps[0])}


def test_garbage_url_falls_back_to_defaults(page):
    at = page("serving_engine", {**SMALL, "eg_bits": "3-bit", "eg_blocks": "7", "eg_model": "gpt-99", "eg_bs": ""})
    assert at.segmented_control(key="eg_bits").value == "fp32"
    assert at.select_slider(key="eg_blocks").value == 512
    assert at.selectbox(key="eg_model").value == "bundled"
    assert at.segmented_control(key="eg_bs").value == 16


def test_an_impossible_setting_is_a_message(page):
    at = page("serving_engine", {"eg_blocks": "16", "eg_pmax": "400", "eg_omax": "64", "eg_n": "64", "eg_hf": "false"})
    assert any("the pool has" in e.value for e in at.error)


def test_a_view_too_heavy_for_transformers_says_how_to_lighten_it(page):
    at = page("serving_engine", {"eg_n": "32", "eg_seqs": "32", "eg_pmax": "400", "eg_omax": "8"})  # refused
    assert any("max_num_seqs" in e.value and "transformers" in e.value for e in at.error)
    assert not at.exception


DELTA_CHAR_PX, ARROW_PX = 7.5, 20  # a metric's delta text (14 px font) and the arrow beside it
NO_ARROW = 2  # MetricProto.MetricDirection.NONE


def test_metric_notes_fit_and_only_the_change_has_an_arrow(page):
    # "2.55x transformers, on..." was cut, and up-arrows sat on p99 latencies and the pool's bytes (not changes)
    from streamlit.testing.v1.element_tree import Metric

    from tests.app.test_figures import placed

    at = page("serving_engine", SMALL)
    widths = {p.node.label: p.width for p in placed(at) if isinstance(p.node, Metric)}
    for metric in at.metric:
        assert len(metric.delta or "") * DELTA_CHAR_PX + ARROW_PX <= widths[metric.label], (metric.label, metric.delta)
    arrows = {m.label: m.proto.direction for m in at.metric}
    ratio = at.metric[0].delta
    if ratio.startswith("≈"):  # the runs disagree on which system is faster: within noise, no arrow
        assert arrows.pop("Output tokens/s") == NO_ARROW
    else:  # the ratio to transformers, beyond its noise, is a change
        assert arrows.pop("Output tokens/s") != NO_ARROW
    assert set(arrows.values()) == {NO_ARROW}, arrows
    assert at.metric[1].delta.startswith("p99 ")


def test_the_step_time_axis_has_round_ticks(page):
    # the step-time axis read 31.4, 62.7, 94.1 (ticks aligned to the tokens' grid)
    import json
    import math

    at = page("serving_engine", {**SMALL, "eg_hf": "false"})
    fig = next(f for f in (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
               if f["layout"]["title"]["text"].startswith("Every step"))
    axis = fig["layout"]["yaxis2"]
    ticks = axis["tickvals"]
    step = ticks[1] - ticks[0]
    mantissa = round(step / 10 ** math.floor(math.log10(step)), 6)
    assert mantissa in (1, 2, 2.5, 5), ticks
    assert all(abs(t / step - round(t / step)) < 1e-9 for t in ticks), ticks
    steps = next(d.value for d in at.dataframe if "step_s" in d.value.columns)
    assert ticks[-1] >= steps["step_s"].max() * 1e3 >= ticks[-2]
    assert axis["range"] == [0, ticks[-1]]


def test_the_latency_metrics_show_the_systems_table_numbers_as_it_does(page):
    # "183 ms" in the metric beside "183.2" in the systems table: one number, one formatting
    from tests.app.test_figures import cell_text

    at = page("serving_engine", SMALL)
    shown = {m.label: m for m in at.metric}
    assert shown["TTFT p50"].value == f"{cell_text(at, 'ttft_ms_p50')} ms"
    assert shown["TTFT p50"].delta == f"p99 {cell_text(at, 'ttft_ms_p99')} ms"
    assert shown["TPOT p50"].value == f"{cell_text(at, 'tpot_ms_p50')} ms"
