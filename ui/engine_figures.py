"""Figures of the Serving engine page: the run's metrics, the measured step timeline, the block pool at a step, and
the section that sets the calibrated simulator against the run. Styled through :func:`ui.figures.style`."""

from __future__ import annotations

import time

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from kvcore.engine.calibrate import coefficients_table
from kvcore.engine.experiment import EngineSettings
from kvcore.engine.report import EngineReport
from kvcore.engine.workload import ServeWorkload
from kvcore.noise import WITHIN_NOISE, Interval, load_note
from kvcore.sched.cost import FittedCost
from ui import background, engine_runs, tables
from ui.engine_runs import Calibration, CalibrationKey
from ui.figures import PALETTE, round_ticks, style
from ui.format import bytes_str
from ui.guard import user_errors
from ui.tables import shown_text

POOL_COLUMNS = 32  # blocks per row of the pool map
FREE_CACHED, SHARED, FREE = "#BBBBBB", "#000000", "#EEEEEE"


def speedup_note(speedup: Interval | None) -> str | None:
    """The engine's throughput over transformers', run by run: the median with its min-max, or "within noise"
    when the runs disagree on which is faster."""
    if speedup is None:
        return None
    if speedup.versus(1.0) == WITHIN_NOISE:
        return f"≈ hf ({speedup.low:.1f}-{speedup.high:.1f}x)"
    return f"{speedup.estimate:.2f}x ({speedup.low:.2f}-{speedup.high:.2f})"


def run_metrics(report: EngineReport) -> None:
    """Throughput, TTFT and TPOT of the engine (and its ratio to transformers), the pool, the prefix hits.

    Throughput, TTFT and TPOT are the medians of the engine's interleaved runs (the systems table's numbers)."""
    engine = report.summary.iloc[0]
    versus = speedup_note(report.speedup)
    hits, steps = int(report.requests["prefix_hit_tokens"].sum()), report.steps

    def shown(column: str) -> str:  # the engine's value as the systems table shows it: one number, one format
        return shown_text(report.summary[column])

    values = {
        "Output tokens/s": (f"{engine.output_tok_per_s:,.0f}", versus),
        "TTFT p50": (f"{shown('ttft_ms_p50')} ms", f"p99 {shown('ttft_ms_p99')} ms"),
        "TPOT p50": (f"{shown('tpot_ms_p50')} ms", f"p99 {shown('tpot_ms_p99')} ms"),
        "Peak KV blocks": (f"{int(steps['kv_blocks_used'].max())} / {report.num_blocks - 1}",
                           f"pools {bytes_str(report.kv_bytes)}"),
        "Prefix-cache hits": (f"{hits:,} tokens", f"{int(steps['batch_tokens'].sum()):,} computed"),
    }
    runs = int(engine.runs)
    helps = {"Output tokens/s": f"median of {runs} engine run{'s' * (runs > 1)}" + (
        f"; below, the engine's throughput over transformers' generate (hf) run by run, {runs} interleaved pairs: "
        "median (min-max), or ≈ when the runs disagree on which is faster (within noise)"
        if report.speedup is not None else "")}
    changed = report.speedup is not None and report.speedup.versus(1.0) != WITHIN_NOISE
    for col, (label, (value, note)) in zip(st.columns(len(values)), values.items(), strict=True):
        # only a ratio to transformers beyond its noise is a change; the other notes (p99, pool bytes, tokens)
        # and a ratio within noise get no arrow
        arrow = "auto" if label == "Output tokens/s" and changed else "off"
        col.metric(label, value, note, delta_color="off", delta_arrow=arrow, help=helps.get(label))


def measured_note(report: EngineReport, comparing: bool = False) -> str:
    """When and how the timings were taken, and which run the step-by-step views show; comparing: transformers'
    runs are being measured behind the page (this report is one engine run until they are done)."""
    runs = int(report.summary.iloc[0].runs)
    repeats = (f"{runs} runs per system, interleaved (engine, transformers, engine...) so that a passing load "
               "hits both; the steps, pool, requests and the simulator below are the engine's first run"
               if report.speedup is not None else "one engine run")
    if comparing:
        repeats += (" while the interleaved runs of both systems are measured behind the page (the bar above): the "
                    "whole view is then drawn from them")
    return (f"Measured {report.measured_at} on this machine (1-minute load average {report.load_average:.2f}; "
            f"other sessions and processes slow it), one torch thread per system, {repeats}; kept 10 minutes.")


def prediction_caption(cost: FittedCost) -> str:
    """What predicted the run, and how far the calibration can be trusted."""
    return (f"The simulator serving the same requests with the engine's settings (the same scheduler makes the "
            f"same steps), its step time from {cost.name}: calibrated once on a grid of {cost.grid_steps} engine "
            f"steps (decode batches at short to long contexts, prefill chunks, mixed steps) that never saw this "
            f"run; on grid steps held out of the fit it was off by {cost.held_out_error:.0%} (median). Measured: "
            "the engine's first run above.")


def calibration_note(calibration: Calibration) -> str:
    """When, how long and under what load the calibration was taken, and by whom; that it is this server's."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(calibration.measured_at))
    return (f"Calibrated {when} in {calibration.seconds:.1f} s by {calibration.by} "
            f"({load_note(calibration.load_before)} as it started, {calibration.load_after:.1f} as it ended; other "
            "work on the machine slows the steps it times). A measurement of this machine: kept in this server's "
            "memory only, never on disk, so a restarted server calibrates again.")


OFF_NOTE = ("The default view's calibration is measured by the server's background warm-up, which is off here "
            "(KVLAB_WARMUP=0): calibrate now (a few seconds), or change a setting.")


def measured_vs_simulated(model: str, workload: ServeWorkload, settings: EngineSettings, run: EngineReport,
                          shown: dict[str, object]) -> None:
    """The calibrated simulator's prediction of the run beside what was measured, and the calibration's terms.

    The default view's calibration comes from the background warm-up, other settings' from a thread started when
    they are picked: while it is measured, a progress bar follows it and the section fills in by itself. Without
    background work (``KVLAB_WARMUP=0``) other settings calibrate in the page, under a progress bar."""
    key = CalibrationKey(model, settings.block_size, settings.threads)
    with user_errors("Simulator"):
        calibration = engine_runs.calibrated(key)
        if calibration is None and key == engine_runs.DEFAULT_CALIBRATION:  # the warm-up's to measure
            pending = background.Pending(lambda: engine_runs.calibrated(key), lambda: engine_runs.calibrating(key),
                                         background.CALIBRATION, "Calibrating the simulator on a grid of engine steps")
            if not background.wait_for(pending, "Calibrate now", "eg_calibrate", OFF_NOTE):
                return
            calibration = engine_runs.calibration(key)
        elif calibration is None:  # other settings: measured behind the page, which follows it
            calibration = engine_runs.calibrated_behind(key)
            if calibration is None:
                return
        predicted = engine_runs.prediction(model, workload, settings, run, run.measured_at, calibration.cost,
                                           calibration.measured_at)
    st.caption(prediction_caption(calibration.cost))
    st.caption(calibration_note(calibration))
    tables.show_table(coefficients_table(calibration.cost), "engine", "fit", shown)
    tables.show_table(predicted, "engine", "prediction", shown)


def step_timeline(steps: pd.DataFrame) -> go.Figure:
    """Tokens each step computed (prefill vs decode), its measured time, and the KV blocks held."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.65, 0.35],
                        specs=[[{"secondary_y": True}], [{}]],
                        subplot_titles=("tokens per step and measured step time", "KV blocks held"))
    for i, (column, name) in enumerate((("prefill_tokens", "prefill tokens"), ("decode_tokens", "decode tokens"))):
        fig.add_trace(go.Bar(x=steps["step"], y=steps[column], name=name, marker_color=PALETTE[1 - i]), row=1, col=1)
    fig.add_trace(go.Scatter(x=steps["step"], y=steps["step_s"] * 1e3, name="step time (ms)", mode="lines",
                             line={"color": PALETTE[3], "width": 2}), row=1, col=1, secondary_y=True)
    fig.add_trace(go.Scatter(x=steps["step"], y=steps["kv_blocks_used"], name="blocks held", mode="lines",
                             line={"color": PALETTE[2], "width": 2, "shape": "hv"}), row=2, col=1)
    fig.update_layout(barmode="stack", bargap=0.05)
    fig.update_yaxes(title_text="tokens", row=1, col=1, secondary_y=False)
    ticks = round_ticks(0.0, float(steps["step_s"].max() * 1e3) if len(steps) else 1.0)
    fig.update_yaxes(title_text="ms", row=1, col=1, secondary_y=True, range=[0, ticks[-1]], tickmode="array",
                     tickvals=ticks, showgrid=False)  # round ms, not ticks aligned to the tokens' grid
    fig.update_yaxes(title_text="blocks", row=2, col=1, rangemode="tozero")
    fig.update_xaxes(title_text="engine step", row=2, col=1)
    return style(fig, "Every step, as measured", height=520)


def pool_map(pool: pd.DataFrame, num_blocks: int, step: int) -> go.Figure:
    """The pool after ``step``: each block a square, coloured by its first owner; black = shared (ref_cnt > 1),
    grey = free but still cached (its hash can be hit), faint = free and never cached. Block 0 is the null block."""
    at = pool[pool["step"] == step]
    owner = at["owners"].str.split().str[0].fillna("")
    color = [SHARED if r > 1 else FREE_CACHED if r == 0 else PALETTE[int(o.lstrip("r").split("/")[0] or 0)
                                                                     % len(PALETTE)]
             for r, o in zip(at["ref_cnt"], owner, strict=True)]
    every = pd.Series(range(num_blocks))
    fig = go.Figure(go.Scatter(x=every % POOL_COLUMNS, y=every // POOL_COLUMNS, mode="markers", hoverinfo="skip",
                               marker={"symbol": "square", "size": 13, "color": FREE, "line": {"width": 0}}))
    fig.add_trace(go.Scatter(
        x=at["block"] % POOL_COLUMNS, y=at["block"] // POOL_COLUMNS, mode="markers",
        marker={"symbol": "square", "size": 13, "color": color, "line": {"width": 0}},
        customdata=at[["block", "ref_cnt", "owners", "hash"]].to_numpy(),
        hovertemplate="block %{customdata[0]}<br>ref_cnt %{customdata[1]}<br>owners: %{customdata[2]}"
                      "<br>hash %{customdata[3]}<extra></extra>"))
    rows = -(-num_blocks // POOL_COLUMNS)
    fig.update_xaxes(range=[-1, POOL_COLUMNS], showticklabels=False, showgrid=False, zeroline=False,
                     title_text=f"block id mod {POOL_COLUMNS}")
    fig.update_yaxes(range=[rows, -1], showgrid=False, zeroline=False, title_text=f"block id // {POOL_COLUMNS}")
    title = (f"Block pool after step {step}: {int((at['ref_cnt'] > 0).sum())} held, "
             f"{int((at['ref_cnt'] > 1).sum())} shared, {int((at['ref_cnt'] == 0).sum())} free but cached")
    return style(fig, title, height=max(300, 26 * min(rows, 40) + 110), legend=False)
