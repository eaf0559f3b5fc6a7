"""Eviction page: renders with defaults, reruns on a widget change, restores from the URL, ignores garbage; every
claim comes with the measurement that tests it and its noise."""

import base64
import json

import numpy as np
import pytest

from kvcore.eviction import DEFAULT_BUDGETS, DEFAULT_POLICIES
from kvcore.eviction.evaluate import TIMED_STEPS
from kvcore.models.loader import BUNDLED_DIR
from tests.app.conftest import assert_no_bound_widget_moved_up
from ui import background, eviction_runs
from ui import step_figures as sf

needs_bundled = pytest.mark.skipif(
    not ((BUNDLED_DIR / "model.safetensors").is_file() and (BUNDLED_DIR / "validation.jsonl").is_file()),
    reason="the bundled model is not trained yet")
SMALL = {"ntok": "64", "budgets": ["16"]}  # a short sweep keeps each test to seconds


def results(at):
    return at.dataframe[0].value


def plotly_values(data) -> np.ndarray:
    """A trace's values from a figure's JSON: a list, or plotly's typed array (base64 ``bdata`` and ``dtype``)."""
    if isinstance(data, dict):
        return np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"])
    return np.asarray(data, dtype=float)


def test_defaults_render_without_exception(page):
    at = page("eviction")
    assert at.title[0].value == "Eviction"


@needs_bundled
def test_defaults_compare_the_default_policies_and_check_the_claims(page):
    at = page("eviction")
    table = results(at)
    assert table["policy"].tolist() == ["full"] + [p for p in DEFAULT_POLICIES for _ in DEFAULT_BUDGETS]
    assert sorted(table.loc[table["policy"] != "full", "budget_tokens"].unique()) == list(DEFAULT_BUDGETS)
    boxes = [b.value for b in (*at.success, *at.warning, *at.info)]
    assert any("StreamingLLM beats a sliding window" in b for b in boxes)
    assert any("attention-based policies beat random" in b for b in boxes)


@needs_bundled
def test_claims_carry_their_noise_and_say_what_this_model_cannot_show(page):
    at = page("eviction")
    info = [b.value for b in at.info]
    sink = next(b for b in info if "attention sinks" in b)
    assert "this model cannot show it" in sink
    assert "token 0:" in sink
    assert "SmolLM2-135M" in sink
    assert "choose smollm2-135m as the model" in sink  # the model of this page's Model box that shows sinks
    knorm = next(b.value for b in at.warning if b.value.startswith("**Knorm"))
    assert "does not hold" in knorm
    assert "rank correlation" in knorm
    assert "LESS attention" in knorm
    stream = next(b.value for b in (*at.success, *at.warning, *at.info) if "beats a sliding window" in b.value)
    assert "ratio" in stream
    assert "[" in stream
    for box in at.success:  # green only when every comparison held beyond the noise
        assert "within noise" not in box.value.split(". ")[0]
    table = results(at).set_index("policy")
    assert {"ppl_low", "ppl_high", "ppl_vs_full_low", "ppl_vs_full_high", "vs_full"} <= set(table.columns)


@needs_bundled
def test_every_row_times_the_same_decode_steps_with_their_spread(page):
    """The defect: full was one parallel forward (2,708 tokens/s) against 90-184 for policies decoding."""
    table = results(page("eviction", SMALL)).set_index("policy")
    assert (table["decode_steps"] == TIMED_STEPS).all()
    assert (table["decode_ms_q1"] <= table["decode_ms"]).all()
    assert (table["decode_ms"] <= table["decode_ms_q3"]).all()
    assert table["load_1min"].notna().all()


def test_with_background_work_the_decode_steps_are_timed_behind_the_page(page, behind):
    """Timing every run's steps costs seconds on a real model: the page is complete without them (every other
    column), a bar follows the thread, and the next run (the bar's rerun) fills the speed columns in."""
    eviction_runs.forget_times()
    view = {**SMALL, "policies": ["streaming_llm", "h2o"]}
    at = page("eviction", view)
    table = results(at)
    assert table["decode_ms"].isna().all()
    assert table["ppl"].notna().all()
    texts = [p.proto.text for p in at.get("progress")]
    assert len(texts) == 1, texts
    assert texts[0].startswith("Timing the decode steps of each run: "), texts
    background.BEHIND.join()
    filled = page("eviction", view)
    assert (results(filled)["decode_steps"] == TIMED_STEPS).all()
    assert not filled.get("progress")
    assert_no_bound_widget_moved_up(at, filled)  # the step player's slider still writes the URL


@needs_bundled
def test_the_step_view_opens_on_the_step_in_the_url(page):
    at = page("eviction", {**SMALL, "step": "40"})
    assert at.slider(key="step").value == 40
    player = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if '"frames"' in c.proto.spec)
    heat = player["data"][3]
    assert heat["type"] == "heatmap"
    assert heat["y"] == [f"{p} held" for p in ("sliding_window", "streaming_llm", "h2o", "random")]
    assert "step 40: query at 40" in player["layout"]["title"]["text"]
    names = [f["name"] for f in player["frames"]]
    assert names == [str(s) for s in sorted({*sf.frame_steps(63, 62), 40})]  # evenly spaced, the last, step 40
    assert player["layout"]["updatemenus"][0]["buttons"][0]["args"][0] == names[names.index("40"):]  # ▶ from 40
    assert player["layout"]["sliders"][0]["active"] == names.index("40")
    for frame in player["frames"]:  # each frame brings its own metrics line and its own attention scale
        step = int(frame["name"])
        assert f"step {step}: query at {step}" in frame["layout"]["title"]["text"]
        assert "sinks" in frame["layout"]["title"]["text"]
        top = float(max(plotly_values(frame["data"][0]["y"])))
        assert frame["layout"]["yaxis"]["range"] == pytest.approx([0, top * 1.3], rel=1e-3)


@needs_bundled
def test_a_step_of_the_player_is_a_view_of_the_computed_run(page, monkeypatch):
    """A step runs no model forward and no step view: the run was computed once for the setting (in a browser the
    step slider reruns only the player's fragment; AppTest reruns the page, served from the caches)."""
    import ui.eviction_steps as section
    from ui.models import shared_model

    at = page("eviction", SMALL)
    forwards, views = [], []
    handle = shared_model().model.model.register_forward_hook(lambda *_: forwards.append(1))
    real_view = section.eviction_steps
    monkeypatch.setattr(section, "eviction_steps", lambda *args: views.append(1) or real_view(*args))
    try:
        at.slider(key="step").set_value(30).run()
    finally:
        handle.remove()
    assert not at.exception
    assert (len(forwards), len(views)) == (0, 0)
    player = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if '"frames"' in c.proto.spec)
    assert "step 30: query at 30" in player["layout"]["title"]["text"]


@needs_bundled
def test_changing_positions_reruns_with_rerotated_keys(page):
    at = page("eviction", SMALL)
    assert set(results(at)["positions"]) == {"original"}
    at.segmented_control(key="pos").set_value("rerotate").run()
    assert not at.exception
    assert set(results(at)["positions"]) == {"rerotate"}
    assert any("Re-rotated inside the cache" in c.value for c in at.caption)


@needs_bundled
def test_url_restores_the_view(page):
    at = page("eviction", {"ntok": "64", "mode": "prefill", "policies": ["tova", "attention_window"],
                           "budgets": ["8", "16"], "tova_per_head": "true"})
    assert at.slider(key="ntok").value == 64
    assert at.toggle(key="tova_per_head").value is True
    table = results(at)
    assert table["policy"].tolist() == ["full", "tova", "tova", "attention_window", "attention_window"]
    assert set(table["mode"]) == {"prefill"}
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    maps = next(t for t in titles if t.startswith("What each query could read"))
    assert "prefill" in maps
    assert "after each step" not in maps
    assert "tova(per_head=True)" in table["label"].tolist()
    window = table[table["policy"] == "attention_window"]
    assert (window["kv_bytes_held"] == window["kv_bytes_full"]).all()  # attention-only: memory unchanged


def test_garbage_url_falls_back_to_defaults(page):
    at = page("eviction", {"ntok": "-5", "mode": "sideways", "pos": "absolute", "budgets": "lots",
                           "policies": "nope", "h2o_recent_fraction": "7", "unit": "kg"})
    assert at.slider(key="ntok").value == 256
    assert at.segmented_control(key="mode").value == "decode"
    assert at.segmented_control(key="pos").value == "original"
    assert at.multiselect(key="policies").value == list(DEFAULT_POLICIES)
    assert at.number_input(key="h2o_recent_fraction").value == 0.5


@needs_bundled
def test_the_kvpress_toggle_counts_and_keeps_as_kvpress(page):
    at = page("eviction", {"ntok": "64", "mode": "prefill", "unit": "share", "shares": ["0.25"],
                           "policies": ["tova"], "kvpress": "true"})
    table = results(at)
    tova = table[table["policy"] == "tova"].iloc[0]
    assert tova["label"] == "tova(per_head=False, keep_last=True)"
    assert tova["budget_tokens"] == 7  # int(31 * (1 - 0.75)): kvpress truncates, the lab would round to 8


def test_an_empty_model_value_shares_the_bundled_models_cached_runs():
    from ui.eviction_runs import EvictionText

    assert EvictionText("", "t", 32) == EvictionText(" bundled ", "t", 32) == EvictionText("bundled", "t", 32)
    assert EvictionText(" gpt2", "t", 32).model == "gpt2"


@needs_bundled
def test_the_caption_counts_the_tokens_the_slider_streams(page):
    # "Tokens streamed 64" beside "63 tokens fed": one number, said as the slider says it, and what was fed
    at = page("eviction", SMALL)
    streamed = at.slider(key="ntok").value
    caption = next(c.value for c in at.caption if "tokens streamed" in c.value)
    assert f"{streamed} tokens streamed: the first {streamed - 1} fed through the cache" in caption


@needs_bundled
def test_an_old_link_with_a_typed_model_folder_still_loads_it(page):
    """The Model box was a text field: ``?model=<folder>`` (or a Hub name) joins the choices and opens chosen."""
    at = page("eviction", {**SMALL, "model": str(BUNDLED_DIR)})
    assert at.selectbox(key="model").value == str(BUNDLED_DIR)
    assert str(BUNDLED_DIR) in at.selectbox(key="model").options
    assert not at.error
    assert results(at)["policy"].iloc[0] == "full"
    assert page("eviction", {**SMALL, "model": "bundled"}).selectbox(key="model").value == "bundled"


def test_smollm2_shows_the_sink_the_bundled_model_cannot(page):
    at = page("eviction", {"model": "smollm2-135m", "ntok": "96", "budgets": ["32"],
                           "policies": ["sliding_window", "streaming_llm"]})
    assert any(c.value.startswith("Model: SmolLM2-135M-Instruct") for c in at.caption)
    sink = next(b.value for b in at.success if b.value.startswith("**StreamingLLM: the first tokens"))
    assert "holds." in sink
    assert "sinks at [0" in sink
    assert "cannot show" not in sink
    assert any("StreamingLLM beats a sliding window" in b.value for b in (*at.success, *at.warning, *at.info))


def test_on_a_real_model_the_runs_fill_in_behind_the_page_and_the_url_keeps_the_view(page, behind):
    """SmolLM2's runs take longer than a view: the first view shows what the reference alone decides (its sink) and a
    bar that follows the runs, and keeps the view's settings in the URL (the budget shown, the step); once the runs
    are kept the page is whole, on the same settings."""
    eviction_runs.forget_times()
    view = {"model": "smollm2-135m", "ntok": "64", "budgets": ["16", "32"], "policies": ["streaming_llm"],
            "at": "32", "step": "40"}
    at = page("eviction", view)
    sink = next(b.value for b in at.success if b.value.startswith("**StreamingLLM: the first tokens"))
    assert "holds." in sink
    assert not any("beats a sliding window" in b.value for b in (*at.success, *at.warning, *at.info))
    texts = [p.proto.text for p in at.get("progress")]
    assert texts[0].startswith("Measuring each run against the full cache on smollm2-135m: "), texts
    assert at.query_params["at"] == "32"
    assert at.query_params["step"] == "40"
    background.BEHIND.join()
    at = page("eviction", view)
    assert results(at)["policy"].tolist().count("streaming_llm") == 2
    assert at.selectbox(key="at").value == 32
    assert at.slider(key="step").value == 40
