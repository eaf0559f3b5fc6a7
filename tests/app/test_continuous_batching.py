"""Continuous batching page: renders with defaults, reruns on a widget change, restores from the URL."""


def summary(at):
    """The metrics table (the first dataframe on the page), indexed by scheduler."""
    return at.dataframe[0].value.set_index("scheduler")


def test_defaults_show_continuous_beating_static_and_chunked_trading_ttft_for_tpot(page):
    at = page("continuous_batching")
    s = summary(at)
    assert list(s.index) == ["static batching", "continuous batching", "chunked prefill"]
    assert (s["output_tokens"] == s["output_tokens"].iloc[0]).all()  # the same workload for each
    static, cont, chunk = s.loc["static batching"], s.loc["continuous batching"], s.loc["chunked prefill"]
    assert cont.output_tok_per_s > static.output_tok_per_s
    assert chunk.ttft_ms_p50 > cont.ttft_ms_p50
    assert chunk.tpot_ms_p99 < cont.tpot_ms_p99
    assert len(at.metric) == 3
    assert "Continuous batching delivers" in at.caption[0].value


def test_defaults_pressure_the_kv_pool_so_preemption_matters(page):
    # The kvcore defaults (llama-3-8b, 512 + 256 tokens at 24/s) peaked at 10-19% of the pool: nothing was
    # preempted and recompute vs swap changed nothing. The page's defaults fill the pool.
    at = page("continuous_batching")
    s = summary(at)
    assert at.selectbox(key="model").value == "llama-2-7b"
    assert (s["peak_kv_usage"] > 0.99).all()
    assert s.loc["continuous batching", "preemptions"] > 0
    assert s.loc["chunked prefill", "preemptions"] > 0
    assert s.loc["continuous batching", "recomputed_tokens"] > 0
    pool = next(c.value for c in at.caption if c.value.startswith("KV pool"))
    assert "Preempted (recompute)" in pool
    assert "tokens computed again" in pool
    at.segmented_control(key="pre").set_value("swap").run()
    assert not at.exception
    swapped = summary(at)
    assert (swapped["recomputed_tokens"] == 0).all()
    assert swapped.loc["chunked prefill", "swap_GB"] > 0
    assert swapped.loc["chunked prefill", "preemptions"] != s.loc["chunked prefill", "preemptions"]
    assert swapped.loc["chunked prefill", "output_tok_per_s"] != s.loc["chunked prefill", "output_tok_per_s"]
    assert "GB over the host link" in next(c.value for c in at.caption if c.value.startswith("KV pool"))


def test_a_pool_that_holds_everything_preempts_nothing(page):
    at = page("continuous_batching", {"blk": "40000"})
    s = summary(at)
    assert (s["kv_blocks"] == 40000).all()
    assert s["preemptions"].sum() == 0
    assert "Nothing was preempted" in next(c.value for c in at.caption if c.value.startswith("KV pool"))


def test_url_restores_the_view(page):
    at = page("continuous_batching", {"n": "60", "rate": "12", "sch": ["continuous", "chunked"], "pre": "swap",
                                      "blk": "1200", "apc": "true", "shr": "0.5"})
    assert at.number_input(key="n").value == 60
    assert at.segmented_control(key="pre").value == "swap"
    s = summary(at)
    assert list(s.index) == ["continuous batching", "chunked prefill"]
    assert (s["requests"] == 60).all()
    assert (s["kv_blocks"] == 1200).all()
    assert (s["prefix_hit_rate"] > 0).all()


def test_garbage_url_falls_back_to_defaults(page):
    at = page("continuous_batching", {"n": "-3", "rate": "fast", "sch": "nope", "pre": "drop", "len": "zipf",
                                      "bs": "7", "model": "gpt-9"})
    assert at.number_input(key="n").value == 200
    assert at.segmented_control(key="pre").value == "recompute"
    assert at.segmented_control(key="len").value == "lognormal"
    assert at.segmented_control(key="bs").value == 16
    assert at.selectbox(key="model").value == "llama-2-7b"


def test_a_pool_too_small_for_one_request_explains_itself(page):
    at = page("continuous_batching", {"blk": "10"})
    assert any("KV blocks" in e.value and "pool has 10" in e.value for e in at.error)


def test_trace_source_asks_for_a_file(page):
    at = page("continuous_batching", {"src": "trace"})
    assert any("Upload a trace CSV" in i.value for i in at.info)
    assert not at.dataframe


def test_the_engine_calibrated_on_this_machine_times_the_steps(page):
    from ui.batching_runs import CALIBRATED

    at = page("continuous_batching", {"n": "40", "sch": ["continuous"], "om": "64"})
    at.selectbox(key="gpu").set_value(CALIBRATED).run()
    assert not at.exception
    assert len(at.metric) == 1
    assert any("the bundled model's engine on this machine" in c.value for c in at.caption)  # the pool caption
    assert any("R^2" in c.value for c in at.caption)  # the fitted step time, in the notes


VALUE_CHAR_PX = 17.0  # a metric's value (36 px font): wider text is cut ("none meets the S...")


def search_table(at):
    return next(d.value for d in at.dataframe if "meets_slo" in d.value.columns and "pareto" in d.value.columns)


def test_the_default_search_finds_a_configuration_and_its_metrics_fit(page):
    # With the page's defaults no configuration met the SLOs, and the metric read "none meets the S..."
    from streamlit.testing.v1.element_tree import Metric

    from tests.app.test_figures import placed

    at = page("continuous_batching", {"so_on": "true"})
    configs = search_table(at)
    assert configs["meets_slo"].any()
    assert configs["best"].sum() == 1
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Configurations meeting the SLOs"] == f"{int(configs['meets_slo'].sum())} of {len(configs)}"
    assert metrics["Best: output tokens/s"] == f"{configs.loc[configs['best'], 'output_tok_per_s'].iloc[0]:,.0f}"
    for p in placed(at):
        if isinstance(p.node, Metric):
            assert len(p.node.value) * VALUE_CHAR_PX <= p.width, (p.node.label, p.node.value, p.width)
    assert not [w.value for w in at.warning if "binds" in w.value]


def test_when_no_configuration_meets_the_slos_the_page_says_which_binds(page):
    # at the workload's own rate (32 requests/s) every configuration's TTFT p99 is tens of seconds
    at = page("continuous_batching", {"so_on": "true", "so_rate": "1.0"})
    configs = search_table(at)
    assert not configs["meets_slo"].any()
    assert {m.label: m.value for m in at.metric}["Best: output tokens/s"] == "none"
    ran = configs[configs["error"].isna()]
    binding = [w.value for w in at.warning if "binds" in w.value]
    assert len(binding) == 1
    assert f"The TTFT SLO binds: the lowest TTFT p99 is {ran['ttft_ms_p99'].min():,.0f} ms" in binding[0]
