"""Figures of the Live model page: the run's metrics and repeated timing, the attention heatmap with sinks and
heavy hitters marked, and the attention each key receives from far queries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from kvcore.models.attention import AttentionPatterns
from kvcore.models.generate import PhaseTiming
from kvcore.models.live import LiveRun
from kvcore.models.loader import BUNDLED_NAME, OFFLINE_MODELS
from kvcore.noise import Timing, load_note
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


def pattern_bars(patterns: pd.DataFrame, tokens: Sequence[str], title: str, sink_ratio: float) -> go.Figure:
    """Attention each key receives from far queries (mean vs uniform share), sinks and heavy hitters coloured.

    Keys with too few far queries to judge (NaN) get no bar; the dashed line is the sink threshold, drawn when
    some key comes within half of it.
    """
    labels = token_labels(tokens)
    judged = patterns[patterns["received_vs_uniform"].notna()]
    colors = [SINK_COLOR if s else HEAVY_COLOR if h else PALETTE[0]
              for s, h in zip(judged["sink"], judged["heavy_hitter"], strict=True)]
    fig = go.Figure(go.Bar(x=[labels[p] for p in judged["position"]], y=judged["received_vs_uniform"],
                           marker_color=colors, hovertemplate="key %{x}<br>%{y:.2f} x uniform<extra></extra>"))
    if len(judged) and judged["received_vs_uniform"].max() * 2 >= sink_ratio:
        fig.add_hline(y=sink_ratio, line={"color": SINK_COLOR, "dash": "dash", "width": 1})
    fig.update_xaxes(showticklabels=len(judged) <= 80, tickangle=-60)
    return style(fig, title, x="key", y="far attention / uniform share", legend=False, height=320)


SINK_MODEL = OFFLINE_MODELS[1]  # the offline model that has sinks
MARKED = 6  # sinks named one by one in the detector's note


def sink_evidence(patterns: pd.DataFrame, thresholds: AttentionPatterns, where: str, by_layer: pd.DataFrame,
                  model: str) -> tuple[bool, str]:
    """What the sink detector found on the map shown, with its evidence: (any sink, the note in words).

    patterns: the map's :func:`~kvcore.models.live.patterns_table`. where: "layer 5, head mean". by_layer: token
    0's ratio in every layer (:func:`~kvcore.models.live.key_sink_by_layer`). model: the model's name; the
    bundled model, which has no sink, points to the offline one that has (StreamingLLM, Xiao et al. 2023).
    """
    rule = (f"{thresholds.sink_ratio:g}x the uniform share 1/(t+1) from queries {thresholds.min_distance}+ "
            "positions later")
    sinks = patterns[patterns["sink"]]
    labels = token_labels(patterns["token"].tolist())
    if len(sinks):
        named = [f"**{labels[p]}** ({r:.1f}x over {q} queries)" for p, r, q in
                 zip(sinks["position"], sinks["received_vs_uniform"], sinks["far_queries"], strict=True)]
        more = f" and {len(named) - MARKED} more" if len(named) > MARKED else ""
        found = f"Sink detector, {where}: {', '.join(named[:MARKED])}{more}: each receives at least {rule}."
    else:
        first = patterns["received_vs_uniform"].iloc[0]
        zero = "too few far queries to judge" if np.isnan(first) else f"{first:.1f}x"
        found = f"Sink detector, {where}: no key reaches {rule} (token 0: {zero})."
    judged = by_layer.dropna(subset=["received_vs_uniform"])
    layers = ""
    if len(judged):
        top = judged.loc[judged["received_vs_uniform"].idxmax()]
        layers = (f" Token 0 across layers (heads averaged): a sink in {int(judged['sink'].sum())} of {len(by_layer)}, "
                  f"strongest {top.received_vs_uniform:.1f}x at layer {int(top.layer)}.")
    point = (f" The bundled model has no attention sink: choose {SINK_MODEL} in the Model box to see one."
             if model == BUNDLED_NAME and not len(sinks) else "")
    return bool(len(sinks)), found + layers + point


def _ms(t: Timing | None) -> str:
    return "n/a" if t is None else f"{t.median:.1f} ms"


def prefill_vs_decode(timing: PhaseTiming) -> tuple[str, str]:
    """The headline comparing the phases: ``("3.5x", why)`` (a prefill costs 3.5 decode steps), or "noise" when
    the rounds disagree more than the phases differ (a loaded machine; never a ratio then)."""
    ratio = timing.ratio()
    if ratio is None:
        return "n/a", "nothing was generated, so no decode step was timed"
    median, q1, q3 = ratio
    spread = f"per-round ratios IQR {q1:.2f}-{q3:.2f} over {len(timing.ratios)} interleaved rounds"
    if timing.within_noise():
        return "noise", (f"within noise: the rounds disagree more than the phases differ ({spread}, median "
                         f"{median:.2f}; {load_note(timing.prefill.load_1min, timing.prefill.cpus)}), so no ratio "
                         "is stated")
    return f"{median:.1f}x", f"one prefill costs {median:.2f} one-token decode steps ({spread})"


def generation_metrics(run: LiveRun, timing: PhaseTiming | None) -> None:
    """Prefill and decode time (medians of interleaved repeats), the prefill in decode steps (or "within noise"),
    the cache now and the mean log-prob of one generation; the times say "timing..." while they are measured."""
    last = run.table.iloc[-1]
    prefill = decode = ratio = ("timing...", "measured behind the page; it fills in by itself")
    if timing is not None:
        spread = {k: "" if t is None else f"IQR {t.q1:.1f}-{t.q3:.1f} ms over {t.repeats}" for k, t in
                  (("prefill", timing.prefill), ("decode", timing.decode))}
        prefill = (_ms(timing.prefill), f"{run.prompt_len} prompt tokens in one pass; {spread['prefill']}")
        decode = (_ms(timing.decode), f"one-token steps; {spread['decode']}")
        ratio = prefill_vs_decode(timing)
    metrics = {
        "Prefill": prefill,
        "Decode, per token": decode,
        "KV cache now": (bytes_str(int(last.kv_bytes)), f"{int(last.kv_tokens)} entries per layer"),
        "Mean log-prob": (f"{run.table['logprob'].mean():.2f}", "nats, generated tokens"),
        "Prefill / decode step": ratio,
    }
    for col, (label, (value, why)) in zip(st.columns(len(metrics)), metrics.items(), strict=True):
        col.metric(label, value, help=why)


def timing_caption(timing: PhaseTiming, age_s: float) -> str:
    """What the timing is: medians of interleaved repeats after a warm-up, their spread, and the load then."""
    parts = [f"{name} {t.describe('calls' if name == 'prefill' else 'steps', load=False)}"
             for name, t in timing.phases().items()]
    return (f"Timing (measured {age_s:.0f} s ago, re-measured after 5 minutes; on 1 torch thread; each round a prefill "
            f"then its decode steps, so both see the same load): {'; '.join(parts)}. What else ran: "
            f"{load_note(timing.prefill.load_1min, timing.prefill.cpus)}; a loaded machine stretches every step.")


def timing_chart(timing: PhaseTiming) -> go.Figure:
    """Median ms of a prefill and of one decode step, the bars spanning the interquartile range."""
    phases = timing.phases()
    names = list(phases)
    med = [phases[n].median for n in names]
    fig = go.Figure(go.Bar(x=names, y=med, marker_color=[PALETTE[0], PALETTE[1]][:len(names)],
                           error_y={"type": "data", "symmetric": False,
                                    "array": [phases[n].q3 - phases[n].median for n in names],
                                    "arrayminus": [phases[n].median - phases[n].q1 for n in names]},
                           hovertemplate="%{x}: median %{y:.2f} ms<extra></extra>"))
    ratio = timing.ratio()
    verdict = "within noise of each other" if timing.within_noise() else \
        f"a prefill costs {ratio[0]:.1f} decode steps"
    return style(fig, f"Prefill vs decode: medians, IQR bars<br>{verdict}", x="phase", y="ms per call",
                 legend=False, height=320)
