"""Quantization page: renders every method's measurements, reruns on a widget change, restores from the URL."""

import pytest

from kvcore.models.loader import BUNDLED_DIR
from kvcore.quant.methods import METHODS

HAVE_MODEL = (BUNDLED_DIR / "model.safetensors").is_file()
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason=f"the bundled model is not trained yet ({BUNDLED_DIR})")


def metrics(at):
    return {m.label: m.value for m in at.metric}


def test_defaults_render(page):
    at = page("quantization")
    if not HAVE_MODEL:  # the page explains itself instead of failing
        assert any("bundled model" in e.value for e in at.error)
        return
    summary = at.dataframe[0].value
    assert summary["method"].tolist() == list(METHODS)
    kivi = summary.set_index("method").loc["kivi-2"]
    assert metrics(at)["KV bytes vs fp16"] == f"{kivi.bytes_ratio:.3f}x"
    assert len(at.dataframe[2].value) == len(METHODS)  # the registry with its papers


@needs_model
def test_changing_the_method_reruns(page):
    at = page("quantization")
    at.selectbox(key="qmethod").set_value("int8-token").run()
    assert not at.exception
    row = at.dataframe[0].value.set_index("method").loc["int8-token"]
    assert metrics(at)["KV bytes vs fp16"] == f"{row.bytes_ratio:.3f}x"
    assert "int8" in at.caption[0].value


@needs_model
def test_url_restores_a_custom_method(page):
    at = page("quantization", {"qmethod": "custom", "qbits": "4", "qaxis": "per-token", "qresidual": "0",
                               "qtokens": "64", "qlayer": "1", "qhead": "2"})
    assert at.selectbox(key="qmethod").value == "custom"
    assert at.segmented_control(key="qbits").value == 4
    assert at.select_slider(key="qtokens").value == 64
    assert at.slider(key="qlayer").value == 1
    assert at.selectbox(key="qhead").value == "2"
    summary = at.dataframe[0].value.set_index("method")
    assert "custom" in summary.index
    assert len(summary) == len(METHODS) + 1
    assert metrics(at)["KV bytes vs fp16"] == f"{summary.loc['custom', 'bytes_ratio']:.3f}x"


@needs_model
def test_garbage_url_falls_back_to_defaults(page):
    at = page("quantization", {"qmethod": "int9", "qbits": "5", "qtokens": "100000", "qlayer": "99", "qhead": "x",
                               "qoutliers": "-3", "qresidual": "lots"})
    assert at.selectbox(key="qmethod").value == "kivi-2"
    assert at.segmented_control(key="qbits").value == 2
    assert at.select_slider(key="qtokens").value == 128
    assert at.slider(key="qlayer").value == 0
    assert at.selectbox(key="qhead").value == "all"
    assert at.number_input(key="qresidual").value == 32
    assert at.slider(key="qoutliers").value == 0.0
