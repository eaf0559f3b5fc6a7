"""Figures of the Live model page: the run's metrics, the attention heatmap with sinks and heavy hitters marked."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from kvcore.models.generate import timing_summary
from kvcore.models.live import LiveRun
from ui.figures import PALETTE, SEQUENTIAL, style
from ui.format import bytes_str

SINK_COLOR, HEAVY_COLOR = PALETTE[3], PALETTE[1]


def token_labels(tokens: Sequence[str]) -> list[str]:
    """``"12 ·name"``: position + token, unique even when tokens repeat (the axes need distinct labels)."""
    return [f"{i} {t.replace('Ġ', '·').replace('Ċ', '↵')}" for i, t in enumerate(tokens)]


def attention_heatmap(attn: np.ndarray, tokens: Sequence[str], patterns: pd.DataFrame, title: str,
                      log_color: bool = True, prompt_len: int | None = None) -> go.Figure:
    """A ``[T, T]`` attention map (row = query, column = key) with sink and heavy-hitter columns marked.

    patterns: :func:`kvcore.models.attention.detect_patterns` rows (``sink``, ``heavy_hitter`` flags).
    log_color: colour by log10 of the probability (masked future entries stay blank).
    prompt_len: draw a line where generation starts.
    """
    labels = token_labels(tokens)
    z = np.where(attn > 0, np.log10(np.clip(attn, 1e-6, None)), np.nan) if log_color else attn
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, colorscale=SEQUENTIAL, zmin=-4 if log_color else 0, zmax=0 if log_color else None,
        colorbar={"title": {"text": "log10 p" if log_color else "p"}},
        hovertemplate="query %{y}<br>key %{x}<br>value %{z:.3f}<extra></extra>"))
    for flag, color, name in (("heavy_hitter", HEAVY_COLOR, "heavy hitter"), ("sink", SINK_COLOR, "sink")):
        cols = patterns.loc[patterns[flag], "position"].tolist()
        fig.add_trace(go.Scatter(x=[labels[c] for c in cols], y=[labels[-1]] * len(cols), mode="markers",
                                 name=name, marker={"symbol": "triangle-up", "size": 11, "color": color},
                                 hovertemplate=f"{name}: key %{{x}}<extra></extra>"))
    if prompt_len is not None and 0 < prompt_len < len(labels):
        fig.add_hline(y=prompt_len - 0.5, line={"color": "white", "dash": "dot", "width": 1})
    fig.update_yaxes(autorange="reversed", showticklabels=len(labels) <= 80)
    fig.update_xaxes(showticklabels=len(labels) <= 80, tickangle=-60)
    return style(fig, title, x="key (attended to)", y="query (attending)", height=620)


def pattern_bars(patterns: pd.DataFrame, tokens: Sequence[str], title: str) -> go.Figure:
    """Attention each key receives (mean vs uniform share), sinks and heavy hitters coloured."""
    labels = token_labels(tokens)
    colors = [SINK_COLOR if s else HEAVY_COLOR if h else PALETTE[0]
              for s, h in zip(patterns["sink"], patterns["heavy_hitter"], strict=True)]
    fig = go.Figure(go.Bar(x=labels, y=patterns["received_vs_uniform"], marker_color=colors,
                           hovertemplate="key %{x}<br>%{y:.1f} x uniform<extra></extra>"))
    fig.update_xaxes(showticklabels=len(labels) <= 80, tickangle=-60)
    fig.update_yaxes(type="log")
    return style(fig, title, x="key", y="attention received / uniform share", legend=False, height=320)


def generation_metrics(run: LiveRun) -> None:
    """Prefill time, decode time per token, the cache now and the mean log-prob of one generation."""
    timing, last = timing_summary(run.table), run.table.iloc[-1]
    metrics = {
        "Prefill": (f"{timing['prefill_ms']:.1f} ms", f"{run.prompt_len} prompt tokens in one pass"),
        "Decode, per token": (f"{timing['decode_ms_mean']:.1f} ms", "mean of one-token steps"),
        "KV cache now": (bytes_str(int(last.kv_bytes)), f"{int(last.kv_tokens)} entries per layer"),
        "Mean log-prob": (f"{run.table['logprob'].mean():.2f}", "nats, generated tokens"),
    }
    for col, (label, (value, why)) in zip(st.columns(len(metrics)), metrics.items(), strict=True):
        col.metric(label, value, help=why)
