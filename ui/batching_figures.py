"""Figures of the Continuous batching page: a per-scheduler Gantt timeline of requests, KV usage and batch
size over time, latency CDFs, and the notes on the model. Styled through :func:`ui.figures.style`; one
colour per scheduler."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from kvcore.sched import PHASES, POLICY_LABELS, Comparison, CostModel, FittedCost
from ui.figures import PALETTE, style

PHASE_COLORS = {"waiting": "#D9D9D9", "prefill": PALETTE[1], "decode": PALETTE[0], "preempted": PALETTE[3]}
MAX_POINTS = 1500  # per line: a long run has thousands of steps; every k-th step draws the same picture


def scheduler_color(name: str) -> str:
    """A scheduler keeps its colour whichever others are shown (static, continuous, chunked: palette 0, 1, 2)."""
    labels = list(POLICY_LABELS.values())
    return PALETTE[labels.index(name) % len(PALETTE)] if name in labels else PALETTE[-1]


def gantt_figure(phases: pd.DataFrame, schedulers: list[str], max_requests: int) -> go.Figure:
    """One panel per scheduler: a row per request (the first ``max_requests``), bars coloured by phase."""
    fig = make_subplots(rows=len(schedulers), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=schedulers)
    shown = phases[phases["request"] < max_requests]
    rows = int(shown["request"].max()) + 1 if len(shown) else 1
    for row, name in enumerate(schedulers, start=1):
        part = shown[shown["scheduler"] == name]
        for phase in PHASES:
            bars = part[part["phase"] == phase]
            fig.add_trace(go.Bar(
                y=bars["request"], x=bars["end_s"] - bars["start_s"], base=bars["start_s"], orientation="h",
                marker={"color": PHASE_COLORS[phase], "line": {"width": 0}}, name=phase, legendgroup=phase,
                showlegend=row == 1, customdata=np.stack([bars["start_s"], bars["end_s"]], axis=-1),
                hovertemplate=f"request %{{y}}: {phase}<br>%{{customdata[0]:.3f}} s to %{{customdata[1]:.3f}} s"
                              "<extra></extra>"), row=row, col=1)
        fig.update_yaxes(autorange="reversed", title_text="request", tick0=0, dtick=max(1, round(rows / 6)),
                         row=row, col=1)
    fig.update_layout(barmode="overlay", bargap=0.15)
    fig.update_xaxes(title_text="time (s)", row=len(schedulers), col=1)
    return style(fig, f"Requests over time (first {max_requests})", height=160 + 230 * len(schedulers))


def timeline_figure(timeline: pd.DataFrame, schedulers: list[str]) -> go.Figure:
    """KV cache usage, running and waiting requests over time, one line per scheduler."""
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.07,
                        subplot_titles=("KV cache usage (% of blocks held)", "running requests (batch size)",
                                        "waiting requests"))
    for name in schedulers:
        part = _thin(timeline[timeline["scheduler"] == name])
        for row, (column, scale) in enumerate((("kv_usage", 100.0), ("running", 1.0), ("waiting", 1.0)), start=1):
            fig.add_trace(go.Scatter(x=part["time_s"], y=part[column] * scale, name=name, legendgroup=name,
                                     showlegend=row == 1, mode="lines", line={"color": scheduler_color(name),
                                                                              "width": 2, "shape": "hv"}),
                          row=row, col=1)
    fig.update_xaxes(title_text="time (s)", row=3, col=1)
    return style(fig, "Memory and batch size over time", height=640)


def cdf_figure(requests: pd.DataFrame, schedulers: list[str]) -> go.Figure:
    """Cumulative distributions of TTFT and TPOT per scheduler (log time axis: they differ by orders)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time to first token", "time per output token"))
    for name in schedulers:
        part = requests[requests["scheduler"] == name]
        for col, column in enumerate(("ttft_ms", "tpot_ms"), start=1):
            values = np.sort(part[column].dropna().to_numpy())
            fig.add_trace(go.Scatter(x=values, y=np.arange(1, len(values) + 1) / max(1, len(values)), name=name,
                                     legendgroup=name, showlegend=col == 1, mode="lines",
                                     line={"color": scheduler_color(name), "width": 2.5, "shape": "hv"}),
                          row=1, col=col)
            fig.update_xaxes(type="log", title_text="ms (log scale)", row=1, col=col)
    fig.update_yaxes(title_text="fraction of requests", range=[0, 1.02], row=1, col=1)
    return style(fig, "Latency CDFs", height=420)


def _thin(part: pd.DataFrame) -> pd.DataFrame:
    step = max(1, len(part) // MAX_POINTS)
    return part.iloc[::step] if step > 1 else part


def pool_caption(comparison: Comparison) -> str:
    """What the KV pool went through: its size, the peak usage, and what preemption cost each scheduler."""
    first = comparison.results[0]
    cost, summary = first.config.cost, comparison.summary.set_index("scheduler")
    tokens = first.num_blocks * first.config.block_size
    text = (f"KV pool: {first.num_blocks:,} blocks of {first.config.block_size} tokens ({tokens:,} tokens, "
            f"{tokens * cost.kv_bytes_per_token / 1e9:,.1f} GB at {cost.kv_bytes_per_token / 1e3:,.0f} kB per token "
            f"of {cost.label}); peak usage " + ", ".join(f"{name} {row.peak_kv_usage:.0%}"
                                                              for name, row in summary.iterrows()) + ".")
    preempted = summary[summary["preemptions"] > 0]
    if not len(preempted):
        return text + (" Nothing was preempted, so recompute and swap give the same run: fewer KV blocks, a "
                       "bigger model or longer requests put the pool under pressure.")
    mode = first.config.preemption
    cost_of = {"recompute": lambda r: f"{r.recomputed_tokens:,} tokens computed again",
               "swap": lambda r: f"{r.swap_GB:,.1f} GB over the host link"}[mode]
    hit = comparison.requests.loc[comparison.requests["preemptions"] > 0, "request"]
    return text + f" Preempted ({mode}): " + "; ".join(
        f"{name} {int(r.preemptions):,} times, {cost_of(r)}" for name, r in preempted.iterrows()) + (
        f" (requests {hit.min()} to {hit.max()}; the timeline draws them when it draws {hit.max() + 1}). "
        "Switch Preemption to compare recompute with swap.")


METRICS_CAPTION = ("Latencies in ms, p50/p90/p99 over requests (ITL over tokens). Prefix hit rate = prompt tokens "
                   "served from the prefix cache / prompt tokens looked up, once per request at its first admission; "
                   "hits of a request re-admitted after preemption (its own blocks) are counted apart in "
                   "readmit_hit_tokens. Hits are whole blocks and the last prompt token is always computed, so a "
                   "shared prefix shorter than a block never hits.")
RULES_NOTE = ("The simulator follows vLLM 0.33.0's v1 scheduler with its rules on: replayed on 14 recordings of the "
              "real scheduler (7 traces, sync and async), it makes the same grants, preemptions, block ids and prefix "
              "hits at every step (docs/agreement.md). Below: the same workload under the other rules.")

NOTES = """
* **One rule** (vLLM v1): a request has `num_computed_tokens` and `num_tokens`; each step grants tokens under
  the budget, running requests first, then waiting ones (preempted first). Prefill, decode and chunked
  prefill are the same rule with different limits. Static batching admits a new batch only when the last
  one has ended and reserves each member's prompt + output KV up front; the compute of padding slots of
  finished members is not charged (which flatters it).
* **Preemption**: when `KVCacheManager.append` finds no free block, the last admitted running request is
  preempted. *Recompute* frees its blocks and prefills its prompt and generated tokens again later (the
  prefix cache may still hold some); *swap* copies its KV to host memory and back at KV bytes / host link
  bandwidth each way, added to the step. The host pool is unbounded unless sized; a full pool falls back
  to recompute.
* **Step time**: the roofline of `kvcore.sched.cost.CostModel` with N new tokens (prefill chunks + decodes),
  A attention (query, key) pairs (a chunk of q tokens after p cached adds q p + q(q+1)/2, a decode at
  context c adds c + 1) and R KV tokens read; S tokens swapped over the host link.
"""


def cost_caption(cost: CostModel | FittedCost) -> str:
    """The symbols of the step-time formula with this model's and GPU's values (or the fitted coefficients)."""
    if isinstance(cost, FittedCost):
        return (f"Fitted to {cost.name}: a = {cost.intercept_s * 1e3:.2f} ms, b = {cost.per_token_s * 1e6:.1f} us per "
                f"token, c = {cost.per_pair_s * 1e9:.2f} ns per attention pair, d = {cost.per_kv_token_s * 1e9:.2f} ns "
                f"per KV token read (R^2 = {cost.r2:.2f} on its own steps).")
    s, g = cost.shape, cost.gpu
    return (f"P = {s.num_params / 1e9:.2f}B parameters, L = {s.num_layers} layers, H_q = {s.num_q_heads} query "
            f"heads, d = {s.head_dim}; W = {cost.weight_bytes / 1e9:.1f} GB of weights, b_kv = "
            f"{cost.kv_bytes_per_token / 1e3:.0f} kB of KV per token; F = {g.bf16_flops / 1e12:.0f} TFLOP/s at "
            f"eta_F = {cost.flops_efficiency}, B = {g.hbm_bandwidth / 1e12:.2f} TB/s at eta_B = "
            f"{cost.bandwidth_efficiency}, t_0 = {cost.step_overhead_s * 1e3:.1f} ms per step, B_host = "
            f"{g.host_link_bandwidth / 1e9:.0f} GB/s ({g.host_link or 'host link'}).")


def cost_notes(cost: CostModel | FittedCost) -> None:
    """How each step is timed and scheduled: the notes, the step-time formula and its values."""
    st.markdown(NOTES)
    if isinstance(cost, FittedCost):
        st.latex(r"t_{step} = a + b\,N + c\,A + d\,R")
    else:
        st.latex(r"t_{step} = \max\left(\frac{2PN + 4LH_qd\,A}{F\,\eta_F},\ \frac{W + b_{kv}(R + N)}{B\,\eta_B}\right)"
                 r" + t_0 \;+\; \frac{b_{kv}\,S}{B_{host}}")
    st.caption(cost_caption(cost))
