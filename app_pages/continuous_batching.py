"""Continuous batching: static vs continuous batching vs chunked prefill, simulated on the real block manager."""

from dataclasses import replace

import streamlit as st

from kvcore import sched
from kvcore.sched.compare import RULES, ServingSetup, rules_difference
from kvcore.shapes import GPU_PRESETS
from ui import batching_figures, figures, params, search_figures, tables
from ui.batching_runs import CALIBRATED, DEFAULT_MODEL, DEFAULT_WORKLOAD, UploadedTrace, run, setup_for
from ui.guard import user_errors
from ui.search_runs import deployment_of, run_search

st.title("Continuous batching")
st.markdown("A serving engine runs one forward pass per **step** and decides, each step, which requests get how "
            "many tokens. **Static batching** runs a batch until its longest request ends; **continuous batching** "
            "(Orca, vLLM) lets requests join and leave at every step; **chunked prefill** (Sarathi-Serve) splits "
            "long prompts so decodes are never stalled behind them. The same workload runs through each, with "
            "every KV block taken from and returned to the real block manager and every step timed by a roofline.")
W = DEFAULT_WORKLOAD
with st.sidebar:
    st.subheader("Workload")
    source = params.widget(st.segmented_control, "Requests from", key="src", options=["synthetic", "trace"],
                           default="synthetic", required=True)
    trace = None
    if source == "trace":
        upload = st.file_uploader("Trace CSV: arrival_s, prompt_tokens, output_tokens[, prefix_id]", type="csv")
        trace = upload.getvalue() if upload else None
    else:
        n = params.widget(st.number_input, "Requests", key="n", min_value=1, max_value=2000, value=W.num_requests)
        arrival = params.widget(st.segmented_control, "Arrivals", key="arr", options=list(sched.ARRIVALS),
                                default=W.arrival, required=True)
        rate = params.widget(st.number_input, "Arrival rate (requests/s)", key="rate", min_value=0.1,
                             max_value=1000.0, value=W.rate, step=4.0)
        cv = params.widget(st.slider, "Burstiness (CV of gaps)", key="cv", min_value=0.2, max_value=10.0,
                           value=W.burst_cv, disabled=arrival != "bursty")
        lengths = params.widget(st.segmented_control, "Lengths", key="len", options=list(sched.LENGTHS),
                                default=W.lengths, required=True)
        p_mean = params.widget(st.number_input, "Mean prompt (tokens)", key="pm", min_value=1, max_value=4096,
                               value=W.prompt_mean)
        o_mean = params.widget(st.number_input, "Mean output (tokens)", key="om", min_value=1, max_value=2048,
                               value=W.output_mean)
        spread = params.widget(st.slider, "Spread (uniform: +-fraction, lognormal: sigma)", key="spr",
                               min_value=0.0, max_value=1.0 if lengths == "uniform" else 2.0, value=W.spread)
        shared = params.widget(st.slider, "Requests with a shared prefix", key="shr", min_value=0.0, max_value=1.0,
                               value=0.0)
    prefix_tokens = params.widget(st.number_input, "Shared prefix (tokens)", key="ptk", min_value=0,
                                  max_value=4096, value=W.prefix_tokens)
    seed = params.widget(st.number_input, "Seed", key="seed", min_value=0, max_value=1_000_000, value=0)
    st.subheader("Model and GPU")
    model = params.model_preset("Model", key="model", default=DEFAULT_MODEL)
    gpu = params.widget(st.selectbox, "GPU", key="gpu", options=[*GPU_PRESETS, CALIBRATED],
                        help="a GPU preset (roofline step times), or step times fitted to the lab's engine here")
    st.subheader("Scheduler")
    policies = params.widget(st.multiselect, "Schedulers (static, continuous, chunked prefill)", key="sch",
                             options=list(sched.POLICIES), default=list(sched.POLICIES))
    rules = params.widget(st.selectbox, "Rules of continuous / chunked", key="rules", options=list(RULES),
                          help="textbook: vLLM's design documents; vLLM 0.33: its own v1 scheduler, replayed step "
                               "for step against recordings of the real one (null block, whole-sequence admission, "
                               "unhashed blocks freed first; async: one step of scheduling lag)")
    seqs = params.widget(st.number_input, "max_num_seqs (static: batch size)", key="seqs", min_value=1,
                         max_value=1024, value=256)
    budget = params.widget(st.number_input, "Token budget, continuous", key="bud", min_value=64, max_value=65536,
                           value=sched.DEFAULT_BUDGETS["continuous"], step=1024)
    chunk = params.widget(st.number_input, "Token budget, chunked prefill", key="chk", min_value=16,
                          max_value=65536, value=sched.DEFAULT_BUDGETS["chunked"], step=256)
    preemption = params.widget(st.segmented_control, "Preemption", key="pre", options=list(sched.PREEMPTION),
                               default="recompute", required=True)
    host = params.widget(st.number_input, "Host swap pool (blocks, 0 = unbounded)", key="host", min_value=0,
                         max_value=10_000_000, value=0, disabled=preemption != "swap")
    apc = params.widget(st.toggle, "Prefix caching", key="apc", value=False)
    block_size = params.widget(st.segmented_control, "Block size (tokens)", key="bs", options=[8, 16, 32],
                               default=16, required=True)
    blocks = params.widget(st.number_input, "KV blocks (0 = what fits the GPU)", key="blk", min_value=0,
                           max_value=500_000, value=0, step=500)
    drawn = params.widget(st.slider, "Requests drawn in the timeline", key="drawn", min_value=10, max_value=300,
                          value=40)

if source == "trace" and trace is None:
    st.info("Upload a trace CSV (one request per row) or switch back to a synthetic workload.")
    st.stop()
if not policies:
    st.info("Pick at least one scheduler.")
    st.stop()
with user_errors("Simulation"):
    workload = (UploadedTrace(trace, prefix_tokens, seed) if trace else sched.WorkloadConfig(
        num_requests=n, arrival=arrival, rate=rate, burst_cv=cv, lengths=lengths, prompt_mean=p_mean,
        output_mean=o_mean, spread=spread, shared_prefix_fraction=shared, prefix_tokens=prefix_tokens, seed=seed))
    setup = setup_for(ServingSetup(model, gpu, tuple(policies), budget, chunk, seqs, preemption, host or None, apc,
                                   block_size, blocks or None, rules))
    result = run(workload, setup)
names = [r.label for r in result.results]
summary = result.summary.set_index("scheduler")
for col, name in zip(st.columns(len(names)), names, strict=True):
    s = summary.loc[name]
    col.metric(f"{name}: output tokens/s", f"{s.output_tok_per_s:,.0f}",
               help=f"TTFT p50 {tables.shown_text(summary.ttft_ms_p50, s.ttft_ms_p50)} ms, TPOT p99 "
                    f"{tables.shown_text(summary.tpot_ms_p99, s.tpot_ms_p99)} ms, {s.preemptions} preemptions")
st.caption(" ".join(sched.takeaways(result.summary)))
st.caption(batching_figures.pool_caption(result))
figures.show(batching_figures.gantt_figure(result.phases, names, drawn), key="gantt")
figures.show(batching_figures.timeline_figure(result.timeline, names), key="timeline")
figures.show(batching_figures.cdf_figure(result.requests, names), key="cdf")
settings = {"model": model, "gpu": gpu, "seed": seed}
tables.show_table(result.summary, "batching", "metrics", settings, caption=batching_figures.METRICS_CAPTION)
with st.expander("What vLLM 0.33's own rules change on this workload"):
    st.caption(batching_figures.RULES_NOTE)
    with user_errors("Rules comparison", stop=False):
        other = run(workload, replace(setup, rules="textbook" if rules != "textbook" else "vLLM 0.33"))
        textbook, vllm = (result, other) if rules == "textbook" else (other, result)
        tables.show_table(rules_difference(textbook.summary, vllm.summary), "batching", "rules", settings)
with st.expander("Per-request and per-step tables"):
    tables.show_table(result.requests, "batching", "requests", settings, height=300)
    tables.show_table(result.timeline, "batching", "steps", settings, height=300)
with st.expander("How each step is timed and scheduled", expanded=False):
    batching_figures.cost_notes(setup.configs()[0].cost)
st.subheader("Search serving configurations")
st.markdown(search_figures.intro())
if params.widget(st.toggle, "Run the search", key="so_on", value=False):
    with user_errors("Search", stop=False):
        request = search_figures.search_settings()
        if request is not None:
            search_figures.answer(run_search(workload, deployment_of(setup), request), settings)
