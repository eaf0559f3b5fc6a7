"""Streamlit-cached run of the Continuous batching page: one workload through each chosen scheduler."""

from __future__ import annotations

import streamlit as st

from kvcore import sched
from kvcore.shapes import GPU_PRESETS, PRESETS
from ui.progress import with_progress


@st.cache_data(show_spinner=False, max_entries=32)
def run(workload: dict, trace: bytes | None, model: str, gpu: str, engine: dict, policies: tuple[str, ...],
        budget: int, chunk_budget: int) -> sched.Comparison:
    """Simulate the workload (``WorkloadConfig`` fields, or ``trace`` CSV bytes) under each scheduler in ``policies``.

    engine: ``SimConfig`` fields besides the cost model; budget, chunk_budget: token budgets per step (continuous,
    chunked prefill). The progress bar is cached with the result.
    """
    wl = (sched.parse_trace(trace, workload["prefix_tokens"], workload["seed"]) if trace
          else sched.make_workload(sched.WorkloadConfig(**workload)))
    base = sched.SimConfig(sched.CostModel(PRESETS[model], GPU_PRESETS[gpu]), **engine)
    configs = sched.engine_configs(base, policies, budget=budget, chunk_budget=chunk_budget)
    return with_progress("Simulating...", lambda cb: sched.compare(wl, configs, lambda f: cb(f, "Simulating...")))
