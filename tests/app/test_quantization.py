"""Quantization page: renders every method's measurements with their noise, reruns on a widget change, restores
from the URL (tabs included)."""

import json

import pytest

from kvcore.models.loader import BUNDLED_DIR
from kvcore.quant.methods import METHODS
from tests.app.conftest import assert_no_bound_widget_moved_up
from ui.format import signed_pct

HAVE_MODEL = (BUNDLED_DIR / "model.safetensors").is_file()
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason=f"the bundled model is not trained yet ({BUNDLED_DIR})")


RESULTS = {"qtab": "Results"}  # the tab that holds the tables
GRAY, NO_ARROW = 2, 2  # MetricProto.MetricColor.GRAY, MetricDirection.NONE


def metrics(at):
    return {m.label: m.value for m in at.metric}


def test_defaults_render(page):
    at = page("quantization", RESULTS)
    if not HAVE_MODEL:  # the page explains itself instead of failing
        assert any("bundled model" in e.value for e in at.error)
        return
    summary = at.dataframe[0].value
    assert summary["method"].tolist() == list(METHODS)
    kivi = summary.set_index("method").loc["kivi-2"]
    assert metrics(at)["KV bytes vs fp16"] == f"{kivi.bytes_ratio:.3f}x"
    assert len(at.dataframe[2].value) == len(METHODS)  # the registry with its papers
    premise = next(d.value for d in at.dataframe if list(d.value.columns) == ["claim", "measured", "verdict"])
    pointer = [c.value for c in at.caption if "choose **smollm2-135m**" in c.value]
    assert len(pointer) == (premise["verdict"] != "holds").any()  # the toy cannot show it all: the real model can


@needs_model
def test_the_default_scores_256_tokens_and_says_why(page):
    at = page("quantization", RESULTS)
    summary = at.dataframe[0].value.set_index("method")
    assert (summary["scored_tokens"] == 256).all()
    note = next(c.value for c in at.caption if "scored" in c.value or "scores" in c.value)
    assert "256 tokens" in note
    assert "16 blocks" in note
    assert "within noise" in note
    # the lesson of the default is the paper's, not noise: 2-bit per-token is worse than fp16 beyond its interval
    assert summary.loc["int2-token", "vs_fp16"] == "worse"
    assert summary.loc["int2-token", "ppl_vs_fp16_low"] > 1.0
    assert not summary.loc[summary["vs_fp16"] == "within noise", "ppl_vs_fp16_low"].gt(1.0).any()


@needs_model
@pytest.mark.parametrize("method", ["int8-token", "int2-token"])
def test_a_delta_is_coloured_only_beyond_the_noise(page, method):
    at = page("quantization", {**RESULTS, "qmethod": method})
    row = at.dataframe[0].value.set_index("method").loc[method]
    ppl = next(m for m in at.metric if m.label == "Perplexity")
    if row.vs_fp16 == "within noise":
        assert ppl.delta.startswith("within noise")
        assert (ppl.proto.color, ppl.proto.direction) == (GRAY, NO_ARROW)
    else:
        assert "within noise" not in ppl.delta
        assert ppl.proto.color != GRAY
    assert f"[{signed_pct(100 * (row.ppl_vs_fp16_low - 1), 1)}, {signed_pct(100 * (row.ppl_vs_fp16_high - 1), 1)}]" \
        in ppl.delta


@needs_model
def test_tabs_are_in_the_url(page):
    at = page("quantization", {"qtab": "Error by layer"})
    assert [t.label for t in at.tabs] == ["Memory vs perplexity", "K/V magnitudes", "Error by layer",
                                         "Generated text", "Results"]
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(titles) == 2  # KIVI's premise above the tabs, then the open tab's chart alone
    assert "Largest channel over its head" in titles[0]
    assert "relative L2 error by layer" in titles[1]
    assert not at.dataframe  # the Results tab is closed: its tables are not built


@needs_model
def test_changing_the_method_reruns(page):
    at = page("quantization", RESULTS)
    at.selectbox(key="qmethod").set_value("int8-token").run()
    assert not at.exception
    row = at.dataframe[0].value.set_index("method").loc["int8-token"]
    assert metrics(at)["KV bytes vs fp16"] == f"{row.bytes_ratio:.3f}x"
    assert "int8" in next(c.value for c in at.caption if c.value.startswith("**"))


@needs_model
def test_url_restores_a_custom_method(page):
    at = page("quantization", {"qmethod": "custom", "qbits": "4", "qaxis": "per-token", "qresidual": "0",
                               "qtokens": "64", "qlayer": "1", "qhead": "2", **RESULTS})
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
    assert at.select_slider(key="qtokens").value == 256
    assert at.slider(key="qlayer").value == 0
    assert at.selectbox(key="qhead").value == "all"
    assert at.number_input(key="qresidual").value == 32
    assert at.slider(key="qoutliers").value == 0.0


@needs_model
def test_the_pareto_front_passes_through_no_point_within_noise(page):
    # The dashed "Pareto front (beyond noise)" ran through int3-token, a hollow within-noise marker
    # (CSV: vs_fp16=within noise, pareto=True).
    at = page("quantization", RESULTS)
    summary = at.dataframe[0].value
    assert not summary[(summary["vs_fp16"] == "within noise") & summary["pareto"]].size
    assert summary["pareto"].any()
    chart = page("quantization")
    fig = next(f for f in (json.loads(c.proto.spec) for c in chart.get("plotly_chart"))
               if any(t.get("name") == "Pareto front (beyond noise)" for t in f["data"]))
    front = next(t for t in fig["data"] if t.get("name") == "Pareto front (beyond noise)")
    ratios = set(summary.loc[summary["vs_fp16"] == "within noise", "bytes_ratio"].round(9))
    assert not {round(float(x), 9) for x in decode(front["x"])} & ratios


def decode(value):
    from tests.app.test_figures import decode as decode_array

    return list(decode_array(value))


def label_boxes(fig, width: float, height: float, font: float = 11.0):
    """Each name's box in px (y up) from the figure's annotations, estimated apart from the placer: 0.62 em a
    character, 1.3 em a line, centred at the point plus the annotation's offset (ax, ay; ay grows downwards)."""
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    boxes = []
    for a in fig.layout.annotations:
        if a.xref != "x":
            continue
        cx = (a.x - x0) / (x1 - x0) * width + (a.ax or 0)
        cy = (a.y - y0) / (y1 - y0) * height - (a.ay or 0)
        w, h = 0.62 * font * len(a.text), 1.3 * font
        boxes.append((a.text, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return boxes


def test_pareto_labels_do_not_cover_each_other():
    # int2-channel, kivi-2 and int3-token (all labelled: front, chosen, front) sat on top of each other
    import pandas as pd

    from ui.quant_figures import PARETO_WIDTH, pareto

    rows = [("fp16", "baseline", 1.0, 1.0, "baseline", True), ("int2-channel", "per-channel", 0.1875, 1.037,
            "worse", True), ("kivi-2", "KIVI", 0.289, 1.027, "worse", False),
            ("int3-token", "per-token", 0.25, 1.02, "worse", True), ("int4-token", "per-token", 0.3125, 1.012,
                                                                       "worse", True),
            ("int4-group", "grouped", 0.25, 1.045, "worse", False), ("outliers", "outliers", 0.32, 1.04, "worse",
                                                                        False)]
    summary = pd.DataFrame(rows, columns=["method", "family", "bytes_ratio", "ppl_vs_fp16", "vs_fp16", "pareto"])
    summary["ppl_vs_fp16_low"], summary["ppl_vs_fp16_high"] = summary["ppl_vs_fp16"] - 0.01, summary["ppl_vs_fp16"]
    summary["perplexity"] = 10 * summary["ppl_vs_fp16"]
    fig = pareto(summary, "kivi-2")
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    width = PARETO_WIDTH - fig.layout.margin.l - fig.layout.margin.r
    height = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    boxes = label_boxes(fig, width, height)
    assert {b[0] for b in boxes} == {"fp16", "int2-channel", "kivi-2", "int3-token", "int4-token"}
    markers = [((x - x0) / (x1 - x0) * width, (y - y0) / (y1 - y0) * height)
               for x, y in zip(summary["bytes_ratio"], summary["ppl_vs_fp16"], strict=True)]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            apart = a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2]
            assert apart, (a, b)
        for x, y in markers:  # a name covers no marker
            assert not (a[1] < x < a[3] and a[2] < y < a[4]), (a, x, y)
        assert min(a[1], a[2]) >= 0, a  # inside the plot
        assert a[3] <= width, a
        assert a[4] <= height, a


def test_a_change_near_zero_never_reads_minus_zero():
    import pandas as pd

    from ui.quant_figures import ratio_text

    text = ratio_text(pd.Series({"ppl_vs_fp16": 0.99996, "ppl_vs_fp16_low": 0.9991, "ppl_vs_fp16_high": 1.0008}))
    assert text == "0.0% [-0.1%, +0.1%]"


def test_smollm2_measures_kivis_premise(page):
    at = page("quantization", {"qmodel": "smollm2-135m", "qtokens": "64", **RESULTS})
    assert any(c.value.startswith("Model: SmolLM2-135M-Instruct") for c in at.caption)
    assert at.number_input(key="qwindows").value == 1  # the slower model opens on one window
    outliers = next(b.value for b in at.success if b.value.startswith("**Keys have outlier channels"))
    assert "in 30 of 30 layers" in outliers
    per_channel = next(b.value for b in at.success if "lose less than per token at 2 bits" in b.value)
    assert "lower in 30 of 30 layers" in per_channel
    premise = next(d.value for d in at.dataframe if list(d.value.columns) == ["claim", "measured", "verdict"])
    assert premise["verdict"].tolist()[:3] == ["holds", "holds", "holds"]
    channels = next(d.value for d in at.dataframe if "k_top_ratio" in d.value.columns)
    assert len(channels) == 30
    figures = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert any(f["layout"]["yaxis"]["title"]["text"] == "largest / median channel" for f in figures)


def test_the_kept_measurement_is_keyed_by_its_model(monkeypatch):
    from kvcore.quant import evaluate as qe
    from ui import disk_cache, quant_runs

    keys = []
    monkeypatch.setattr(disk_cache, "computed", lambda name, settings, modules, weights, *rest: keys.append(
        (settings[0], weights)))
    for name in ("bundled", "smollm2-135m"):
        quant_runs.measure(qe.QuantText(), name=name)
    assert [k[0] for k in keys] == ["bundled", "smollm2-135m"]
    assert keys[0][1] != keys[1][1]
    assert keys[1][1].startswith("smollm2-135m:")


@needs_model
def test_with_background_work_the_decode_fills_in_behind_the_page(page, behind):
    """Every method decoding the text is the page's minute on a real model: the first view shows the chosen method's
    errors, the premise's outlier rows and the channel chart at once, with a bar that follows the decode; the next
    run (the bar's rerun) shows the perplexity, and its errors are the ones the first view showed."""
    from ui import background

    view = {"qtokens": "64", "qseed": "11", **RESULTS}
    at = page("quantization", view)
    first = metrics(at)
    assert first["Perplexity"] == "decoding..."
    assert first["KV bytes vs fp16"] == "..."
    texts = [p.proto.text for p in at.get("progress")]
    assert len(texts) == 1, texts
    assert texts[0].startswith("Decoding the text through every method's cache on bundled: "), texts
    premise = next(d.value for d in at.dataframe if list(d.value.columns) == ["claim", "measured", "verdict"])
    assert premise["claim"].str.contains("outlier channels").any()
    assert not premise["claim"].str.contains("per channel lose less").any()  # that half needs the decode
    assert any("k_top_ratio" in d.value.columns for d in at.dataframe)
    background.BEHIND.join()
    pending, at = at, page("quantization", view)
    assert not at.get("progress")
    assert_no_bound_widget_moved_up(pending, at)
    done = metrics(at)
    assert done["Perplexity"] != "decoding..."
    assert {k: done[k] for k in ("Key error", "Value error", "Attention error")} == \
        {k: first[k] for k in ("Key error", "Value error", "Attention error")}
    assert at.dataframe[0].value["method"].tolist() == list(METHODS)
