"""Plotly figure builders: data in, ``go.Figure`` out, one look for the whole lab.

Builders here are generic (lines, bars, heatmaps); a page with its own drawing (block grid,
Gantt timeline) keeps it in a ``ui/<page>_figures.py`` that styles through :func:`style`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.express as px
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


def _categorical(df: pd.DataFrame, color: str | None) -> pd.DataFrame:
    """``color`` as text, so Plotly Express draws one trace per value (numbers would get a colour scale)."""
    return df if color is None else df.assign(**{color: df[color].astype(str)})


def line_chart(df: pd.DataFrame, x: str, y: str, color: str | None = None, *, title: str | None = None,
               x_title: str | None = None, y_title: str | None = None, log_x: bool = False,
               log_y: bool = False, markers: bool = True, dash: str | None = None) -> go.Figure:
    """One line per value of ``color`` (or a single line), points in ``df`` order.

    Dash styles cycle with the colours, so lines that coincide (same KV shape, say) stay visible; ``dash``
    gives every line one style instead.
    """
    fig = px.line(_categorical(df, color), x=x, y=y, color=color, line_dash=None if dash else color,
                  markers=markers, log_x=log_x, log_y=log_y, color_discrete_sequence=PALETTE,
                  line_dash_sequence=DASHES)
    fig.update_traces(line_width=2.5, **({"line_dash": dash} if dash else {}))
    return style(fig, title, x=x_title or x, y=y_title or y, legend=color is not None)


def bar_chart(df: pd.DataFrame, x: str, y: str, color: str | None = None, *, title: str | None = None,
              x_title: str | None = None, y_title: str | None = None, barmode: str = "group",
              log_y: bool = False, text: str | None = None) -> go.Figure:
    """Grouped (or stacked with barmode='stack') bars, one trace per value of ``color``."""
    fig = px.bar(_categorical(df, color), x=x, y=y, color=color, barmode=barmode, log_y=log_y, text=text,
                 color_discrete_sequence=PALETTE)
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
