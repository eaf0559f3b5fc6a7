"""Figures and text of the Memory hierarchy page: chunk map, TTFT ECDFs, offload metrics, bandwidth bars and
caption, PD, roofline and the FlashAttention note."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvcore.hierarchy.experiment import OffloadRuns
from ui.figures import PALETTE, bar_chart, style, vline
from ui.tables import shown_text

TIER_COLORS = ("#0072B2", "#009E73", "#E69F00", "#CC79A7", "#999999")
MAX_MAP_CHUNKS = 400
BANDWIDTH_CAPTION = ("Measured here, best of 3, cached for 10 minutes. The read right after a write comes from the OS "
                     "page cache (RAM), not the disk; the cold read bypasses it with O_DIRECT where the file system "
                     "allows (see 'method').")


PD_TITLES = {"ttft_s": "Time to first token", "max_itl_s": "Longest gap between two tokens of a request"}
PD_CAPTION = ("TTFT ends at the prefill step (DistServe); KV transfer and the decode queue delay the 2nd token (TPOT). "
              "Colocated, a prefill stalls every decode on its GPU: hence the longer gaps.")


def fmt(default: float) -> str | None:
    """A number box's format: floats as short as they are (1000, 12.5, 0.1; Streamlit's default "%0.2f" writes
    "1000.00", wider than a narrow box), integers as Streamlit writes them."""
    return "%g" if isinstance(default, float) else None


def sources_bars(sources: pd.DataFrame) -> go.Figure:
    """Share of prompt tokens by where they came from (a tier, or computed), in percent."""
    fig = bar_chart(sources, "source", "share", title="Prompt tokens by where they came from",
                    y_title="share of prompt tokens")
    return fig.update_yaxes(tickformat=".0%")


def chunk_map(residency: pd.DataFrame, tiers: Sequence[str], title: str | None = None) -> go.Figure:
    """Chunk id (rows) x snapshot (columns), coloured by the fastest tier holding the chunk; blank = gone.

    At most ``MAX_MAP_CHUNKS`` rows are drawn, evenly spaced over the chunk ids.
    """
    rank = {name: i for i, name in enumerate(tiers)}
    best = (residency.assign(rank=residency["tier"].map(rank))
            .groupby(["chunk", "request"], sort=True)["rank"].min().unstack("request"))
    if len(best) > MAX_MAP_CHUNKS:
        best = best.iloc[np.linspace(0, len(best) - 1, MAX_MAP_CHUNKS).astype(int)]
    n = len(tiers)
    scale = []
    for i, color in enumerate(TIER_COLORS[:n]):
        scale += [[i / n, color], [(i + 1) / n, color]]
    text = np.vectorize(lambda v: "" if np.isnan(v) else tiers[int(v)], otypes=[str])(best.to_numpy(dtype=float))
    fig = go.Figure(go.Heatmap(
        z=best.to_numpy(dtype=float), x=[f"r{c}" for c in best.columns], y=best.index, text=text,
        colorscale=scale, zmin=-0.5, zmax=n - 0.5, hovertemplate="chunk %{y}<br>after %{x}<br>%{text}<extra></extra>",
        colorbar={"tickvals": list(range(n)), "ticktext": list(tiers), "title": {"text": "fastest tier"}}))
    fig.update_yaxes(autorange="reversed")
    return style(fig, title, x="after request", y="chunk id (order of first write)", height=460, legend=False)


def ecdf(df: pd.DataFrame, value: str, group: str, *, title: str | None = None, x_title: str | None = None,
         log_x: bool = True) -> go.Figure:
    """One empirical CDF line per group: share of rows with ``value`` at most x."""
    fig = go.Figure()
    for i, (name, part) in enumerate(df.groupby(group, sort=False)):
        xs = np.sort(part[value].to_numpy())
        fig.add_trace(go.Scatter(x=xs, y=np.arange(1, len(xs) + 1) / len(xs), name=str(name), mode="lines",
                                 line={"color": PALETTE[i % len(PALETTE)], "shape": "hv"}))
    if log_x:
        fig.update_xaxes(type="log")
    return style(fig, title, x=x_title or value, y="share of requests")


def bandwidth_bars(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Measured vs nominal GB/s per transfer path (log scale); a path shows only the bars it has a number for."""
    measured, nominal = df[df["measured_GBps"].notna()], df[df["nominal_GBps"].notna()]
    fig = go.Figure([
        go.Bar(x=measured["path"], y=measured["measured_GBps"], name="measured here", marker_color=PALETTE[0],
               text=[f"{v:.2f}" for v in measured["measured_GBps"]], textposition="outside"),
        go.Bar(x=nominal["path"], y=nominal["nominal_GBps"], name="preset (datasheet)", marker_color=PALETTE[8],
               customdata=nominal["nominal_from"], hovertemplate="%{y:.1f} GB/s (%{customdata})<extra></extra>"),
    ])
    fig.update_layout(barmode="group")
    fig.update_xaxes(categoryorder="array", categoryarray=list(df["path"]))
    fig.update_yaxes(type="log")
    return style(fig, title, y="GB/s")


def offload_metrics(runs: OffloadRuns) -> dict[str, str]:
    """The offload tab's headline numbers, label -> formatted value: TTFT with and without tiers (as the TTFT
    table shows them), hits, drops."""
    full, ttft = runs.full, runs.ttft_summary()
    return {"TTFT p50, recompute all": f"{shown_text(ttft.p50_ms, ttft.p50_ms[0])} ms",
            "TTFT p50, GPU + lower tiers": f"{shown_text(ttft.p50_ms, ttft.p50_ms[2])} ms",
            "Prompt tokens served from a tier": f"{full.tiers.hit_rate_tokens.sum():.0%}",
            "Chunks dropped": f"{full.drops:,}"}


def attention_note(attention: pd.DataFrame, ridge: float) -> str:
    """One paragraph reading the first two rows of ``kvcore.hierarchy.attention_io`` (standard vs FlashAttention)."""
    std, flash = attention.iloc[0], attention.iloc[1]
    t = int(std.context)
    return (f"**FlashAttention at {t:,} tokens.** Standard attention writes the {t:,} x {t:,} scores S = QK^T and "
            f"probabilities P of each head to HBM, then reads them ({std.score_bytes / 1e9:,.1f} GB, vs "
            f"{flash.bytes / 1e9:,.2f} GB for Q, K, V and O). Tiled in SRAM, S and P never reach HBM: attention goes "
            f"from {std.intensity:,.0f} to {flash.intensity:,.0f} FLOP/B ({std.bound}- to {flash.bound}-bound; "
            f"ridge {ridge:,.0f}).")


def roofline(points: pd.DataFrame, roof: pd.DataFrame, ridge: float, title: str | None = None) -> go.Figure:
    """Log-log roofline: the roof, the ridge point and one marker per prefill / decode point."""
    fig = go.Figure(go.Scatter(x=roof["intensity"], y=roof["attainable_tflops"], name="roof", mode="lines",
                               line={"color": PALETTE[7]}))
    for i, (phase, part) in enumerate(points.groupby("phase", sort=False)):
        fig.add_trace(go.Scatter(
            x=part["intensity"], y=part["attainable_tflops"], name=phase, mode="markers",
            marker={"size": 10, "color": PALETTE[i + 1], "symbol": "diamond" if phase == "prefill" else "circle"},
            text=part["label"], hovertemplate="%{text}<br>%{x:.1f} FLOP/byte<br>%{y:.0f} TFLOP/s<extra></extra>"))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    vline(fig, ridge, f" ridge {ridge:,.0f} FLOP/B", color=PALETTE[3])
    return style(fig, title, x="arithmetic intensity (FLOPs / HBM byte)", y="attainable TFLOP/s", height=440)


def decode_bytes_bars(decode_bytes: pd.DataFrame, batch: int) -> go.Figure:
    """Bytes of one decode step per context length (one bar each, stacked by part: weights, KV read, KV written)."""
    shown = decode_bytes.assign(context=[f"{c:,}" for c in decode_bytes["context"]])
    return bar_chart(shown, "context", "GB", "part", barmode="stack", title=f"Bytes of one decode step, batch {batch}",
                     x_title="context (tokens)", y_title="GB read and written")
