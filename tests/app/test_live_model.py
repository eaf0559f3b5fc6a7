"""Live model page: renders with the bundled model, reruns on a widget change, restores from the URL (the step of
the step-by-step view included); timings are repeated and say what else ran; sinks need far queries."""

from __future__ import annotations

import json

import pytest

from kvcore.plans import cache_plans

pytestmark = pytest.mark.usefixtures("one_thread")


def token_table(at):
    return at.dataframe[0].value


def test_defaults_generate_and_show_attention(page):
    at = page("live_model")
    table = token_table(at)
    assert len(table) >= 1
    assert {"token", "logprob", "ms", "kv_bytes", "phase"} <= set(table.columns)
    assert table["phase"].iloc[0] == "prefill"
    assert [m.label for m in at.metric][:4] == ["Prefill", "Decode, per token", "KV cache now", "Mean log-prob"]
    patterns = at.dataframe[1].value
    assert {"sink", "heavy_hitter", "received_vs_uniform"} <= set(patterns.columns)
    assert not at.error


def test_timings_are_medians_of_repeats_with_their_spread_and_the_load(page):
    at = page("live_model")
    note = next(c.value for c in at.caption if c.value.startswith("Timing"))
    assert "IQR" in note
    assert "warm-up" in note
    assert "1-min load" in note
    decode = next(m for m in at.metric if m.label == "Decode, per token")
    assert "IQR" in decode.help


def test_recent_keys_are_not_called_sinks(page):
    """The defect: keys 38, 39, 42 of 44 were marked as sinks from a handful of later queries."""
    at = page("live_model")
    patterns = at.dataframe[1].value
    unjudged = patterns["received_vs_uniform"].isna()
    assert unjudged.tail(8).all()  # the last keys have too few far queries to judge
    assert not patterns.loc[unjudged, "sink"].any()


def test_the_step_view_opens_on_the_step_in_the_url(page):
    at = page("live_model", {"lm_step": "3", "lm_new": "10"})
    assert at.slider(key="lm_step").value == 3
    assert next(m for m in at.metric if m.label == "Step").value == "3"
    player = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "step 3" in c.proto.spec)
    assert len(player["frames"]) == len(token_table(at))  # one frame per generated token
    assert [b["label"] for b in player["layout"]["updatemenus"][0]["buttons"]] == ["▶ Play", "❚❚ Pause"]
    assert player["layout"]["sliders"][0]["active"] == 3


def test_changing_new_tokens_reruns(page):
    at = page("live_model")
    at.number_input(key="lm_new").set_value(5).run()
    assert not at.exception
    assert len(token_table(at)) <= 5


def test_url_restores_the_view(page):
    at = page("live_model", {"lm_new": "6", "lm_layer": "0", "lm_head": "3", "lm_prompt": "The with statement",
                             "lm_log": "false"})
    assert at.number_input(key="lm_new").value == 6
    assert at.number_input(key="lm_layer").value == 0
    assert at.selectbox(key="lm_head").value == 3
    assert at.text_area(key="lm_prompt").value == "The with statement"
    assert at.toggle(key="lm_log").value is False
    assert len(token_table(at)) <= 6


def test_garbage_url_falls_back_to_defaults(page):
    at = page("live_model", {"lm_new": "-5", "lm_model": "nope", "lm_temp": "hot", "lm_plan": "magic",
                             "lm_layer": "99", "lm_sink": "NaN"})
    assert at.number_input(key="lm_new").value == 40
    assert at.selectbox(key="lm_model").value == "bundled"
    assert at.slider(key="lm_temp").value == 0.0
    assert at.selectbox(key="lm_plan").value == "full"
    assert at.number_input(key="lm_layer").value == 1


def test_hub_model_without_network_shows_a_message(page):
    at = page("live_model", {"lm_model": "other (type a Hub name)", "lm_hub": "gpt2"})
    assert any("works offline" in e.value for e in at.error)


@pytest.mark.skipif("evict:streaming_llm" not in cache_plans(), reason="kvcore.eviction offers no streaming_llm")
def test_an_eviction_plan_is_compared_with_the_full_cache(page):
    at = page("live_model", {"lm_plan": "evict:streaming_llm", "lm_budget": "8", "lm_new": "12"})
    policy = token_table(at)
    assert policy["kv_tokens"].max() <= 8
    comparison = at.dataframe[-1].value
    assert {"logprob_full", "delta"} <= set(comparison.columns)
    held = next(d.value for d in at.dataframe if any(c.endswith(" held") for c in d.value.columns))
    column = next(c for c in held.columns if c.endswith(" held"))
    assert held[column].sum() == pytest.approx(min(len(held), 8 + 1), abs=1e-6)  # the budget, plus the fed token
