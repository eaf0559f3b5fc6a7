"""Streamlit-cached runs of the Serving engine page: one engine experiment, keyed by the model name and the
workload and engine settings dataclasses (timings describe the machine when they ran, so a result is kept ten
minutes only), and the engine's calibration, made once per model, block size and thread count. Every use of
the model holds its lock."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from kvcore.engine.calibrate import calibrate_engine
from kvcore.engine.experiment import EngineSettings
from kvcore.engine.report import EngineReport, check_page_limits, engine_report, predict_run
from kvcore.engine.workload import ServeWorkload
from kvcore.sched.cost import FittedCost
from ui.models import shared_model
from ui.progress import with_progress


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def report(model: str, workload: ServeWorkload, settings: EngineSettings, transformers: bool) -> EngineReport:
    """Serve the workload on the engine (and on transformers, interleaved), snapshot the pool."""
    shared = shared_model(model)
    check_page_limits(shared.model, workload, settings, transformers)
    with shared.lock:
        return with_progress("Serving...", lambda bar: engine_report(shared.model, shared.tokenizer, workload,
                                                                     settings, transformers, bar))


@st.cache_resource(max_entries=4, show_spinner=False)
def calibration(model: str, block_size: int, threads: int | None) -> FittedCost:
    """The engine's step time on this machine, fitted once on a designed grid of steps (it never sees a run the
    page shows)."""
    shared = shared_model(model)
    with shared.lock:
        return with_progress("Calibrating the simulator on a grid of engine steps (once per model)...",
                             lambda bar: calibrate_engine(shared.model, block_size=block_size, threads=threads,
                                                          name=f"{model}'s engine on this machine", progress=bar))


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def prediction(model: str, workload: ServeWorkload, settings: EngineSettings, _run: EngineReport,
               run_key: str) -> pd.DataFrame:
    """The calibrated simulator's prediction of the shown run (``run_key``: when it was measured)."""
    shared = shared_model(model)
    cost = calibration(model, settings.block_size, settings.threads)
    return predict_run(_run, shared.model, shared.tokenizer, workload, settings, cost)
