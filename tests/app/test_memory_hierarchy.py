"""Memory hierarchy page: renders each tab, reruns on a widget change, restores from the URL, shrugs off garbage."""

from kvcore.shapes import GPU_PRESETS


def metrics(at):
    return {m.label: m.value for m in at.metric}


def table(at, column):
    """The first table on the page that has ``column``."""
    return next(df.value for df in at.dataframe if column in df.value.columns)


def test_defaults_render_the_offload_tab(page):
    at = page("memory_hierarchy")
    values = metrics(at)
    assert float(values["TTFT p50, GPU + lower tiers"].split()[0]) < float(values["TTFT p50, recompute all"].split()[0])
    tiers = table(at, "hit_rate_tokens")
    assert tiers["tier"].tolist() == ["GPU HBM", "CPU DRAM", "Local NVMe", "Remote store"]
    assert (tiers["peak_chunks"] <= tiers["capacity_chunks"]).all()
    assert len(at.get("plotly_chart")) == 3


def test_prefetch_into_cpu_reruns_with_prefetch_traffic(page):
    at = page("memory_hierarchy")
    assert "prefetch" not in table(at, "why")["why"].tolist()
    at.segmented_control(key="h_prefetch").set_value("cpu").run()
    assert not at.exception
    assert "prefetch" in table(at, "why")["why"].tolist()


def test_url_restores_settings_and_tab(page):
    at = page("memory_hierarchy", {"h_policy": "lfu", "h_g_gb": "2", "h_wl": "rag", "h_n": "500"})
    assert at.segmented_control(key="h_policy").value == "lfu"
    assert table(at, "hit_rate_tokens")["capacity_GB"][0] == 2.0
    assert len(table(at, "prompt_tokens")) == 500
    at = page("memory_hierarchy", {"h_tab": "Roofline", "h_ctx": "4096", "h_batch": "8", "h_gpu": "A100 80GB"})
    assert at.number_input(key="h_ctx").value == 4096
    assert table(at, "method")["context"].tolist() == [4096] * 3
    assert table(at, "ridge")["ridge"][0] == GPU_PRESETS["A100 80GB"].ridge_point


def test_pd_tab_compares_both_setups(page):
    at = page("memory_hierarchy", {"h_tab": "Prefill/decode split", "h_pd_n": "60"})
    assert table(at, "slo_attainment")["setup"].tolist() == ["colocated (2 GPUs)", "disaggregated (1P + 1D)"]


def test_bandwidth_tab_measures_this_machine(page):
    at = page("memory_hierarchy", {"h_tab": "Measured bandwidth", "h_mb": "8"})
    bw = table(at, "measured_GBps").set_index("path")
    assert bw.loc["host memcpy (DRAM -> DRAM)", "measured_GBps"] > 0


def test_garbage_url_falls_back_to_defaults(page):
    at = page("memory_hierarchy", {"h_policy": "xyz", "h_g_gb": "-3", "h_tab": "nope", "h_n": "lots", "h_chunk": "7",
                                   "h_model": "gpt-9"})
    assert at.segmented_control(key="h_policy").value == "lru"
    assert at.number_input(key="h_n").value == 2000
    assert at.number_input(key="h_g_gb").value == 4.0
    assert at.selectbox(key="h_model").value == "llama-3-8b"
    assert table(at, "hit_rate_tokens")["capacity_GB"][0] == 4.0


def test_a_metric_shows_a_tables_number_as_the_table_does(page):
    # "62.9 ms" in the metric beside "62.88" in the TTFT table: one number, one formatting
    from tests.app.test_figures import cell_text

    at = page("memory_hierarchy")
    setups = table(at, "p50_ms")["setup"].tolist()
    values = metrics(at)
    assert values["TTFT p50, recompute all"] == f"{cell_text(at, 'p50_ms', 0)} ms"
    assert values["TTFT p50, GPU + lower tiers"] == f"{cell_text(at, 'p50_ms', 2)} ms"
    assert len(setups) == 3
