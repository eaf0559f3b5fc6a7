"""Figures of the Quantization page: the chosen method's metrics, K/V magnitude maps, errors by layer, and the
bytes-vs-perplexity Pareto chart of every method. Styled through :func:`ui.figures.style`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ui.figures import PALETTE, heatmap, line_chart, style

ERRORS = {"k_rel_err": "keys", "v_rel_err": "values", "attn_rel_err": "attention output"}


def method_metrics(row: pd.Series) -> None:
    """Bytes, K/V/attention errors and perplexity of one method (a row of the summary table)."""
    c1, c2, c3, c4, c5 = st.columns(5)
    c1.metric("KV bytes vs fp16", f"{row.bytes_ratio:.3f}x")
    c2.metric("Key error (rel. L2)", f"{row.k_rel_err:.3f}")
    c3.metric("Value error (rel. L2)", f"{row.v_rel_err:.3f}")
    c4.metric("Attention error (rel. L2)", f"{row.attn_rel_err:.3f}")
    c5.metric("Perplexity", f"{row.perplexity:.2f}", f"{row.ppl_vs_fp16 - 1:+.2%} vs fp16", delta_color="inverse")


def magnitude_map(z: np.ndarray, title: str, heads: int | None = None, colorbar: str = "|x|") -> go.Figure:
    """A token x channel map (row 0 = first token at the top), with head boundaries marked when all heads show."""
    fig = heatmap(z, title=title, x_title="channel" + (" (head-major)" if heads else ""), y_title="token",
                  colorbar=colorbar, height=360)
    if heads:
        width = z.shape[1] // heads
        for h in range(1, heads):
            fig.add_vline(x=h * width - 0.5, line={"color": "white", "width": 1})
    return fig


def layer_errors(by_layer: pd.DataFrame, method: str) -> go.Figure:
    """Relative L2 error of keys, values and attention outputs per layer, for one method."""
    part = by_layer[by_layer["method"] == method].melt(id_vars="layer", value_vars=list(ERRORS), var_name="what",
                                                       value_name="relative error")
    part["what"] = part["what"].map(ERRORS)
    return line_chart(part, "layer", "relative error", "what", title=f"{method}: relative L2 error by layer",
                      x_title="layer", y_title="||x̂ - x|| / ||x||")


def pareto(summary: pd.DataFrame, highlight: str | None = None, ceiling: float = 1.3) -> go.Figure:
    """Bytes vs perplexity, one marker per method coloured by family; the Pareto front joined by a line.

    Names are written next to Pareto-front points, fp16 and the highlighted method (hover shows every name).
    Points more than ``ceiling`` x the lowest perplexity are drawn as triangles on the top edge, labelled
    with their value, so the methods that matter keep the vertical resolution.
    """
    top = float(summary["perplexity"].min()) * ceiling
    fig = go.Figure()
    for i, (family, part) in enumerate(summary.groupby("family", sort=False)):
        above = part["perplexity"] > top
        label = [(f"{m} ({p:.0f})" if a else m) if (a or f or m in (highlight, "fp16")) else ""
                 for m, p, a, f in zip(part["method"], part["perplexity"], above, part["pareto"], strict=True)]
        fig.add_trace(go.Scatter(
            x=part["bytes_ratio"], y=part["perplexity"].clip(upper=top), mode="markers+text", name=str(family),
            text=label, textposition="top center", textfont={"size": 11}, customdata=part[["method", "perplexity"]],
            marker={"size": 11, "color": PALETTE[i % len(PALETTE)],
                    "symbol": ["triangle-up" if a else "circle" for a in above]},
            hovertemplate="%{customdata[0]}<br>bytes %{x:.3f} x fp16<br>perplexity %{customdata[1]:.3f}<extra></extra>",
        ))
    front = summary[summary["pareto"]].sort_values("bytes_ratio")
    fig.add_trace(go.Scatter(x=front["bytes_ratio"], y=front["perplexity"], mode="lines", name="Pareto front",
                             line={"color": "#000000", "dash": "dot", "width": 1}, hoverinfo="skip"))
    chosen = summary[summary["method"] == highlight]
    if len(chosen):
        fig.add_trace(go.Scatter(x=chosen["bytes_ratio"], y=chosen["perplexity"].clip(upper=top), mode="markers",
                                 name=highlight, hoverinfo="skip", marker={"size": 22, "symbol": "circle-open",
                                                                           "line": {"width": 3}, "color": "#D55E00"}))
    fig.update_xaxes(range=[0, 1.08])
    style(fig, "Memory vs perplexity (lower left is better)", x="KV bytes / fp16 bytes",
          y="perplexity (decoded through the cache)", height=500)
    return fig.update_layout(margin={"r": 150}, legend={"orientation": "v", "x": 1.02, "xanchor": "left",
                                                        "y": 1.0, "yanchor": "top"})
