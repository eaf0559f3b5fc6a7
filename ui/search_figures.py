"""The serving-config search, a section of the Continuous batching page: its widgets, its answer (metrics, the
binding SLO, tables) and its figures: throughput against p99 latency for every configuration with the Pareto front
and the SLO, and the probed configuration's p99 latencies as the arrival rate grows, up to its capacity. Figures
are styled through :func:`ui.figures.style`; the cached run is :func:`ui.search_runs.run_search`."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from kvcore.study.search import LATENCIES, SCHEDULERS, SLO, SearchResult, SearchSpace, binding_slo, describe_config
from ui import figures, params, tables
from ui.figures import PALETTE, style, vline
from ui.search_runs import MAX_CONFIGS, MAX_REQUESTS, SearchRequest

SEQS_OPTIONS = (16, 32, 64, 128, 256, 512)
TOKEN_OPTIONS = (512, 1024, 2048, 4096, 8192, 16384)
BLOCK_OPTIONS = (8, 16, 32)
# The page's default workload (32 requests/s of 1,024 + 512 tokens on llama-2-7b) is past what an H100 serves:
# every configuration's TTFT p99 is 18-24 s. At a quarter of its rate three of the eight default configurations
# meet the default SLOs (TTFT p99 161 ms at best), so the default search has an answer.
RATE_SCALES = (0.125, 0.25, 0.5, 1.0, 2.0)
DEFAULT_RATE_SCALE = 0.25
INTRO = ("Which engine settings serve this workload with the most throughput while p99 latencies stay under the "
         "SLOs? Every combination below is simulated on the same requests (as Vidur-Search does); the best one is "
         "then run at higher arrival rates to find its capacity. Bounded here to {configs} configurations and the "
         "first {requests} requests; `python -m kvcore search` takes any grid, on a process pool or a Ray cluster.")


def intro() -> str:
    """What the section does and how it is bounded."""
    return INTRO.format(configs=MAX_CONFIGS, requests=MAX_REQUESTS)


def search_settings() -> SearchRequest | None:
    """The section's URL-bound widgets: SLOs, the latency of the Pareto front, the values crossed, the arrival rate
    searched. None, with a note saying what to change, when the grid is empty or larger than ``MAX_CONFIGS``."""
    a, b, c, d = st.columns(4)
    ttft = params.widget(a.number_input, "SLO: TTFT p99 (ms)", key="so_ttft", min_value=1.0, max_value=1e6,
                         value=2000.0, step=100.0)
    tpot = params.widget(b.number_input, "SLO: TPOT p99 (ms)", key="so_tpot", min_value=0.1, max_value=1e5,
                         value=50.0, step=5.0)
    latency = params.widget(c.selectbox, "Pareto front against", key="so_lat", options=list(LATENCIES), index=1,
                            format_func=LATENCY_NAMES.get)
    scale = params.widget(d.select_slider, "Arrival rate, x the workload's", key="so_rate", options=list(RATE_SCALES),
                          value=DEFAULT_RATE_SCALE, help="the same requests arriving that many times as fast")
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
    if not (seqs and tokens and policies and blocks and apc):
        st.info("Pick at least one value of each setting.")
        return None
    space = SearchSpace(tuple(sorted(seqs)), tuple(sorted(tokens)), tuple(p for p in SCHEDULERS if p in policies),
                        tuple(sorted(blocks)), tuple(v == "on" for v in ("off", "on") if v in apc))
    count = len(space.configs())
    if not count:
        st.info("No combination is valid: max_num_batched_tokens must be >= max_num_seqs.")
        return None
    if count > MAX_CONFIGS:
        st.warning(f"{count} configurations: the page searches at most {MAX_CONFIGS}. Pick fewer values, or run "
                   "the whole grid with `python -m kvcore search`.")
        return None
    return SearchRequest(space, SLO(ttft, tpot), latency, scale)


def answer(result: SearchResult, settings: dict[str, object]) -> None:
    """The search's answer: how many configurations meet the SLOs, the best one's throughput, the capacity of the
    probed one; which SLO binds when none meets them; the figures and the tables."""
    best, probed = result.best, result.probed
    a, b, c = st.columns(3)
    meeting = int(result.configs["meets_slo"].sum())
    a.metric("Configurations meeting the SLOs", f"{meeting} of {len(result.configs)}",
             help=f"at {result.rate:.3g} requests/s")
    b.metric("Best: output tokens/s", "none" if best is None else f"{float(best['output_tok_per_s']):,.0f}",
             help=None if best is None else f"TTFT p99 {float(best['ttft_ms_p99']):,.0f} ms, TPOT p99 "
                                            f"{float(best['tpot_ms_p99']):.1f} ms")
    c.metric(("Capacity" if best is not None else "Closest one's capacity") + " (requests/s)",
             capacity_text(result) if probed is not None else "not searched",
             help="the highest probed arrival rate below the first that misses an SLO (the same requests arriving "
                  "faster or slower)")
    if best is None:
        st.warning(f"No configuration meets the SLOs at {result.rate:.3g} requests/s. "
                   f"{binding_slo(result.configs, result.slo)}")
    st.caption(" ".join(result.lines))
    left, right = st.columns(2)
    with left:
        figures.show(frontier_figure(result.configs, result.latency, result.slo), key="search_front")
    if len(result.capacity):
        with right:
            who = "Best configuration" if best is not None else "Closest configuration"
            figures.show(capacity_figure(result.capacity, result.slo, result.capacity_rps, who),
                         key="search_capacity")
    tables.show_table(result.configs, "batching", "search", settings,
                      caption="One row per configuration; error: why a configuration cannot serve the workload.")
    if len(result.capacity):
        tables.show_table(result.capacity, "batching", "capacity", settings,
                          caption="The probed configuration at each arrival rate.")


def capacity_text(result: SearchResult) -> str:
    """The probed configuration's capacity in requests/s: "8", "over 16" (no probe missed), "under 2" (all did)."""
    if math.isinf(result.failing_rps):
        return f"over {result.capacity_rps:.3g}"
    if math.isfinite(result.capacity_rps):
        return f"{result.capacity_rps:.3g}"
    return f"under {result.failing_rps:.3g}"


LATENCY_NAMES = {"ttft_ms_p99": "TTFT p99 (ms)", "tpot_ms_p99": "TPOT p99 (ms)", "e2e_ms_p99": "end-to-end p99 (ms)"}
MEETS, MISSES, BEST = PALETTE[0], PALETTE[8], PALETTE[3]


def slo_limit(slo: SLO, latency: str) -> float | None:
    """The SLO on ``latency``, when there is one (end-to-end latency has none)."""
    return {"ttft_ms_p99": slo.ttft_p99_ms, "tpot_ms_p99": slo.tpot_p99_ms}.get(latency)


def frontier_figure(configs: pd.DataFrame, latency: str, slo: SLO) -> go.Figure:
    """Every configuration that ran: output tokens/s against p99 ``latency``; meeting the SLOs or not, the Pareto
    front as a line, the best configuration ringed."""
    ran = configs[configs["error"].isna()]
    fig = go.Figure()
    for meets, color, name in ((True, MEETS, "meets the SLOs"), (False, MISSES, "misses them")):
        part = ran[ran["meets_slo"] == meets]
        fig.add_trace(go.Scatter(
            x=part[latency], y=part["output_tok_per_s"], mode="markers", name=name,
            marker={"color": color, "size": 10, "line": {"width": 1, "color": "white"}},
            text=[describe_config(r) for r in part.to_dict("records")],
            hovertemplate="%{text}<br>%{y:,.0f} tokens/s, %{x:,.1f} ms<extra></extra>"))
    front = ran[ran["pareto"]].sort_values(latency)
    fig.add_trace(go.Scatter(x=front[latency], y=front["output_tok_per_s"], mode="lines", name="Pareto front",
                             line={"color": PALETTE[1], "width": 2, "shape": "hv"}, hoverinfo="skip"))
    best = ran[ran["best"]]
    if len(best):
        fig.add_trace(go.Scatter(x=best[latency], y=best["output_tok_per_s"], mode="markers", name="best",
                                 marker={"color": "rgba(0,0,0,0)", "size": 20, "line": {"width": 3, "color": BEST}},
                                 hoverinfo="skip"))
    log = len(ran) > 1 and ran[latency].max() > 20 * max(ran[latency].min(), 1e-9)
    fig.update_xaxes(type="log" if log else "linear")
    limit = slo_limit(slo, latency)
    if limit is not None:
        vline(fig, limit, "SLO")
    return style(fig, f"Throughput vs {LATENCY_NAMES[latency]}: {len(ran)} configurations",
                 x=LATENCY_NAMES[latency], y="output tokens/s")


def capacity_figure(capacity: pd.DataFrame, slo: SLO, capacity_rps: float, who: str = "Best configuration"
                    ) -> go.Figure:
    """The probed configuration's (``who``) TTFT and TPOT p99 at each arrival rate, the SLOs and the capacity."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("TTFT p99 (ms)", "TPOT p99 (ms)"), horizontal_spacing=0.1)
    rates = [float(capacity["rate_rps"].min()), float(capacity["rate_rps"].max())]
    for col, (column, limit) in enumerate((("ttft_ms_p99", slo.ttft_p99_ms), ("tpot_ms_p99", slo.tpot_p99_ms)),
                                          start=1):
        colors = [MEETS if m else BEST for m in capacity["meets_slo"]]
        fig.add_trace(go.Scatter(x=capacity["rate_rps"], y=capacity[column], mode="lines+markers", name="p99",
                                 showlegend=False, line={"color": PALETTE[8], "width": 1},
                                 marker={"color": colors, "size": 9},
                                 hovertemplate="%{x:.3g} requests/s: %{y:,.1f} ms<extra></extra>"), row=1, col=col)
        fig.add_trace(go.Scatter(x=rates, y=[limit, limit], mode="lines", name="SLO", showlegend=col == 1,
                                 line={"color": "#999999", "dash": "dot"}, hoverinfo="skip"), row=1, col=col)
        if math.isfinite(capacity_rps):
            fig.add_trace(go.Scatter(x=[capacity_rps, capacity_rps], y=[capacity[column].min(), limit],
                                     mode="lines", name="capacity", showlegend=col == 1,
                                     line={"color": MEETS, "dash": "dash"}, hoverinfo="skip"), row=1, col=col)
        fig.update_xaxes(title_text="arrival rate (requests/s)", type="log", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    # two short lines: the chart is half the page wide (about 55 characters of title)
    title = f"{who}: p99 latency vs arrival rate" + (f"<br>capacity {capacity_rps:.3g} requests/s"
                                                     if math.isfinite(capacity_rps) else "")
    return style(fig, title)
