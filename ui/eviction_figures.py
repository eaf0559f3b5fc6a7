"""Figures of the Eviction page: claim boxes, visibility maps, perplexity vs budget, the token strip.

Data in (the DataFrames and maps of ``kvcore.eviction.evaluate.EvictionResults``), ``go.Figure`` out,
styled through :func:`ui.figures.style`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from kvcore.eviction.evaluate import EvictionResults
from ui import figures

VERDICT_BOX = {"holds": st.success, "partly holds": st.warning, "does not hold": st.warning, "partly fails": st.warning,
               "mixed": st.warning, "within noise": st.info, "this model cannot show it": st.info,
               "not measured": st.info}
VISIBILITY_TITLE = {"decode": "after each step's eviction", "prefill": "the prompt compressed once, the continuation "
                                                                      "read against it"}
TABLE_CAPTION = (
    "One row per policy and budget. ppl_low/ppl_high: 95% block bootstrap (blocks of 16 scored tokens); "
    "ppl_vs_full: perplexity over the full cache's on the same tokens, paired, with its interval; vs_full says worse "
    "or better only beyond the noise. decode_ms: median of real one-token decode steps (decode_steps of them after "
    "a warm-up step), timed alike for every run: a policy's once its cache reached the budget, the full cache's (and "
    "an attention-only window's) at the end of the text, holding every token; decode_ms_q1/q3 their interquartile "
    "range, tokens_per_s 1000 / median, load_1min the machine's load "
    "when they ran (re-timed after 15 minutes; the other columns are kept as measured); prefill mode "
    "has no decode steps to time. hits/misses: full-cache lookups (attention >= uniform share) still readable or "
    "evicted; evictions: KV entries (token x layer x KV head) freed; kv_bytes_held: bytes of the cache's tensors at "
    "the end (attention_window frees nothing).")

KVPRESS_NOTE = ("With kvpress-compatible on, StreamingLLM, Knorm, SnapKV, TOVA and observed attention keep exactly the "
                "prompt tokens kvpress 0.5.5's presses keep: 1,800 of 1,800 recorded kept sets identical "
                "(docs/agreement.md); the lab's own defaults differ where that page says.")
MAX_CELLS = 192  # a visibility map is block-averaged down to at most this many rows and columns


def _room_for_legend(fig: go.Figure) -> go.Figure:
    """Half-width charts: lift the title above the legend so the two never overlap."""
    fig.update_layout(margin={"t": 110}, title={"y": 0.97, "yanchor": "top"})
    return fig


def show_verdicts(verdicts: pd.DataFrame) -> None:
    """One box per claim of the literature with the measurement that tests it; coloured only beyond the noise."""
    for row in verdicts.itertuples():
        counts = (f" (of {row.compared} comparisons: {row.held} hold, {row.against} do not, {row.within_noise} "
                  "within noise)" if row.compared > 1 else "")
        VERDICT_BOX.get(row.verdict, st.info)(f"**{row.claim}**: {row.verdict}{counts}. {row.evidence}.")


def visibility_title(mode: str, budget: int) -> str:
    """The visibility maps' title, saying what the rows are in this mode."""
    return f"What each query could read at budget {budget} ({mode}: {VISIBILITY_TITLE[mode]})"


def at_budget(results: EvictionResults, budget: int) -> tuple[pd.DataFrame, dict[str, np.ndarray], pd.DataFrame]:
    """The runs at ``budget`` (tokens) plus the full cache: table rows, visibility maps by policy, per-layer rows."""
    table, layers = results.table, results.layers
    rows = table[(table["budget_tokens"] == budget) | (table["policy"] == "full")]
    maps = {key.split("@")[0]: m for key, m in results.visible.items()
            if key.endswith(f"@{budget}") and not key.startswith("full@")}
    return rows, maps, layers[(layers["budget_tokens"] == budget) | (layers["policy"] == "full")]


def budgets_shown(table: pd.DataFrame) -> list[int]:
    """The budgets (tokens) the evicting runs used, ascending."""
    return sorted(table.loc[table["policy"] != "full", "budget_tokens"].unique().tolist())


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
    """Perplexity over the full cache's (same tokens, paired) per policy vs budget, with 95% intervals."""
    evicting = table[table["policy"] != "full"]
    fig = go.Figure()
    for i, (policy, part) in enumerate(evicting.groupby("policy", sort=False)):
        part = part.sort_values("budget_tokens")
        fig.add_trace(go.Scatter(
            x=part["budget_tokens"], y=part["ppl_vs_full"], mode="lines+markers", name=str(policy),
            line={"color": figures.PALETTE[i % len(figures.PALETTE)], "dash": figures.DASHES[i % len(figures.DASHES)]},
            error_y={"type": "data", "symmetric": False, "array": part["ppl_vs_full_high"] - part["ppl_vs_full"],
                     "arrayminus": part["ppl_vs_full"] - part["ppl_vs_full_low"], "thickness": 1.2, "width": 4},
            customdata=part[["ppl", "ppl_vs_full_low", "ppl_vs_full_high", "vs_full"]],
            hovertemplate=f"{policy} @ %{{x}}<br>perplexity %{{customdata[0]:.1f}} = %{{y:.3f}} x full "
                          "[%{customdata[1]:.3f}, %{customdata[2]:.3f}]: %{customdata[3]}<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dash", line_color="#666666")
    fig = figures.style(fig, "Perplexity vs budget (x full cache, 95% CI)", x="budget (tokens kept)",
                        y="perplexity / full cache")
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


@st.cache_resource(max_entries=32, show_spinner=False)
def page_figures(sweep_key: object, budget: int, mode: str, _results: EvictionResults) -> dict[str, go.Figure]:
    """The page's figures for one sweep (``sweep_key`` names it: the text and its runs) at one budget, built once:
    a rerun, a reload or another session draws the same figures (never changed after they are built)."""
    table = _results.table
    shown, maps, layers = at_budget(_results, budget)
    return {
        "ppl": perplexity_vs_budget(table),
        "bytes": figures.bar_chart(shown, "policy", "kv_bytes_held", title=f"KV bytes held at budget {budget}",
                                   y_title="bytes (real tensors)"),
        "maps": visibility_maps(maps, visibility_title(mode, budget)),
        "mass": per_layer(layers, "mass_retained", "Full-cache attention still readable", "attention mass retained"),
        "err": per_layer(layers, "output_error", "Attention output error vs full cache", "relative L2 error"),
        "strip": token_strip(_results.tokens),
    }
