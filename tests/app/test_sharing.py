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
