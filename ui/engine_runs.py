"""Streamlit-cached run of the Serving engine page: one engine experiment, keyed by the model name and the
workload and engine settings dataclasses. Timings describe the machine when they ran, so a result is kept
ten minutes only; every use of the model holds its lock."""

from __future__ import annotations

import streamlit as st

from kvcore.engine.experiment import EngineSettings
from kvcore.engine.report import EngineReport, check_page_limits, engine_report
from kvcore.engine.workload import ServeWorkload
from ui.models import shared_model
from ui.progress import with_progress


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def report(model: str, workload: ServeWorkload, settings: EngineSettings, transformers: bool) -> EngineReport:
    """Serve the workload on the engine (and on transformers), snapshot the pool, fit and predict."""
    shared = shared_model(model)
    check_page_limits(shared.model, workload, settings, transformers)
    with shared.lock:
        return with_progress("Serving...", lambda bar: engine_report(shared.model, shared.tokenizer, workload,
                                                                     settings, transformers, bar))
