"""Streamlit-cached run of the Continuous batching page: one workload through each chosen scheduler.

Keyed by typed settings: the synthetic workload's :class:`~kvcore.sched.WorkloadConfig` or an uploaded
trace, and the :class:`~kvcore.sched.compare.ServingSetup` the engines share.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import streamlit as st

from kvcore import sched
from kvcore.engine.calibrate import calibrate_engine
from kvcore.sched.compare import ServingSetup
from ui.models import shared_model
from ui.progress import with_progress

# The page's first view: an MHA model whose KV (524 kB per token) fills an H100's pool under a burst of long
# requests, so the schedulers preempt and the preemption mode (recompute or swap) shows what it costs. The
# kvcore defaults (llama-3-8b, GQA: 131 kB per token) peak at 10-19% of the pool and never preempt.
DEFAULT_MODEL = "llama-2-7b"
DEFAULT_WORKLOAD = replace(sched.WorkloadConfig(), rate=32.0, prompt_mean=1024, output_mean=512)
# Next to the GPU presets: step times fitted to the lab's engine serving the bundled model on this machine.
CALIBRATED = "engine on this machine (calibrated)"
CALIBRATED_BLOCKS = 4096  # its pool when the page's KV blocks are left at 0 (a fit knows no GPU memory)


@st.cache_resource(show_spinner=False)
def calibrated_cost() -> sched.FittedCost:
    """The engine's step time on this machine: the bundled model on one torch thread, calibrated once per
    server on a designed grid of steps (:func:`kvcore.engine.calibrate.calibrate_engine`)."""
    shared = shared_model()
    with shared.lock:
        return with_progress("Calibrating the engine on a grid of steps...", lambda bar: calibrate_engine(
            shared.model, threads=1, name="the bundled model's engine on this machine", progress=bar))


def setup_for(setup: ServingSetup) -> ServingSetup:
    """``setup`` with the calibrated engine's cost (and a pool) when its GPU is the calibrated engine."""
    if setup.gpu != CALIBRATED:
        return setup
    return replace(setup, cost=calibrated_cost(), num_blocks=setup.num_blocks or CALIBRATED_BLOCKS)


@dataclass(slots=True, frozen=True)
class UploadedTrace:
    """A trace CSV as uploaded, with the prefix length and seed its token ids are drawn with."""

    csv: bytes
    prefix_tokens: int = 0
    seed: int = 0

    def workload(self) -> sched.Workload:
        return sched.parse_trace(self.csv, self.prefix_tokens, self.seed)


@st.cache_data(show_spinner=False, max_entries=32)
def run(workload: sched.WorkloadConfig | UploadedTrace, setup: ServingSetup) -> sched.Comparison:
    """Simulate the workload under each scheduler of ``setup`` (its cost already resolved by :func:`setup_for`);
    the progress bar is cached with the result."""
    wl = workload.workload() if isinstance(workload, UploadedTrace) else sched.make_workload(workload)
    configs = setup.configs()
    return with_progress("Simulating...", lambda cb: sched.compare(wl, configs, lambda f: cb(f, "Simulating...")))
