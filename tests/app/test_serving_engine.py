"""Serving engine page: real requests on the engine beside transformers, the pool, the simulator's prediction.

The default view's calibration is the background warm-up's work: opening the page never measures it (calibrations
are counted, not timed), a calibration is kept in the server's memory and never on disk, and the page says when and
under what load it was taken."""

from __future__ import annotations

import pytest

from kvcore.engine.experiment import EngineSettings
from kvcore.engine.report import check_page_limits
from kvcore.engine.workload import ServeWorkload
from tests.app.conftest import Calls, assert_clean, assert_no_bound_widget_moved_up, open_page
from ui import background, disk_cache, engine_runs, warm_defaults
from ui.models import private_model

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"eg_n": "4", "eg_pmax": "32", "eg_omax": "8"}


@pytest.fixture
def calibrations(monkeypatch, tmp_path) -> Calls:
    """Counted calibrations, none made yet in this process, an empty results folder and no warm-up queue."""
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(tmp_path / "results"))
    engine_runs.forget_calibrations()
    background.WARMUP.fill([])
    yield Calls(monkeypatch, engine_runs, count="calibrate_engine")
    engine_runs.forget_calibrations()


def prediction_of(at):
    return next((d.value for d in at.dataframe if "error_pct" in d.value.columns), None)


def test_defaults_serve_on_both_systems_and_predict_the_run(page, calibrations, tmp_path):
    at = page("serving_engine")
    assert at.title[0].value == "Serving engine"
    assert [m.label for m in at.metric] == ["Output tokens/s", "TTFT p50", "TPOT p50", "Peak KV blocks",
                                            "Prefix-cache hits"]
    systems = at.dataframe[0].value
    assert systems["system"].tolist() == ["engine", "transformers generate (static, batch 16)"]
    assert (systems["output_tokens"] == systems["output_tokens"].iloc[0]).all()
    # the warm-up is off in these tests: the default calibration waits for a button, and nothing was measured
    assert calibrations.count == 0
    assert prediction_of(at) is None
    assert any("background warm-up" in i.value and "KVLAB_WARMUP=0" in i.value for i in at.info)
    at.button(key="eg_calibrate").click().run()
    assert_clean(at)
    assert calibrations.count == 1
    prediction = prediction_of(at)
    assert prediction.set_index("metric").loc["steps", "error_pct"] == 0  # the simulator's scheduler is the engine's
    note = next(c.value for c in at.caption if c.value.startswith("Calibrated "))
    assert " UTC in " in note
    assert "by this page" in note
    assert "1-min load" in note
    assert "never on disk" in note
    assert not any("calibration" in p.name for p in (tmp_path / "results").rglob("*"))  # a timing: memory only
    at = open_page("serving_engine", SMALL)  # another view at the same block size and threads: no new calibration
    assert calibrations.count == 1
    assert prediction_of(at) is not None


def test_the_warm_up_calibrates_on_its_own_copy_and_the_page_reads_it(calibrations, monkeypatch):
    def no_shared_model(*_):
        raise AssertionError("the warm-up used the pages' shared model")

    with monkeypatch.context() as patch:
        patch.setattr(engine_runs, "shared_model", no_shared_model)
        warm_defaults.warm_calibration(private_model())
    assert calibrations.count == 1
    at = open_page("serving_engine", SMALL)
    assert_clean(at)
    assert calibrations.count == 1
    assert prediction_of(at) is not None
    assert any("by the server's background warm-up" in c.value for c in at.caption)


def test_while_the_warm_up_has_the_calibration_queued_the_section_follows_it(page, calibrations):
    background.WARMUP.fill([background.CALIBRATION])
    at = page("serving_engine", SMALL)
    assert [p.proto.text for p in at.get("progress")] == ["Calibrating the simulator on a grid of engine steps: next "
                                                          "in the background warm-up..."]
    assert not at.button
    assert prediction_of(at) is None
    background.WARMUP.fill([])
    assert calibrations.count == 0


def test_other_settings_calibrate_when_picked(page, calibrations):
    at = page("serving_engine", {**SMALL, "eg_bs": "8", "eg_hf": "false"})
    assert calibrations.count == 1
    assert prediction_of(at) is not None
    assert engine_runs.calibrated(engine_runs.DEFAULT_CALIBRATION) is None


SETTINGS_BS8 = {**SMALL, "eg_bs": "8", "eg_hf": "false"}


def test_with_background_work_other_settings_calibrate_behind_the_page(page, calibrations, behind):
    at = page("serving_engine", SETTINGS_BS8)
    assert prediction_of(at) is None  # the page is complete without it: a bar follows the thread
    texts = [p.proto.text for p in at.get("progress")]
    assert len(texts) == 1
    assert texts[0].startswith("Calibrating the simulator: "), texts
    assert texts[0] != "Calibrating the simulator: ", texts  # says what it is doing
    background.BEHIND.join()
    assert calibrations.count == 1
    filled = page("serving_engine", SETTINGS_BS8)
    assert prediction_of(filled) is not None
    assert calibrations.count == 1  # read back, never measured twice
    assert_no_bound_widget_moved_up(at, filled)


def test_a_calibration_that_fails_behind_the_page_says_why_then_the_next_view_tries_again(page, calibrations, behind,
                                                                                         monkeypatch):
    tries = []

    def broken(*_, **__):
        tries.append(1)
        raise ValueError("no grid step fits this pool")

    with monkeypatch.context() as patch:
        patch.setattr(engine_runs, "calibrate_engine", broken)
        page("serving_engine", SETTINGS_BS8)
        background.BEHIND.join()
        at = page("serving_engine", SETTINGS_BS8)
        assert any("no grid step fits this pool" in e.value for e in at.error)
        assert prediction_of(at) is None
        assert len(tries) == 1  # the failure is said once, on the page that follows it
    at = page("serving_engine", SETTINGS_BS8)  # the next view tries again (the cause may have gone)
    assert not at.error
    background.BEHIND.join()
    assert calibrations.count == 1
    assert prediction_of(page("serving_engine", SETTINGS_BS8)) is not None


def test_the_pages_engine_run_comes_before_the_comparison_behind_it(page, calibrations, behind, monkeypatch):
    """The comparison's thread takes the model run by run: started first, it would make the page's own engine run
    wait for one of them (on SmolLM2 about 2 s of a 5 s first view). The page runs first, then starts it."""
    events = []
    real_report, real_start = engine_runs.report, background.Behind.start

    def report(*args, **kwargs):
        events.append("page run starts")
        out = real_report(*args, **kwargs)
        events.append("page run ends")
        return out

    def start(self, key, *args, **kwargs):
        events.append(f"{key[0]} starts")
        return real_start(self, key, *args, **kwargs)

    monkeypatch.setattr(engine_runs, "report", report)
    monkeypatch.setattr(background.Behind, "start", start)
    page("serving_engine", {**SMALL, "eg_seed": "5"})
    assert events[:3] == ["page run starts", "page run ends", "serving comparison starts"], events


def test_with_background_work_transformers_runs_are_measured_behind_the_page(page, calibrations, behind):
    """On a real model the interleaved runs of both systems take seconds: the page shows one engine run at once, a
    bar follows the comparison, and the page's rerun shows both systems."""
    view = {**SMALL, "eg_seed": "7", "eg_bs": "8"}  # eg_bs 8: its calibration also goes behind the page
    at = page("serving_engine", view)
    assert at.dataframe[0].value["system"].tolist() == ["engine"]
    texts = [p.proto.text for p in at.get("progress")]
    assert any(t.startswith("Serving the same requests on transformers and the engine, interleaved: ") for t in texts)
    assert any("measured behind the page" in c.value for c in at.caption)
    background.BEHIND.join()
    at = page("serving_engine", view)
    assert at.dataframe[0].value["system"].tolist() == ["engine", "transformers generate (static, batch 16)"]
    assert not any(t.startswith("Serving the same") for t in (p.proto.text for p in at.get("progress")))


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
    assert at.select_slider(key="eg_blocks").value == 256
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


def test_smollm2_opens_on_a_workload_the_page_serves(page, smollm2):
    """Choosing SmolLM2 sets its own workload (the bundled model's would be refused by the page's work limit)."""
    model, _ = smollm2
    blocks = page("serving_engine", SMALL).select_slider(key="eg_blocks").value
    own, bundled = (engine_runs.workload_defaults(name) for name in ("smollm2-135m", "bundled"))
    check_page_limits(model, ServeWorkload(own["eg_n"], 5, own["eg_pmax"], 8, own["eg_omax"]), EngineSettings(blocks),
                      transformers=True)
    with pytest.raises(ValueError, match="more than one view serves"):
        check_page_limits(model, ServeWorkload(bundled["eg_n"], 5, bundled["eg_pmax"], 8, bundled["eg_omax"]),
                          EngineSettings(blocks), transformers=True)
