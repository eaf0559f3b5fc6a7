"""Home page: the KV memory calculator renders, reruns on a widget change, and restores from the URL."""

from kvcore.shapes import PRESETS, kv_bytes
from ui.format import bytes_str


def metric_values(at):
    return [m.value for m in at.metric]


def test_defaults_show_the_hf_blog_anchor(page):
    at = page("home")
    # llama-2-7b, 10,000 tokens, fp16: 5.24 GB (Hugging Face's KV-quantization blog: "about 5 GB").
    assert metric_values(at)[1] == "5.24 GB"
    assert at.dataframe[0].value["model"].tolist() == ["llama-2-7b", "llama-3-8b", "mistral-7b"]


def test_changing_bits_reruns_with_new_numbers(page):
    at = page("home")
    at.segmented_control(key="bits").set_value(4).run()
    table = at.dataframe[0].value
    expected = kv_bytes(PRESETS["llama-2-7b"], 10_000, bits=4)
    assert table.loc[0, "kv_bytes_total"] == expected
    assert metric_values(at)[1] == "1.31 GB"


def test_url_restores_the_view(page):
    at = page("home", {"models": ["llama-3-70b"], "tokens": "8192", "batch": "4", "bits": "8"})
    table = at.dataframe[0].value
    assert table["model"].tolist() == ["llama-3-70b"]
    assert table.loc[0, "kv_bytes_total"] == kv_bytes(PRESETS["llama-3-70b"], 8192, 4, 8)
    assert at.number_input(key="tokens").value == 8192


def test_garbage_url_falls_back_to_defaults(page):
    at = page("home", {"tokens": "-5", "batch": "lots", "bits": "7", "gpu": "TPU", "models": "nope"})
    assert at.number_input(key="tokens").value == 10_000
    assert at.number_input(key="batch").value == 1
    assert at.segmented_control(key="bits").value == 16
    assert metric_values(at)[1] == "5.24 GB"


def test_custom_shape_with_bad_heads_explains_itself(page):
    at = page("home", {"models": "custom", "c_q": "32", "c_kv": "5"})
    assert any("multiple of num_kv_heads" in e.value for e in at.error)


def test_the_model_chips_and_metric_labels_have_room(page):
    # In a third of the page the third chip shrank to "m" and a metric label was cut ("Tokens that fit on ...").
    from streamlit.testing.v1.element_tree import Multiselect

    from tests.app.test_figures import MAIN_PX, label_problems, placed

    at = page("home", {"models": ["llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "falcon-7b"],
                       "gpu": "RTX 4090 24GB", "tokens": "10000000", "batch": "4096"})
    models = next(p for p in placed(at) if isinstance(p.node, Multiselect) and p.node.key == "models")
    assert models.width == MAIN_PX
    assert not label_problems(at)


def test_the_page_icon_needs_no_network():
    # Streamlit fetches a ":material/...:" page icon from fonts.gstatic.com, which fails offline (the browser test
    # also asserts that no page requests another host).
    import re

    from tests.conftest import ROOT

    source = (ROOT / "app.py").read_text()
    assert re.search(r'PAGE_ICON = "[^":]+"', source)
    assert "page_icon=PAGE_ICON" in source


def test_every_chosen_model_has_its_metrics(page):
    # the metrics once covered only the first model of three
    at = page("home")
    labels = [m.label for m in at.metric]
    for model in ("llama-2-7b", "llama-3-8b", "mistral-7b"):
        assert f"{model}: KV per token" in labels
    table = at.dataframe[0].value
    assert [m.value for m in at.metric][4::3] == [bytes_str(v) for v in table["kv_bytes_total"]][1:]


def test_lines_that_coincide_are_one_line_that_says_so(page):
    # llama-3-8b and mistral-7b have the same KV shape: three legend entries, two visible lines
    import json

    at = page("home")
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = [t["name"] for t in fig["data"]]
    assert names == ["llama-2-7b", "llama-3-8b = mistral-7b"]
    assert "llama-3-8b and mistral-7b coincide" in fig["layout"]["title"]["text"].replace("<br>", " ")
    lone = page("home", {"models": ["llama-2-7b", "gpt2"]})
    fig = json.loads(lone.get("plotly_chart")[0].proto.spec)
    assert [t["name"] for t in fig["data"]] == ["llama-2-7b", "gpt2"]
    assert "coincide" not in fig["layout"]["title"]["text"]


def test_weights_that_do_not_fit_the_gpu_say_so(page):
    at = page("home", {"models": ["llama-3-70b", "llama-3-8b"], "gpu": "L4 24GB"})
    values = [m.value for m in at.metric if m.label.startswith("Tokens fit")]
    assert values[0] == "none"
    assert values[1] != "none"
    assert len(at.warning) == 1
    assert "llama-3-70b (141 GB) do not fit the L4 24GB" in at.warning[0].value
    assert "llama-3-8b" not in at.warning[0].value
