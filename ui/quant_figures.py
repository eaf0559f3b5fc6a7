"""Figures of the Quantization page: the chosen method's metrics, K/V magnitude maps, errors by layer, and the
bytes-vs-perplexity Pareto chart of every method with each ratio's interval. Styled through
:func:`ui.figures.style`. A difference from fp16 inside its interval is never coloured nor ranked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from kvcore.models.loader import BUNDLED_NAME as BUNDLED
from kvcore.models.smollm2 import SMOLLM2
from kvcore.noise import BLOCK_TOKENS, LEVEL, MIN_UNITS, WITHIN_NOISE
from kvcore.quant import evaluate as qe
from kvcore.quant.evaluate import QuantEval
from kvcore.quant.premise import OUTLIER_RATIO
from ui.figures import PALETTE, heatmap, label_size, line_chart, place_labels, style
from ui.format import signed_pct

TABS = ["Memory vs perplexity", "K/V magnitudes", "Error by layer", "Generated text", "Results"]
ERRORS = {"k_rel_err": "keys", "v_rel_err": "values", "attn_rel_err": "attention output"}
VERDICT_BOX = {"holds": st.success, "partly holds": st.warning, "does not hold": st.warning}
CHANNELS_CAPTION = ("Per layer: the largest key (k_) and value (v_) channel over its head's median channel (mean |x| "
                    "over the tokens, the largest over KV heads), and the share of (head, channel) pairs at "
                    f"{OUTLIER_RATIO:g}x or more.")


def ratio_text(row: pd.Series) -> str:
    """``"+9.6% [+7.1%, +12.3%]"``: the change of perplexity vs fp16 with its interval (never "-0.0%")."""
    low, mid, high = (signed_pct(100 * (r - 1), 1) for r in (row.ppl_vs_fp16_low, row.ppl_vs_fp16,
                                                              row.ppl_vs_fp16_high))
    return f"{mid} [{low}, {high}]"


def perplexity_delta(row: pd.Series) -> tuple[str | None, str]:
    """The metric's delta and its colour: coloured only when the interval excludes fp16's perplexity."""
    if row.vs_fp16 == "baseline":
        return None, "off"
    if row.vs_fp16 == WITHIN_NOISE:
        return f"within noise: {ratio_text(row)}", "off"
    return f"{ratio_text(row)} vs fp16", "inverse"


DECODING = ("Fills in when every method has decoded the text (the bar above says how far): perplexity, the bytes "
            "the cache holds at the end, and the memory vs perplexity front need the decode.")


def method_metrics(row: pd.Series) -> None:
    """Bytes, K/V/attention errors and perplexity (with its interval) of one method (a row of the summary); a row
    of errors alone (the decode still running) shows bytes and perplexity as "decoding..."."""
    c1, c2, c3, c4, c5 = st.columns([1, 1, 1, 1, 1.8])  # the perplexity's delta carries its interval
    decoded = "perplexity" in row
    c1.metric("KV bytes vs fp16", f"{row.bytes_ratio:.3f}x" if decoded else "...",
              help="what the cache holds at the end of the decode (all layers, codes, scales and zeros); \"...\": "
                   "the decode is running behind the page")
    rel = "relative L2 error ||x̂ - x|| / ||x||, mean over layers"
    c2.metric("Key error", f"{row.k_rel_err:.3f}", help=rel)
    c3.metric("Value error", f"{row.v_rel_err:.3f}", help=rel)
    c4.metric("Attention error", f"{row.attn_rel_err:.3f}", help=f"{rel} (attention outputs)")
    if not decoded:
        c5.metric("Perplexity", "decoding...", help="every method decodes the text token by token, behind the page")
        return
    delta, color = perplexity_delta(row)
    c5.metric("Perplexity", f"{row.perplexity:.1f}", delta, delta_color=color,
              delta_arrow="off" if color == "off" else "auto",
              help=f"{LEVEL:.0%} interval {row.perplexity_low:.1f}-{row.perplexity_high:.1f} over "
                   f"{row.scored_tokens} scored tokens; the change vs fp16 is paired (same tokens), so it is "
                   "far tighter than the perplexity's own interval")


def noise_caption(result: QuantEval, model: str = "bundled") -> str:
    """How many tokens were scored, why, and what the intervals are (and why a slower model opens on fewer)."""
    fewer = qe.page_windows(model) < qe.PAGE_WINDOWS
    slower = (f" On {model} the page opens on {qe.page_windows(model)} window ({qe.PAGE_TOKENS // 2} scored tokens, "
              "the fewest that rank anything) so that its decode takes about a minute; add windows for narrower "
              "intervals." if fewer else "")
    blocks = -(-(result.num_tokens - result.prompt_tokens) // BLOCK_TOKENS) * result.windows
    few = (f" Fewer than {MIN_UNITS} blocks: too few to call any difference, so none is coloured or ranked."
           if blocks < MIN_UNITS else "")
    return (f"Perplexity scores {result.scored_tokens} tokens ({result.windows} window(s) of {result.num_tokens}, "
            f"the second half of each decoded through the cache). Intervals: {LEVEL:.0%} paired block bootstrap "
            f"over {blocks} blocks of {BLOCK_TOKENS} consecutive scored tokens, every method resampled on the same "
            "blocks. A change inside its interval says \"within noise\" and is neither coloured nor put on the "
            "Pareto front. Why 256 tokens by default: at 64 scored tokens int2-token's ratio to fp16 ran from "
            "0.98 to 1.23 across text windows (kivi-2 showed a -2% \"gain\"); at 256 int2 stayed 4-12% worse "
            f"in every window group.{few}{slower}")


def premise_boxes(premise: pd.DataFrame, model_name: str) -> None:
    """One box per part of KIVI's premise (:func:`kvcore.quant.premise.kivi_premise`), coloured only when the
    measurement decides it (green: holds; orange: does not, or only partly; grey: within noise). Where the bundled
    toy does not show a part, a line points to the real model that can."""
    for row in premise.itertuples():
        VERDICT_BOX.get(row.verdict, st.info)(f"**{row.claim}**: {row.verdict}. {row.measured}.")
    if model_name == BUNDLED and (premise["verdict"] != "holds").any():
        st.caption(f"The bundled 5.8M-parameter model is too small to show every part of the premise: choose "
                   f"**{SMOLLM2.name}** (Model, in the sidebar) to measure it on a real pretrained model, with no "
                   f"model hub.")


def channel_outliers(channels: pd.DataFrame, ratio: float = OUTLIER_RATIO) -> go.Figure:
    """Per layer, the largest key and value channel over its head's median channel (mean |x| over tokens), with the
    outlier threshold dashed: keys far above it and values near 1-3x is KIVI's premise (Liu et al. 2024, Fig. 2)."""
    part = channels.melt(id_vars="layer", value_vars=["k_top_ratio", "v_top_ratio"], var_name="cache",
                         value_name="ratio")
    part["cache"] = part["cache"].map({"k_top_ratio": "keys", "v_top_ratio": "values"})
    fig = line_chart(part, "layer", "ratio", "cache", title="Largest channel over its head's median channel "
                     f"(mean |x| over tokens; dashed: {ratio:g}x, an outlier channel)", x_title="layer",
                     y_title="largest / median channel")
    fig.add_hline(y=ratio, line={"color": "#666666", "dash": "dash", "width": 1})
    fig.update_yaxes(rangemode="tozero")
    return fig


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


PARETO_HEIGHT = 500
PARETO_WIDTH = 940  # the main column at a 1400 px browser: the labels are placed for this width


def pareto_labels(summary: pd.DataFrame, highlight: str | None, ceiling: float) -> pd.Series:
    """The name written beside each method's marker ("" for none): the front, fp16, the highlighted method, and
    ratios above ``ceiling`` with their value."""
    above = summary["ppl_vs_fp16"] > ceiling
    return pd.Series([(f"{m} ({r:.2f}x)" if a else m) if (a or f or m in (highlight, "fp16")) else ""
                      for m, r, a, f in zip(summary["method"], summary["ppl_vs_fp16"], above, summary["pareto"],
                                            strict=True)], index=summary.index)


def pareto(summary: pd.DataFrame, highlight: str | None = None, ceiling: float = 1.3) -> go.Figure:
    """Bytes vs perplexity / fp16 perplexity with each ratio's interval, one marker per method coloured by family.

    The noise-aware Pareto front (:func:`kvcore.quant.evaluate.noisy_pareto_front`) is joined by a line; names
    are written for front points, fp16 and the highlighted method (hover shows every name and interval), each
    where it covers no other name, marker or error bar: beside its marker, or out of a crowd with a leader line
    (:func:`ui.figures.place_labels`). A method
    within noise of fp16 is drawn hollow. Ratios above ``ceiling`` are drawn as triangles on the top edge,
    labelled with their value, so the methods that matter keep the vertical resolution.
    """
    low = float(min(summary["ppl_vs_fp16_low"].min(), 1.0))
    x_range, y_range = (0.0, 1.08), (low - 0.02, ceiling + 0.05)
    labels = pareto_labels(summary, highlight, ceiling)
    fig = go.Figure()
    for i, (family, part) in enumerate(summary.groupby("family", sort=False)):
        above = part["ppl_vs_fp16"] > ceiling
        noise = part["vs_fp16"] == WITHIN_NOISE
        y = part["ppl_vs_fp16"].clip(upper=ceiling)
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(
            x=part["bytes_ratio"], y=y, mode="markers", name=str(family),
            error_y={"type": "data", "symmetric": False, "thickness": 1.2, "width": 3, "color": color,
                     "array": (part["ppl_vs_fp16_high"] - part["ppl_vs_fp16"]).where(~above, 0),
                     "arrayminus": (part["ppl_vs_fp16"] - part["ppl_vs_fp16_low"]).where(~above, 0)},
            customdata=part[["method", "ppl_vs_fp16", "ppl_vs_fp16_low", "ppl_vs_fp16_high", "vs_fp16",
                             "perplexity"]],
            marker={"size": 11, "color": ["white" if n else color for n in noise],
                    "line": {"width": 2, "color": color},
                    "symbol": ["triangle-up" if a else "circle" for a in above]},
            hovertemplate="%{customdata[0]}<br>bytes %{x:.3f} x fp16<br>perplexity %{customdata[5]:.2f} = "
                          "%{customdata[1]:.3f} x fp16 [%{customdata[2]:.3f}, %{customdata[3]:.3f}]: "
                          "%{customdata[4]}<extra></extra>",
        ))
    front = summary[summary["pareto"]].sort_values("bytes_ratio")
    fig.add_trace(go.Scatter(x=front["bytes_ratio"], y=front["ppl_vs_fp16"].clip(upper=ceiling), mode="lines",
                             name="Pareto front (beyond noise)", hoverinfo="skip",
                             line={"color": "#000000", "dash": "dot", "width": 1}))
    fig.add_hline(y=1.0, line={"color": "#666666", "dash": "dash", "width": 1})
    chosen = summary[summary["method"] == highlight]
    if len(chosen):
        fig.add_trace(go.Scatter(x=chosen["bytes_ratio"], y=chosen["ppl_vs_fp16"].clip(upper=ceiling),
                                 mode="markers", name=highlight, hoverinfo="skip",
                                 marker={"size": 22, "symbol": "circle-open", "line": {"width": 3},
                                         "color": "#D55E00"}))
    fig.update_xaxes(range=list(x_range))
    fig.update_yaxes(range=list(y_range))
    style(fig, "Memory vs perplexity (lower left is better; hollow: within noise)",
          x="KV bytes / fp16 bytes", y="perplexity / fp16 perplexity", height=PARETO_HEIGHT, legend="right")
    _place_names(fig, summary, labels, highlight, ceiling)
    return fig


def _place_names(fig: go.Figure, summary: pd.DataFrame, labels: pd.Series, highlight: str | None,
                 ceiling: float) -> None:
    """Write each method's name where it covers no other name, marker or error bar, in the plot area the styled
    figure leaves (:func:`ui.figures.place_labels`): beside its marker, or further out with a grey leader line."""
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    margin = fig.layout.margin
    plot_px = (PARETO_WIDTH - margin.l - margin.r, PARETO_HEIGHT - margin.t - margin.b)
    above = summary["ppl_vs_fp16"] > ceiling
    y = summary["ppl_vs_fp16"].clip(upper=ceiling)
    points = [((a - x0) / (x1 - x0), (b - y0) / (y1 - y0)) for a, b in zip(summary["bytes_ratio"], y, strict=True)]
    ends = [(((b if up else lo) - y0) / (y1 - y0), ((b if up else hi) - y0) / (y1 - y0)) for lo, hi, b, up in
            zip(summary["ppl_vs_fp16_low"], summary["ppl_vs_fp16_high"], y, above, strict=True)]
    sizes = [26 if m == highlight else 12 for m in summary["method"]]  # the chosen method's ring is wider
    offsets = place_labels(points, list(labels), plot_px, marker_px=sizes, whiskers=ends)
    for (x, yy, text, size), offset in zip(zip(summary["bytes_ratio"], y, labels, sizes, strict=True), offsets,
                                          strict=True):
        if offset is None:
            continue
        width, height = label_size(text)
        far = abs(offset[0]) > width / 2 + size / 2 + 4 or abs(offset[1]) > height / 2 + size / 2 + 4
        fig.add_annotation(x=x, y=yy, xref="x", yref="y", text=text, ax=offset[0], ay=-offset[1], showarrow=True,
                           arrowhead=0, arrowwidth=1, standoff=size / 2,
                           arrowcolor="#999999" if far else "rgba(0,0,0,0)", font={"size": 11})
