"""The cached run of the serving-config search, a section of the Continuous batching page.

The search is :func:`kvcore.study.search.search` on the sweep engine, in this process; the page bounds it so it
answers within about 30 s here: at most ``MAX_CONFIGS`` configurations, the first ``MAX_REQUESTS`` requests of the
workload, ``PROBES`` rates per capacity round. The section's widgets and drawing are in :mod:`ui.search_figures`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import streamlit as st

from kvcore import sched
from kvcore.sched.compare import ServingSetup
from kvcore.study.search import SLO, Deployment, SearchResult, SearchSpace, scale_arrivals, search
from ui.batching_runs import UploadedTrace
from ui.progress import with_progress

MAX_CONFIGS = 16  # each simulation of the page's default workload takes about 1 s here
MAX_REQUESTS = 200
PROBES = 2


@dataclass(slots=True, frozen=True)
class SearchRequest:
    """What the section asks: the grid, the SLOs, the latency of the Pareto front, and the arrival rate searched
    as a multiple of the workload's (``rate_scale``; the same requests arriving that many times as fast)."""

    space: SearchSpace
    slo: SLO
    latency: str
    rate_scale: float = 1.0


def deployment_of(setup: ServingSetup) -> Deployment:
    """What every searched configuration shares with the page's engines: model, GPU or fitted cost, pool, rules."""
    return Deployment(setup.model, setup.gpu, setup.cost, setup.num_blocks, setup.rules)


def bounded_workload(source: sched.WorkloadConfig | UploadedTrace, rate_scale: float = 1.0
                     ) -> tuple[sched.Workload, float | None]:
    """The page's workload cut to its first ``MAX_REQUESTS`` requests with its arrivals ``rate_scale`` times as
    dense, and its arrival rate (None: a trace, whose rate is measured from its arrivals)."""
    if isinstance(source, UploadedTrace):
        full = source.workload()
        if len(full.requests) > MAX_REQUESTS:
            prompts = None if full.prompts is None else full.prompts[:MAX_REQUESTS]
            full = replace(full, requests=full.requests[:MAX_REQUESTS], prompts=prompts)
        return scale_arrivals(full, rate_scale), None
    config = replace(source, num_requests=min(source.num_requests, MAX_REQUESTS))
    return scale_arrivals(sched.make_workload(config), rate_scale), config.rate * rate_scale


@st.cache_data(show_spinner=False, max_entries=16)
def run_search(source: sched.WorkloadConfig | UploadedTrace, deployment: Deployment,
               request: SearchRequest) -> SearchResult:
    """The bounded search of the page's workload; the progress bar is cached with the result."""
    workload, rate = bounded_workload(source, request.rate_scale)
    total = len(request.space.configs()) + 2 * PROBES
    done = [0]

    def go(callback) -> SearchResult:
        def step(_result) -> None:
            done[0] += 1
            callback(done[0] / total, f"Searching: {done[0]} simulations")
        return search(workload, deployment, request.space, request.slo, rate=rate, latency=request.latency,
                      probes=PROBES, on_result=step)
    return with_progress("Searching serving configurations...", go)
