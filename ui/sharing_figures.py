"""Figures and captions of the Sharing page: which query heads read which KV head, capacity per KV head count,
conversion and cross-layer results, training curves. Styled through :func:`ui.figures.style`; every number in a
caption is read from the result tables."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from kvcore import sharing
from kvcore.noise import BLOCK_TOKENS, WITHIN_NOISE
from kvcore.shapes import GpuSpec, ModelShape
from kvcore.sharing.variants import speed_versus
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


def capacity(shape: ModelShape, gpu: GpuSpec, bits: int, context: int) -> go.Figure | None:
    """Sequences that fit after the weights vs context length, one line per KV head count (log-log), the chosen
    context marked; None when not one sequence fits at any context (the weights alone fill the GPU: there is
    nothing to draw). Contexts run in powers of two from 512 past ``context``; where not one sequence fits a line
    ends (0 has no place on a log axis)."""
    top = max(8192, shape.max_context, context)
    fit = sharing.fit_table(shape, gpu, bits, [2**p for p in range(9, 40) if 2 ** (p - 1) < top])
    shown = fit[fit["max_batch"] > 0]
    if shown.empty:
        return None
    marked = context <= shown["context"].max()
    # two short lines: the chart is half the page wide
    title = "Sequences that fit after the weights" + ("" if marked else f"<br>none at {context:,} tokens")
    fig = line_chart(shown, "context", "max_batch", "variant", title=title, x_title="context length (tokens)",
                     y_title="max batch (sequences)", log_x=True, log_y=True)
    if marked:
        vline(fig, context, f" {context:,}")
    return style(fig, title, legend="right")


def weights_note(table: pd.DataFrame, kv_heads: int, gpu: GpuSpec) -> str | None:
    """What to say when the chosen variant's 16-bit weights alone do not fit ``gpu`` (None when they fit);
    ``table`` is :func:`kvcore.sharing.kv_heads_table`'s."""
    row = table.set_index("kv_heads").loc[kv_heads]
    if row.weights_fit:
        return None
    fitting = table.loc[table["weights_fit"], "kv_heads"]
    others = ("nor do they with any other KV head count" if fitting.empty else
              f"with {fitting.max()} KV heads or fewer they do")
    return (f"With {kv_heads} KV heads the 16-bit weights ({row.weights_GB_16bit:,.0f} GB) do not fit the "
            f"{gpu.name}'s memory on their own, so no sequence fits beside them; {others}. Pick a larger GPU, or "
            "split the model over several.")


def conversion(table: pd.DataFrame) -> go.Figure:
    """Perplexity vs KV heads after mean pooling (and after uptraining, when run), with 95% intervals, on a log
    scale whose ends are labelled."""
    fig = go.Figure()
    ticks = [f"{k} ({a})<br>{bytes_str(b)}/token" for k, a, b in
             zip(table["kv_heads"], table["attention"], table["kv_bytes_per_token"], strict=True)]
    series = [("perplexity", "mean-pooled")]
    if "perplexity_uptrained" in table:
        series.append(("perplexity_uptrained", "pooled + uptrained"))
    for i, (col, name) in enumerate(series):
        fig.add_trace(go.Scatter(
            x=ticks, y=table[col], name=name, mode="lines+markers", line={"color": PALETTE[i], "width": 2.5},
            error_y={"type": "data", "symmetric": False, "array": table[f"{col}_high"] - table[col],
                     "arrayminus": table[col] - table[f"{col}_low"], "thickness": 1.2, "width": 4},
            customdata=table[[f"{col}_low", f"{col}_high"]],
            hovertemplate="%{x}: perplexity %{y:.2f} [%{customdata[0]:.2f}, %{customdata[1]:.2f}]<extra>" + name
                          + "</extra>"))
    fig.update_yaxes(type="log")
    return style(fig, "Bundled model converted to fewer KV heads (95% intervals)", x="KV heads",
                 y="validation perplexity")


def crosslayer(table: pd.DataFrame, start: int) -> go.Figure:
    """KV bytes kept vs perplexity with its 95% interval, one point per configuration, labelled with its first
    shared layer; hollow where the change from the full cache is within noise (neither coloured nor ranked)."""
    fig = go.Figure()
    for i, (mode, part) in enumerate(table.groupby("mode", sort=False)):
        labels = ["full" if m == "none" else f"from {s}" for m, s in zip(part["mode"], part["start_layer"],
                                                                            strict=True)]
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(
            x=part["kv_vs_full"], y=part["perplexity"], mode="markers+text", name=str(mode), text=labels,
            textposition="top center",
            error_y={"type": "data", "symmetric": False, "array": part["perplexity_high"] - part["perplexity"],
                     "arrayminus": part["perplexity"] - part["perplexity_low"], "thickness": 1, "width": 3,
                     "color": color},
            customdata=part[["ppl_vs_full", "ppl_vs_full_low", "ppl_vs_full_high", "vs_full"]],
            hovertemplate="perplexity %{y:.1f} = %{customdata[0]:.3f} x full [%{customdata[1]:.3f}, "
                          "%{customdata[2]:.3f}]: %{customdata[3]}<extra></extra>",
            marker={"size": [16 if (m != "none" and s == start) else 10
                             for m, s in zip(part["mode"], part["start_layer"], strict=True)],
                    "color": ["white" if v == WITHIN_NOISE else color for v in part["vs_full"]],
                    "line": {"width": 2, "color": color}}))
    low, high = table["perplexity_low"].min(), table["perplexity_high"].max()
    pad = max(high - low, 1.0)
    fig.update_yaxes(range=[low - 0.06 * pad, high + 0.14 * pad])  # room for the label above the top point
    return style(fig, "Cross-layer sharing: KV kept vs perplexity (hollow: within noise)",
                 x="KV bytes kept (share of full)", y="perplexity")


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


def sidebar_note(heads: bool, layers: bool) -> str:
    """Which of the sidebar's settings the open tab uses (``heads``, ``layers``: that tab is open; else one of the
    two training tabs); the others are greyed out."""
    if heads:
        return "Seed orders the training runs of the last two tabs only."
    if layers:
        return ("None of these settings change this tab: it runs the bundled model on its own validation text. "
                "The model settings shape the Heads tab.")
    return "Only Seed changes this tab (the order of training batches); the model settings shape the Heads tab."
HEADS_CAPTION = ("The same model with each divisor of its query heads as KV heads. Weights at 16 bits with the K/V "
                 "projections resized; 'fit' = (HBM - weights) / KV bytes.")


def crosslayer_caption(ids) -> str:
    """The cross-layer table's caption: how much text it scores (``ids``: the windows, [windows, tokens])."""
    return (f"Bundled model, {ids.shape[0]} windows of {ids.shape[1]} validation tokens; one row per first shared "
            "layer. Bytes measured from the cache tensors (fp32) at the end. _low/_high: 95% intervals, a paired "
            f"block bootstrap over blocks of {BLOCK_TOKENS} scored tokens, every row resampled on the same blocks; "
            "vs_full: worse or better only beyond the noise. t: the merge weight (empty where nothing is merged).")


def crosslayer_summary(table: pd.DataFrame, start: int) -> str:
    """The chosen first shared layer against the full cache, with the ratio's interval (or "within noise")."""
    full = table.iloc[0]
    row = table[(table["mode"] != "none") & (table["start_layer"] == start)].iloc[0]
    ratio = f"{row.ppl_vs_full:.3f}x [{row.ppl_vs_full_low:.3f}, {row.ppl_vs_full_high:.3f}]"
    verdict = "within noise of" if row.vs_full == WITHIN_NOISE else f"{row.vs_full} than"
    return (f"Sharing from layer {start} keeps {row.kv_vs_full:.0%} of the KV bytes: perplexity "
            f"{row.perplexity:.1f} [{row.perplexity_low:.1f}, {row.perplexity_high:.1f}] against the full cache's "
            f"{full.perplexity:.1f} [{full.perplexity_low:.1f}, {full.perplexity_high:.1f}], a ratio of {ratio}: "
            f"{verdict} the full cache.")


MODE_TEXT = {
    "share": "**share** (CLA at inference): the upper layer of each pair stores nothing and attends over the lower "
             "layer's K/V for every token. One forward scores the text exactly.",
    "merge-linear": "**merge-linear**: each pair stores one K/V, (1 - t) x lower + t x upper; each layer reads the "
                    "merged past and its own current token. Scored token by token.",
    "merge-slerp": "**merge-slerp** (MiniCache): each pair stores one unit direction, the slerp of both layers' "
                   "directions, plus each layer's norm per token; layer i reads norm_i x direction. Scored token by "
                   "token.",
}


def _ratio(value: float, low: float, high: float) -> str:
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def convert_caption(table: pd.DataFrame, steps: int) -> str:
    """What the conversion table says, in one or two sentences (numbers and intervals read from the table; a change
    inside its interval is said to be within noise, never ranked)."""
    first, last = table.iloc[0], table.iloc[-1]
    ratio = _ratio(last.ppl_vs_original, last.ppl_vs_original_low, last.ppl_vs_original_high)
    change = (f"multiplies perplexity by {ratio}" if last.vs_original != WITHIN_NOISE else
              f"leaves perplexity within noise of the original (ratio {ratio})")
    text = (f"Mean-pooling {first.kv_heads} KV heads down to {last.kv_heads} ({last.attention}) cuts KV bytes "
            f"{first.kv_bytes_per_token / last.kv_bytes_per_token:.0f}x and {change} before any training.")
    if steps and "perplexity_uptrained" in table:
        won = (f"{last.gap_closed:.0%} of the gap closed" if last.uptraining == "better" else
               f"uptraining changed it {last.uptraining}" if last.uptraining == WITHIN_NOISE else "worse than before")
        text += (f" After {steps} uptraining steps it is {last.perplexity_uptrained:.1f} "
                 f"[{last.perplexity_uptrained_low:.1f}, {last.perplexity_uptrained_high:.1f}] (from "
                 f"{last.perplexity:.1f}; {won}); the same steps on the unconverted model (control) give "
                 f"{first.perplexity_uptrained:.1f} (from {first.perplexity:.1f}; {first.uptraining}).")
    return text + " Brackets: 95% intervals over the validation tokens, paired (the same tokens for every model)."


def shipped_caption(summary: pd.DataFrame, run: str = "Shipped run") -> str:
    """A training run in three sentences: size and steps; MHA against the variant with the fewest KV heads in
    validation bits per byte (with its paired interval, or saying that the run kept none); decode speed (median of
    interleaved rounds with the interquartile range, or saying that no spread was measured)."""
    mha, few = summary.iloc[0], summary.iloc[-1]
    where = "; kvcore/sharing/results/README.md has the command and machine" if run == "Shipped run" else ""
    text = (f"{run} ({mha.steps} steps, {mha.tokens_seen:,} training tokens per variant, {mha.params:,} parameters "
            f"for MHA{where}): ")
    if "bpb_vs_mha" in summary and pd.notna(few.get("bpb_vs_mha")):
        diff = f"{few.bpb_vs_mha:+.3f} [{few.bpb_vs_mha_low:+.3f}, {few.bpb_vs_mha_high:+.3f}]"
        verdict = "within noise" if few.vs_mha == WITHIN_NOISE else f"{few.vs_mha} than MHA"
        text += (f"{mha.variant} reaches {mha.val_bits_per_byte:.3f} [{mha.val_bits_per_byte_low:.3f}, "
                 f"{mha.val_bits_per_byte_high:.3f}] validation bits/byte, {few.variant} {few.val_bits_per_byte:.3f} "
                 f"[{few.val_bits_per_byte_low:.3f}, {few.val_bits_per_byte_high:.3f}] with {few.kv_vs_mha:.3g}x the "
                 f"KV bytes: a difference of {diff} bits/byte on the same tokens, {verdict}.")
    else:
        text += (f"{mha.variant} reaches {mha.val_bits_per_byte:.3f} validation bits/byte, {few.variant} "
                 f"{few.val_bits_per_byte:.3f} with {few.kv_vs_mha:.3g}x the KV bytes; one training run each, which "
                 "kept no per-token losses, so the difference carries no interval and is not ranked (the short "
                 "re-run below measures it with its interval).")
    speeds = f"{mha.decode_tokens_per_s:,.0f} vs {few.decode_tokens_per_s:,.0f} tokens/s"
    if "decode_tokens_per_s_q1" in summary:
        speeds = (f"{mha.decode_tokens_per_s:,.0f} (IQR {mha.decode_tokens_per_s_q1:,.0f}-"
                  f"{mha.decode_tokens_per_s_q3:,.0f}) vs {few.decode_tokens_per_s:,.0f} (IQR "
                  f"{few.decode_tokens_per_s_q1:,.0f}-{few.decode_tokens_per_s_q3:,.0f}) tokens/s, medians of "
                  f"{int(few.decode_rounds)} interleaved rounds: {few.variant} "
                  f"{speed_versus(few, mha).replace('faster', 'faster beyond the noise')}")
    else:
        speeds += " (a median without its spread: not compared)"
    return text + (f" Decoding {mha.decode_batch} sequences over a {mha.decode_context:,}-token cache: {speeds} "
                   "(CPU, SDPA).")


def head_metrics(row, tokens: int, batch: int, gpu: str) -> None:
    """Three metrics for one row of :func:`kvcore.sharing.kv_heads_table`: per token, in total, sequences that fit."""
    c1, c2, c3 = st.columns(3)
    c1.metric("KV per token", bytes_str(row.kv_bytes_per_token), f"{row.kv_vs_mha:.3g}x of MHA", delta_color="off",
              delta_arrow="off")
    c2.metric(f"KV for {tokens:,} tokens x {batch}", bytes_str(row.kv_bytes_total))
    c3.metric(f"Sequences that fit on {gpu}", f"{row.max_batch_at_context:,}" if row.weights_fit else "none")


def side_by_side(figs: Sequence[go.Figure], key: str) -> None:
    """Draw figures in equal columns (keys ``<key>-0``, ``<key>-1``...)."""
    for i, (col, fig) in enumerate(zip(st.columns(len(figs)), figs, strict=True)):
        with col:
            show(fig, key=f"{key}-{i}")
