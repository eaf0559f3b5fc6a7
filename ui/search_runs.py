"""The serving-config search section of the Continuous batching page, and its cached run.

:func:`search_section` draws the whole section (its own URL-bound widgets, the answer, the figures and tables)
for the page's workload and presets. The search is :func:`kvcore.study.search.search` on the sweep engine,
in this process; the page bounds it so it answers within about 30 s here: at most ``MAX_CONFIGS`` configurations,
the first ``MAX_REQUESTS`` requests of the workload, ``PROBES`` rates per capacity round.
"""

from __future__ import annotations

import math
from dataclasses import replace

import streamlit as st

from kvcore import sched
from kvcore.sched.compare import ServingSetup
from kvcore.study.search import LATENCIES, SCHEDULERS, SLO, Deployment, SearchResult, SearchSpace, search
from ui import figures, params, search_figures, tables
from ui.batching_runs import UploadedTrace
from ui.guard import user_errors
from ui.progress import with_progress

MAX_CONFIGS = 16  # each simulation of the page's default workload takes about 1 s here
MAX_REQUESTS = 200
PROBES = 2
SEQS_OPTIONS = (16, 32, 64, 128, 256, 512)
TOKEN_OPTIONS = (512, 1024, 2048, 4096, 8192, 16384)
BLOCK_OPTIONS = (8, 16, 32)


def bounded_workload(source: sched.WorkloadConfig | UploadedTrace) -> tuple[sched.Workload, float | None]:
    """The page's workload cut to its first ``MAX_REQUESTS`` requests, and its stated arrival rate (None: a trace,
    whose rate is measured from its arrivals)."""
    if isinstance(source, UploadedTrace):
        full = source.workload()
        if len(full.requests) <= MAX_REQUESTS:
            return full, None
        prompts = None if full.prompts is None else full.prompts[:MAX_REQUESTS]
        return replace(full, requests=full.requests[:MAX_REQUESTS], prompts=prompts), None
    config = replace(source, num_requests=min(source.num_requests, MAX_REQUESTS))
    return sched.make_workload(config), config.rate


@st.cache_data(show_spinner=False, max_entries=16)
def run_search(source: sched.WorkloadConfig | UploadedTrace, deployment: Deployment, space: SearchSpace, slo: SLO,
               latency: str) -> SearchResult:
    """The bounded search of the page's workload; the progress bar is cached with the result."""
    workload, rate = bounded_workload(source)
    total = len(space.configs()) + 2 * PROBES
    done = [0]

    def go(callback) -> SearchResult:
        def step(_result) -> None:
            done[0] += 1
            callback(done[0] / total, f"Searching: {done[0]} simulations")
        return search(workload, deployment, space, slo, rate=rate, latency=latency, probes=PROBES, on_result=step)
    return with_progress("Searching serving configurations...", go)


def _space() -> tuple[SearchSpace, SLO, str]:
    """The section's widgets: SLOs, the values searched, the latency of the Pareto front."""
    a, b, c = st.columns(3)
    ttft = params.widget(a.number_input, "SLO: TTFT p99 (ms)", key="so_ttft", min_value=1.0, max_value=1e6,
                         value=2000.0, step=100.0)
    tpot = params.widget(b.number_input, "SLO: TPOT p99 (ms)", key="so_tpot", min_value=0.1, max_value=1e5,
                         value=50.0, step=5.0)
    latency = params.widget(c.selectbox, "Pareto front against", key="so_lat", options=list(LATENCIES), index=1,
                            format_func=search_figures.LATENCY_NAMES.get)
    a, b, c, d = st.columns(4)
    seqs = params.widget(a.multiselect, "max_num_seqs", key="so_seqs", options=list(SEQS_OPTIONS), default=[64, 256])
    tokens = params.widget(b.multiselect, "max_num_batched_tokens", key="so_tok", options=list(TOKEN_OPTIONS),
                           default=[2048, 8192])
    policies = params.widget(c.multiselect, "Schedulers", key="so_sch", options=list(SCHEDULERS),
                             default=list(SCHEDULERS))
    blocks = params.widget(d.multiselect, "Block sizes", key="so_bs", options=list(BLOCK_OPTIONS), default=[16])
    apc = params.widget(st.segmented_control, "Prefix caching", key="so_apc", options=["off", "on"],
                        selection_mode="multi", default=["off"],
                        help="only matters when requests share a prefix (the workload's shared-prefix setting)")
    space = SearchSpace(tuple(sorted(seqs)), tuple(sorted(tokens)), tuple(p for p in SCHEDULERS if p in policies),
                        tuple(sorted(blocks)), tuple(v == "on" for v in ("off", "on") if v in (apc or [])))
    return space, SLO(ttft, tpot), latency


def search_section(source: sched.WorkloadConfig | UploadedTrace, setup: ServingSetup) -> None:
    """The section: the serving configurations with the most throughput under the SLOs, on the page's workload."""
    st.subheader("Search serving configurations")
    st.markdown("Which engine settings serve this workload with the most throughput while p99 latencies stay under "
                "the SLOs? Every combination below is simulated on the same requests (as Vidur-Search does); the "
                f"best one is then run at higher arrival rates to find its capacity. Bounded here to {MAX_CONFIGS} "
                f"configurations and the first {MAX_REQUESTS} requests; `python -m kvcore search` takes any grid, on "
                "a process pool or a Ray cluster.")
    if not params.widget(st.toggle, "Run the search", key="so_on", value=False):
        return
    with user_errors("Search", stop=False):
        space, slo, latency = _space()
        count = len(space.configs())
        if not count:
            st.info("Pick at least one value of each setting (max_num_batched_tokens must be >= max_num_seqs).")
            return
        if count > MAX_CONFIGS:
            st.warning(f"{count} configurations: the page searches at most {MAX_CONFIGS}. Pick fewer values, or run "
                       "the whole grid with `python -m kvcore search`.")
            return
        deployment = Deployment(setup.model, setup.gpu, setup.cost, setup.num_blocks, setup.rules)
        result = run_search(source, deployment, space, slo, latency)
        _answer(result, {"model": setup.model, "gpu": setup.gpu})


def _answer(result: SearchResult, settings: dict[str, str]) -> None:
    best, probed = result.best, result.probed
    a, b, c = st.columns(3)
    if best is None:
        a.metric("Best configuration", "none meets the SLOs", help="at the workload's arrival rate")
    else:
        a.metric("Best: output tokens/s", f"{float(best['output_tok_per_s']):,.0f}",
                 help=f"TTFT p99 {float(best['ttft_ms_p99']):,.0f} ms, TPOT p99 {float(best['tpot_ms_p99']):.1f} ms")
    if probed is not None:
        text = f"{result.capacity_rps:.3g} requests/s" if math.isfinite(result.capacity_rps) else \
            f"under {result.failing_rps:.3g} requests/s"
        if math.isinf(result.failing_rps):
            text = f"over {result.capacity_rps:.3g} requests/s"
        b.metric("Capacity under the SLOs" if best is not None else "Capacity of the closest configuration", text,
                 help="the highest probed arrival rate below the first that misses an SLO (the same requests "
                      "arriving faster or slower)")
    else:
        b.metric("Capacity under the SLOs", "not searched")
    c.metric("Pareto front", f"{int(result.configs['pareto'].sum())} of {len(result.configs)}")
    st.caption(" ".join(result.lines))
    left, right = st.columns(2)
    with left:
        figures.show(search_figures.frontier_figure(result.configs, result.latency, result.slo), key="search_front")
    if len(result.capacity):
        with right:
            who = "Best configuration" if best is not None else "Closest configuration"
            figures.show(search_figures.capacity_figure(result.capacity, result.slo, result.capacity_rps, who),
                         key="search_capacity")
    tables.show_table(result.configs, "batching", "search", settings,
                      caption="One row per configuration; error: why a configuration cannot serve the workload.")
    if len(result.capacity):
        tables.show_table(result.capacity, "batching", "capacity", settings,
                          caption="The probed configuration at each arrival rate.")
