"""Sharing page: calculator, cross-layer and conversion results render, rerun on a change, restore from the URL."""

import pytest

from kvcore.models.loader import BUNDLED_DIR
from kvcore.shapes import PRESETS, kv_bytes
from kvcore.sharing import divisors
from ui.format import bytes_str

HAVE_MODEL = (BUNDLED_DIR / "model.safetensors").is_file()
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason=f"the bundled model is not trained yet ({BUNDLED_DIR})")


def table_with(at, column: str):
    """The first table on the page that has ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def metrics(at):
    return {m.label: m.value for m in at.metric}


LAYERS, CONVERT = {"sh_tab": "Layers: cross-layer"}, {"sh_tab": "Convert a trained model"}


def test_defaults_render_the_heads_tab(page):
    at = page("sharing")
    shape = PRESETS["llama-3-8b"]
    heads = table_with(at, "kv_vs_mha")
    assert heads["kv_heads"].tolist() == divisors(shape.num_q_heads)
    assert metrics(at)["KV per token"] == bytes_str(kv_bytes(shape, 1))
    assert len(at.get("plotly_chart")) == 3
    assert not any("stored_layers" in d.value.columns for d in at.dataframe)  # the other tabs do not run


@needs_model
def test_each_tab_opens_from_the_url(page):
    cross = table_with(page("sharing", LAYERS), "stored_layers")
    assert cross["mode"].tolist()[0] == "none"
    assert set(cross["mode"].iloc[1:]) == {"share"}
    at = page("sharing", CONVERT)
    assert table_with(at, "ppl_vs_original")["kv_heads"].tolist() == [8, 4, 2, 1]
    assert not at.toggle(key="sh_uptrain").value
    at = page("sharing", {"sh_tab": "Trained from scratch"})
    assert not at.toggle(key="sh_live").value


@needs_model
def test_changing_widgets_reruns(page):
    at = page("sharing")
    at.selectbox(key="sh_kv").set_value(1).run()
    assert not at.exception
    assert metrics(at)["KV per token"] == bytes_str(kv_bytes(PRESETS["llama-3-8b"].with_kv_heads(1), 1))
    at.selectbox(key="sh_model").set_value("gpt2").run()
    assert not at.exception
    assert table_with(at, "kv_vs_mha")["kv_heads"].tolist() == divisors(12)
    at = page("sharing", LAYERS)
    at.slider(key="sh_start").set_value(0).run()
    assert not at.exception
    roles = table_with(at, "reads")
    assert roles.loc[1, "stores"] == "nothing"


@needs_model
def test_url_restores_the_view(page):
    at = page("sharing", {"sh_model": "llama-2-7b", "sh_kv": "4", "sh_tokens": "2048", "sh_bits": "8"})
    assert at.selectbox(key="sh_model").value == "llama-2-7b"
    assert at.selectbox(key="sh_kv").value == 4
    assert at.number_input(key="sh_tokens").value == 2048
    assert at.segmented_control(key="sh_bits").value == 8
    row = table_with(at, "kv_vs_mha").set_index("kv_heads").loc[4]
    assert row.kv_bytes_total == kv_bytes(PRESETS["llama-2-7b"].with_kv_heads(4), 2048, 8, 8)
    at = page("sharing", LAYERS | {"sh_start": "4"})
    assert at.slider(key="sh_start").value == 4
    assert table_with(at, "reads").loc[5, "stores"] == "nothing"
    assert page("sharing", CONVERT | {"sh_windows": "2"}).number_input(key="sh_windows").value == 2


def test_an_empty_bits_value_falls_back_to_16(page):
    # /sharing?sh_bits= once stopped the page: the segmented control returned None and kv_bytes compared it with 1
    at = page("sharing", {"sh_bits": ""})
    assert at.segmented_control(key="sh_bits").value == 16
    assert metrics(at)["KV per token"] == bytes_str(kv_bytes(PRESETS["llama-3-8b"], 1))


@needs_model
def test_garbage_url_falls_back_to_defaults(page):
    at = page("sharing", {"sh_model": "llama-9", "sh_kv": "3", "sh_tokens": "-5", "sh_bits": "5", "sh_tab": "nope"})
    assert at.selectbox(key="sh_model").value == "llama-3-8b"
    assert at.selectbox(key="sh_kv").value == 8
    assert at.number_input(key="sh_tokens").value == 8192
    assert at.segmented_control(key="sh_bits").value == 16
    assert len(at.get("plotly_chart")) == 3  # the first tab
    at = page("sharing", LAYERS | {"sh_start": "99", "sh_mode": "fuse", "sh_t": "2"})
    assert at.slider(key="sh_start").value == 2
    assert at.segmented_control(key="sh_mode").value == "share"
    assert at.slider(key="sh_t").value == 0.5
    at = page("sharing", CONVERT | {"sh_windows": "lots", "sh_uptrain": "maybe"})
    assert at.number_input(key="sh_windows").value == 4
    assert not at.toggle(key="sh_uptrain").value


def figure(at, title_start: str) -> dict:
    import json

    return next(f for f in (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
                if f["layout"]["title"]["text"].startswith(title_start))


def decoded(value) -> list:
    from tests.app.test_figures import decode

    return list(decode(value))


@needs_model
def test_cross_layer_perplexities_carry_their_intervals(page):
    # 143.3 vs 136.0 were single numbers compared without noise
    at = page("sharing", LAYERS)
    cross = table_with(at, "stored_layers")
    assert (cross["perplexity_low"] <= cross["perplexity"]).all()
    assert (cross["perplexity"] <= cross["perplexity_high"]).all()
    assert (cross["ppl_vs_full_low"] <= cross["ppl_vs_full"]).all()
    assert (cross["ppl_vs_full"] <= cross["ppl_vs_full_high"]).all()
    assert cross["vs_full"].iloc[0] == "baseline"
    assert set(cross["vs_full"].iloc[1:]) <= {"worse", "better", "within noise"}
    assert cross["t"].isna().all()  # share merges nothing: no merge weight (an empty cell, not "None")
    row = cross[(cross["mode"] == "share") & (cross["start_layer"] == 2)].iloc[0]
    summary = next(c.value for c in at.caption if c.value.startswith("Sharing from layer 2"))
    assert f"a ratio of {row.ppl_vs_full:.3f}x [{row.ppl_vs_full_low:.3f}, {row.ppl_vs_full_high:.3f}]" in summary
    fig = figure(at, "Cross-layer sharing")
    share = next(t for t in fig["data"] if t["name"] == "share")
    assert share["error_y"]["type"] == "data"
    hollow = [c == "white" for c in share["marker"]["color"]]
    assert hollow == (cross.loc[cross["mode"] == "share", "vs_full"] == "within noise").tolist()


@needs_model
def test_conversion_says_its_ratio_with_the_interval_and_labels_both_axis_ends(page):
    import math

    at = page("sharing", CONVERT)
    table = table_with(at, "ppl_vs_original")
    mqa = table.iloc[-1]
    assert mqa.ppl_vs_original_low <= mqa.ppl_vs_original <= mqa.ppl_vs_original_high
    caption = next(c.value for c in at.caption if c.value.startswith("Mean-pooling"))
    interval = f"{mqa.ppl_vs_original:.2f} [{mqa.ppl_vs_original_low:.2f}, {mqa.ppl_vs_original_high:.2f}]"
    assert interval in caption
    fig = figure(at, "Bundled model converted")
    axis = fig["layout"]["yaxis"]
    low, high = (10 ** v for v in axis["range"])
    assert math.isclose(low, axis["tickvals"][0])  # the axis starts and ends at a labelled tick
    assert math.isclose(high, axis["tickvals"][-1])
    assert low <= table["perplexity_low"].min()
    assert high >= table["perplexity_high"].max()


@needs_model
def test_the_shipped_run_says_what_it_cannot_compare(page):
    at = page("sharing", {"sh_tab": "Trained from scratch"})
    caption = next(c.value for c in at.caption if c.value.startswith("Shipped run"))
    summary = table_with(at, "decode_tokens_per_s")
    if "bpb_vs_mha" not in summary:
        assert "carries no interval and is not ranked" in caption
    if "decode_tokens_per_s_q1" in summary:
        mha = summary.iloc[0]
        assert f"{mha.decode_tokens_per_s:,.0f} (IQR {mha.decode_tokens_per_s_q1:,.0f}-" in caption
    else:
        assert "without its spread: not compared" in caption


def test_weights_that_do_not_fit_the_gpu_say_so_and_draw_no_empty_plot(page):
    # llama-3-70b on an L4: "Sequences that fit 0", an empty log-axis plot and a clipped title
    at = page("sharing", {"sh_model": "llama-3-70b", "sh_gpu": "L4 24GB"})
    assert metrics(at)["Sequences that fit on L4 24GB"] == "none"
    assert len(at.warning) == 1
    assert "With 8 KV heads the 16-bit weights (141 GB) do not fit the L4 24GB" in at.warning[0].value
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(specs) == 2  # the head groups and the bytes per token; no capacity chart without a sequence
    assert not any("Sequences that fit" in spec for spec in specs)


@pytest.mark.parametrize(("tab", "enabled"), [({}, {"sh_model", "sh_kv", "sh_tokens", "sh_batch", "sh_bits",
                                                    "sh_gpu"}),
                                              (LAYERS, set()), (CONVERT, {"sh_seed"})])
def test_sidebar_settings_that_do_nothing_on_a_tab_are_greyed_out_and_said(page, tab, enabled):
    if tab and not HAVE_MODEL:
        pytest.skip("no bundled model")
    at = page("sharing", tab)
    keys = ["sh_model", "sh_kv", "sh_tokens", "sh_batch", "sh_bits", "sh_gpu", "sh_seed"]
    live = {w.key for w in at.sidebar.children.values() if getattr(w, "key", None) in keys and not w.disabled}
    assert live == enabled
    note = at.sidebar.caption[0].value
    assert ("None of these settings" in note) == (tab == LAYERS)


def test_captions_rank_nothing_inside_the_noise():
    import pandas as pd

    from ui.sharing_figures import convert_caption, shipped_caption

    base = {"steps": 20, "tokens_seen": 20480, "params": 1000, "decode_batch": 4, "decode_context": 128,
            "kv_vs_mha": 1.0, "decode_rounds": 5}
    summary = pd.DataFrame([
        base | {"variant": "MHA (8 KV heads)", "val_bits_per_byte": 3.049, "val_bits_per_byte_low": 3.025,
                "val_bits_per_byte_high": 3.074, "bpb_vs_mha": 0.0, "bpb_vs_mha_low": 0.0, "bpb_vs_mha_high": 0.0,
                "vs_mha": "baseline", "decode_tokens_per_s": 5485.0, "decode_tokens_per_s_q1": 4164.0,
                "decode_tokens_per_s_q3": 5540.0},
        base | {"variant": "MQA (1 KV heads)", "kv_vs_mha": 0.125, "val_bits_per_byte": 3.050,
                "val_bits_per_byte_low": 3.026, "val_bits_per_byte_high": 3.075, "bpb_vs_mha": 0.001,
                "bpb_vs_mha_low": -0.004, "bpb_vs_mha_high": 0.006, "vs_mha": "within noise",
                "decode_tokens_per_s": 3785.0, "decode_tokens_per_s_q1": 3733.0, "decode_tokens_per_s_q3": 5701.0}])
    text = shipped_caption(summary, "Live run")
    assert "+0.001 [-0.004, +0.006] bits/byte on the same tokens, within noise" in text
    assert "5,485 (IQR 4,164-5,540) vs 3,785 (IQR 3,733-5,701) tokens/s" in text
    assert "MQA (1 KV heads) within noise" in text
    assert "faster" not in text
    assert "better" not in text
    table = pd.DataFrame([{"kv_heads": 8, "attention": "MHA", "kv_bytes_per_token": 4096, "ppl_vs_original": 1.0,
                           "ppl_vs_original_low": 1.0, "ppl_vs_original_high": 1.0, "vs_original": "original"},
                          {"kv_heads": 4, "attention": "GQA", "kv_bytes_per_token": 2048, "ppl_vs_original": 1.01,
                           "ppl_vs_original_low": 0.99, "ppl_vs_original_high": 1.03, "vs_original": "within noise"}])
    assert "leaves perplexity within noise of the original (ratio 1.01 [0.99, 1.03])" in convert_caption(table, 0)
