"""Figures and settings widgets of the Eviction page: visibility maps, perplexity vs budget, the token strip.

Data in (the DataFrames and maps of ``kvcore.eviction.evaluate.EvictionResults``), ``go.Figure`` out,
styled through :func:`ui.figures.style`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from ui import figures, params

MAX_CELLS = 192  # a visibility map is block-averaged down to at most this many rows and columns


def _room_for_legend(fig: go.Figure) -> go.Figure:
    """Half-width charts: lift the title above the legend so the two never overlap."""
    fig.update_layout(margin={"t": 110}, title={"y": 0.97, "yanchor": "top"})
    return fig


def hyperparameter_widgets(policy: str, cls: type, container: Any = st) -> dict[str, Any]:
    """One URL-bound widget per dataclass field of a policy (keys ``<policy>_<field>``); returns the values.

    Uses each field's default and its metadata (``min``, ``max``, ``step``, ``options``, ``help``).
    """
    values = {}
    for f in dataclasses.fields(cls):
        meta, key, label = f.metadata, f"{policy}_{f.name}", f"{policy}: {f.name}"
        if isinstance(f.default, bool):
            values[f.name] = params.widget(container.toggle, label, key=key, value=f.default, help=meta.get("help"))
        elif "options" in meta:
            values[f.name] = params.widget(container.selectbox, label, key=key, options=list(meta["options"]),
                                           index=list(meta["options"]).index(f.default), help=meta.get("help"))
        else:
            kind = type(f.default)
            values[f.name] = params.widget(
                container.number_input, label, key=key, value=f.default, min_value=kind(meta.get("min", 0)),
                max_value=kind(meta.get("max", 10**9)), step=kind(meta.get("step", 1)), help=meta.get("help"))
    return values


def _block_mean(a: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Average a square map into at most ``cells`` x ``cells`` blocks; returns (map, first index of each block)."""
    step = max(1, math.ceil(a.shape[0] / cells))
    n = math.ceil(a.shape[0] / step) * step
    padded = np.full((n, n), np.nan, dtype=np.float32)
    padded[:a.shape[0], :a.shape[1]] = a
    cells4 = padded.reshape(n // step, step, n // step, step)
    counts = np.isfinite(cells4).sum(axis=(1, 3))
    sums = np.nansum(cells4, axis=(1, 3))
    blocks = np.divide(sums, counts, out=np.full(sums.shape, np.nan, dtype=np.float32), where=counts > 0)
    return blocks, np.arange(0, n, step)


def visibility_maps(maps: Mapping[str, np.ndarray], title: str) -> go.Figure:
    """Side-by-side maps, one per policy: row = step (query position), column = token, colour = share of
    (layer, KV head) pairs that could read the token (1 = kept everywhere, 0 = evicted everywhere)."""
    fig = make_subplots(rows=1, cols=len(maps), subplot_titles=list(maps), shared_yaxes=True,
                        horizontal_spacing=0.02)
    for i, raw in enumerate(maps.values(), start=1):
        steps = raw.shape[0]
        shares = raw.astype(np.float32) / 255.0
        shares[np.triu_indices(steps, k=1)] = np.nan  # future tokens: not in the cache yet
        z, ticks = _block_mean(shares, MAX_CELLS)
        fig.add_trace(go.Heatmap(z=z, x=ticks, y=ticks, zmin=0, zmax=1, colorscale=figures.SEQUENTIAL,
                                 showscale=i == len(maps), colorbar={"title": {"text": "kept"}},
                                 hovertemplate="step %{y}<br>token %{x}<br>kept in %{z:.0%} of heads<extra></extra>"),
                      row=1, col=i)
        fig.update_xaxes(title_text="token", row=1, col=i)
    fig.update_yaxes(autorange="reversed", title_text="step (query position)", row=1, col=1)
    return figures.style(fig, title, height=420, legend=False)


def perplexity_vs_budget(table: pd.DataFrame) -> go.Figure:
    """Perplexity per policy vs budget (tokens), the full cache as a dashed line."""
    evicting = table[table["policy"] != "full"]
    fig = figures.line_chart(evicting, "budget_tokens", "ppl", "policy", title="Perplexity vs budget",
                             x_title="budget (tokens kept)", y_title="perplexity")
    full = table.loc[table["policy"] == "full", "ppl"]
    if len(full):
        fig.add_hline(y=float(full.iloc[0]), line_dash="dash", line_color="#666666",
                      annotation_text="full cache", annotation_position="top left")
    return _room_for_legend(fig)


def per_layer(layers: pd.DataFrame, value: str, title: str, y_title: str) -> go.Figure:
    """One line per policy over layers (one budget's rows)."""
    fig = figures.line_chart(layers, "layer", value, "policy", title=title, x_title="layer", y_title=y_title)
    fig.update_xaxes(dtick=1)
    return _room_for_legend(fig)


def token_strip(tokens: pd.DataFrame) -> go.Figure:
    """Attention each token received from every later query in the full cache, sinks and heavy hitters coloured."""
    kind = np.where(tokens["sink"], "attention sink", np.where(tokens["heavy_hitter"], "heavy hitter", "other"))
    colors = {"attention sink": figures.PALETTE[3], "heavy hitter": figures.PALETTE[1], "other": "#BBBBBB"}
    text = tokens["token"] if "token" in tokens else tokens["token_id"].astype(str)
    fig = go.Figure()
    for name, color in colors.items():
        part = kind == name
        fig.add_trace(go.Bar(x=tokens["position"][part], y=tokens["accumulated"][part], name=name,
                             marker_color=color, customdata=np.asarray(text)[part],
                             hovertemplate="position %{x}: %{customdata}<br>received %{y:.2f}<extra></extra>"))
    fig.update_yaxes(type="log")
    fig.update_layout(bargap=0.05)
    return figures.style(fig, "Token strip: attention received in the full cache", x="token position",
                         y="summed attention (log)", height=300)
