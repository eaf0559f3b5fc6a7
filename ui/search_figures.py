"""Figures of the serving-config search (a section of the Continuous batching page): throughput against p99
latency for every configuration with the Pareto front and the SLO, and the best configuration's p99 latencies
as the arrival rate grows, up to its capacity. Styled through :func:`ui.figures.style`."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvcore.study.search import SLO, describe_config
from ui.figures import PALETTE, style, vline

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
    title = f"{who} as the arrival rate changes" + (f": capacity {capacity_rps:.3g} requests/s"
                                                     if math.isfinite(capacity_rps) else "")
    return style(fig, title)
