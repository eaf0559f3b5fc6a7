"""Plotly figure builders: data in, ``go.Figure`` out, one look for the whole lab.

Builders here are generic (lines, bars, heatmaps); a page with its own drawing (block grid,
Gantt timeline) keeps it in a ``ui/<page>_figures.py`` that styles through :func:`style`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

# Okabe-Ito, readable for colour-blind users, in a fixed order so a policy keeps its colour.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#999999", "#882255")
DASHES = ("solid", "dash", "dot", "dashdot")
SEQUENTIAL = "Viridis"
FONT = "Inter, Source Sans Pro, sans-serif"


def style(fig: go.Figure, title: str | None = None, *, x: str | None = None, y: str | None = None,
          height: int = 380, legend: bool = True) -> go.Figure:
    """Apply the lab's look: white background, light grid, title left, legend on top."""
    fig.update_layout(
        template="plotly_white",
        title={"text": title, "x": 0.0, "xanchor": "left"} if title else None,
        font={"family": FONT, "size": 13},
        colorway=PALETTE,
        height=height,
        margin={"l": 60, "r": 20, "t": 60 if title else 30, "b": 50},
        showlegend=legend,
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1.0},
        hovermode="closest",
    )
    if x is not None:
        fig.update_xaxes(title_text=x)
    if y is not None:
        fig.update_yaxes(title_text=y)
    return fig


def line_chart(df: pd.DataFrame, x: str, y: str, color: str | None = None, *, title: str | None = None,
               x_title: str | None = None, y_title: str | None = None, log_x: bool = False,
               log_y: bool = False, markers: bool = True, dash: str | None = None) -> go.Figure:
    """One line per value of ``color`` (or a single line), points in ``df`` order."""
    fig = go.Figure()
    groups = df.groupby(color, sort=False) if color else [(y, df)]
    for i, (name, part) in enumerate(groups):
        # Dash styles cycle too, so lines that coincide (same KV shape, say) stay visible.
        fig.add_trace(go.Scatter(
            x=part[x], y=part[y], name=str(name), mode="lines+markers" if markers else "lines",
            line={"color": PALETTE[i % len(PALETTE)], "dash": dash or DASHES[i % len(DASHES)], "width": 2.5},
        ))
    if log_x:
        fig.update_xaxes(type="log")
    if log_y:
        fig.update_yaxes(type="log")
    return style(fig, title, x=x_title or x, y=y_title or y, legend=color is not None)


def bar_chart(df: pd.DataFrame, x: str, y: str, color: str | None = None, *, title: str | None = None,
              x_title: str | None = None, y_title: str | None = None, barmode: str = "group",
              log_y: bool = False, text: str | None = None) -> go.Figure:
    """Grouped (or stacked with barmode='stack') bars, one trace per value of ``color``."""
    fig = go.Figure()
    groups = df.groupby(color, sort=False) if color else [(y, df)]
    for i, (name, part) in enumerate(groups):
        fig.add_trace(go.Bar(x=part[x], y=part[y], name=str(name), marker_color=PALETTE[i % len(PALETTE)],
                             text=part[text] if text else None))
    fig.update_layout(barmode=barmode)
    if log_y:
        fig.update_yaxes(type="log")
    return style(fig, title, x=x_title or x, y=y_title or y, legend=color is not None)


def heatmap(z: Sequence[Sequence[float]], *, x: Sequence | None = None, y: Sequence | None = None,
            title: str | None = None, x_title: str | None = None, y_title: str | None = None,
            colorscale: str = SEQUENTIAL, zmin: float | None = None, zmax: float | None = None,
            colorbar: str | None = None, height: int = 380) -> go.Figure:
    """A matrix as a heatmap, row 0 at the top (the way attention maps are read)."""
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorscale=colorscale, zmin=zmin, zmax=zmax,
                               colorbar={"title": {"text": colorbar}} if colorbar else None))
    fig.update_yaxes(autorange="reversed")
    return style(fig, title, x=x_title, y=y_title, height=height, legend=False)


def show(fig: go.Figure, key: str | None = None) -> None:
    """Draw a figure at full width with the lab's toolbar settings."""
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False}, theme=None)
