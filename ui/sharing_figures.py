"""Figures and captions of the Sharing page: which query heads read which KV head, capacity per KV head count,
conversion and cross-layer results, training curves. Styled through :func:`ui.figures.style`; every number in a
caption is read from the result tables."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from kvcore import sharing
from kvcore.shapes import GpuSpec, ModelShape
from ui.figures import PALETTE, bar_chart, line_chart, show, style, vline
from ui.format import bytes_str


def head_groups(q_heads: int, kv_heads: int, title: str) -> go.Figure:
    """Query heads (top row) joined to the KV head each one reads (bottom row), one colour per group."""
    size = q_heads // kv_heads
    fig = go.Figure()
    span = max(q_heads - 1, 1)
    kv_x = [(g * size + (size - 1) / 2) for g in range(kv_heads)]  # each KV head under the middle of its group
    for q in range(q_heads):
        g = q // size
        fig.add_trace(go.Scatter(x=[q, kv_x[g]], y=[1, 0], mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"color": PALETTE[g % len(PALETTE)], "width": 1.5}))
    marker = max(5, min(16, 400 // q_heads))
    fig.add_trace(go.Scatter(
        x=list(range(q_heads)), y=[1] * q_heads, mode="markers", name="query heads",
        marker={"size": marker, "color": [PALETTE[(q // size) % len(PALETTE)] for q in range(q_heads)]},
        hovertemplate=[f"query head {q} reads KV head {q // size}<extra></extra>" for q in range(q_heads)]))
    fig.add_trace(go.Scatter(
        x=kv_x, y=[0] * kv_heads, mode="markers", name="KV heads (cached)",
        marker={"size": marker + 6, "symbol": "square", "color": [PALETTE[g % len(PALETTE)] for g in range(kv_heads)],
                "line": {"color": "#000000", "width": 1}},
        hovertemplate=[f"KV head {g}: serves query heads {g * size}..{(g + 1) * size - 1}<extra></extra>"
                       for g in range(kv_heads)]))
    fig.update_yaxes(tickvals=[0, 1], ticktext=["KV heads", "query heads"], range=[-0.3, 1.3], showgrid=False)
    fig.update_xaxes(range=[-1, span + 1], showticklabels=False, showgrid=False, zeroline=False)
    return style(fig, title, height=240)


def bytes_per_token(table: pd.DataFrame, bits: int) -> go.Figure:
    """KV bytes per token for each KV head count of :func:`kvcore.sharing.kv_heads_table` (log scale)."""
    return bar_chart(table.assign(kv=table["kv_heads"].astype(str)), "kv", "kv_bytes_per_token",
                     title=f"KV bytes per token ({bits}-bit)", x_title="KV heads", y_title="bytes per token",
                     log_y=True)


def capacity(shape: ModelShape, gpu: GpuSpec, bits: int, context: int) -> go.Figure:
    """Sequences that fit after the weights vs context length, one line per KV head count (log-log), the chosen
    context marked. Contexts run in powers of two from 512 past ``context``; where not one sequence fits a line
    ends (0 has no place on a log axis)."""
    top = max(8192, shape.max_context, context)
    fit = sharing.fit_table(shape, gpu, bits, [2**p for p in range(9, 40) if 2 ** (p - 1) < top])
    shown = fit[fit["max_batch"] > 0]
    marked = len(shown) > 0 and context <= shown["context"].max()
    title = "Sequences that fit after the weights" + ("" if marked else f": none at {context:,} tokens")
    fig = line_chart(shown, "context", "max_batch", "variant", title=title, x_title="context length (tokens)",
                     y_title="max batch (sequences)", log_x=True, log_y=True)
    if marked:
        vline(fig, context, f" {context:,}")
    return style(fig, title, legend="right")


def conversion(table: pd.DataFrame) -> go.Figure:
    """Perplexity vs KV heads after mean pooling (and after uptraining, when run), on a log scale."""
    fig = go.Figure()
    ticks = [f"{k} ({a})<br>{bytes_str(b)}/token" for k, a, b in
             zip(table["kv_heads"], table["attention"], table["kv_bytes_per_token"], strict=True)]
    series = [("perplexity", "mean-pooled")]
    if "perplexity_uptrained" in table:
        series.append(("perplexity_uptrained", "pooled + uptrained"))
    for i, (col, name) in enumerate(series):
        fig.add_trace(go.Scatter(x=ticks, y=table[col], name=name, mode="lines+markers",
                                 line={"color": PALETTE[i], "width": 2.5},
                                 hovertemplate="%{x}: perplexity %{y:.2f}<extra>" + name + "</extra>"))
    fig.update_yaxes(type="log")
    return style(fig, "Bundled model converted to fewer KV heads", x="KV heads", y="validation perplexity")


def crosslayer(table: pd.DataFrame, start: int) -> go.Figure:
    """KV bytes kept vs perplexity, one point per configuration, labelled with its first shared layer."""
    fig = go.Figure()
    for i, (mode, part) in enumerate(table.groupby("mode", sort=False)):
        labels = ["full" if m == "none" else f"from {s}" for m, s in zip(part["mode"], part["start_layer"],
                                                                            strict=True)]
        fig.add_trace(go.Scatter(
            x=part["kv_vs_full"], y=part["perplexity"], mode="markers+text", name=str(mode), text=labels,
            textposition="top center",
            marker={"size": [16 if (m != "none" and s == start) else 10
                             for m, s in zip(part["mode"], part["start_layer"], strict=True)],
                    "color": PALETTE[i % len(PALETTE)]}))
    low, high = table["perplexity"].min(), table["perplexity"].max()
    pad = max(high - low, 1.0)
    fig.update_yaxes(range=[low - 0.06 * pad, high + 0.14 * pad])  # room for the label above the top point
    return style(fig, "Cross-layer sharing: KV kept vs perplexity", x="KV bytes kept (share of full)",
                 y="perplexity")


def curves(curves: pd.DataFrame, title: str) -> tuple[go.Figure, go.Figure]:
    """Training loss (EMA) and validation bits per byte against steps, one line per variant."""
    loss = line_chart(curves.dropna(subset=["train_loss_ema"]), "step", "train_loss_ema", "variant", markers=False,
                      x_title="step", y_title="loss (nats/token, EMA)")
    val = line_chart(curves.dropna(subset=["val_bits_per_byte"]), "step", "val_bits_per_byte", "variant",
                     x_title="step", y_title="bits per byte")
    # four long names: the legend goes under the plot, clear of the title
    return (style(loss, f"{title}: training loss", height=430, legend="bottom"),
            style(val, f"{title}: validation", height=430, legend="bottom"))


TABS = ["Heads: MHA/GQA/MQA", "Layers: cross-layer", "Convert a trained model", "Trained from scratch"]
HEADS_CAPTION = ("The same model with each divisor of its query heads as KV heads. Weights at 16 bits with the K/V "
                 "projections resized; 'fit' = (HBM - weights) / KV bytes.")


def crosslayer_caption(ids) -> str:
    """The cross-layer table's caption: how much text it scores (``ids``: the windows, [windows, tokens])."""
    return (f"Bundled model, {ids.shape[0]} windows of {ids.shape[1]} validation tokens; one row per first shared "
            "layer. Bytes measured from the cache tensors (fp32) at the end.")


MODE_TEXT = {
    "share": "**share** (CLA at inference): the upper layer of each pair stores nothing and attends over the lower "
             "layer's K/V for every token. One forward scores the text exactly.",
    "merge-linear": "**merge-linear**: each pair stores one K/V, (1 - t) x lower + t x upper; each layer reads the "
                    "merged past and its own current token. Scored token by token.",
    "merge-slerp": "**merge-slerp** (MiniCache): each pair stores one unit direction, the slerp of both layers' "
                   "directions, plus each layer's norm per token; layer i reads norm_i x direction. Scored token by "
                   "token.",
}


def convert_caption(table: pd.DataFrame, steps: int) -> str:
    """What the conversion table says, in one or two sentences (numbers read from the table)."""
    first, last = table.iloc[0], table.iloc[-1]
    text = (f"Mean-pooling {first.kv_heads} KV heads down to {last.kv_heads} ({last.attention}) cuts KV bytes "
            f"{first.kv_bytes_per_token / last.kv_bytes_per_token:.0f}x and multiplies perplexity by "
            f"{last.ppl_vs_original:.2f} before any training.")
    if steps and "perplexity_uptrained" in table:
        text += (f" After {steps} uptraining steps it is {last.perplexity_uptrained:.1f} (from {last.perplexity:.1f}; "
                 f"{last.gap_closed:.0%} of the gap closed); the same steps on the unconverted model (control) give "
                 f"{first.perplexity_uptrained:.1f} (from {first.perplexity:.1f}).")
    return text


def shipped_caption(summary: pd.DataFrame) -> str:
    """The shipped run in two sentences: size, steps, and the MHA vs fewest-KV-heads comparison."""
    mha, few = summary.iloc[0], summary.iloc[-1]
    return (f"Shipped run ({mha.steps} steps, {mha.tokens_seen:,} training tokens per variant, {mha.params:,} "
            f"parameters for MHA; kvcore/sharing/results/README.md has the command and machine): {mha.variant} "
            f"reaches {mha.val_bits_per_byte:.3f} validation bits/byte, {few.variant} {few.val_bits_per_byte:.3f} "
            f"with {few.kv_vs_mha:.3g}x the KV bytes. Decoding {mha.decode_batch} sequences over a "
            f"{mha.decode_context:,}-token cache: {mha.decode_tokens_per_s:,.0f} vs {few.decode_tokens_per_s:,.0f} "
            "tokens/s (CPU, SDPA).")


def head_metrics(row, tokens: int, batch: int, gpu: str) -> None:
    """Three metrics for one row of :func:`kvcore.sharing.kv_heads_table`: per token, in total, sequences that fit."""
    c1, c2, c3 = st.columns(3)
    c1.metric("KV per token", bytes_str(row.kv_bytes_per_token), f"{row.kv_vs_mha:.3g}x of MHA", delta_color="off",
              delta_arrow="off")
    c2.metric(f"KV for {tokens:,} tokens x {batch}", bytes_str(row.kv_bytes_total))
    c3.metric(f"Sequences that fit on {gpu}", f"{row.max_batch_at_context:,}")


def side_by_side(figs: Sequence[go.Figure], key: str) -> None:
    """Draw figures in equal columns (keys ``<key>-0``, ``<key>-1``...)."""
    for i, (col, fig) in enumerate(zip(st.columns(len(figs)), figs, strict=True)):
        with col:
            show(fig, key=f"{key}-{i}")
