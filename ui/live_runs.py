"""Runs of the Live model page: generations kept per model and shared by every session, streamed when new.

A generation streams its text onto the page the first time; finished runs are kept (the last
``MAX_RUNS`` per model) and reused by reruns and other sessions. Every use of the model holds its lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import streamlit as st
import torch

from kvcore.models.attention import AttentionPatterns
from kvcore.models.generate import GenerationSettings, PhaseTiming, compare_to_full, time_generation
from kvcore.models.live import LiveRun, layer_map, run_attention, run_live, step_view, stream_run
from kvcore.models.plan import CachePlan
from kvcore.models.steps import StepView
from kvcore.plans import make_plan
from ui.guard import user_errors
from ui.models import SharedModel
from ui.progress import progress_bar

MAX_RUNS = 24  # finished runs kept per model
TIMING_TTL_S = 300  # a timing is re-measured after this long: it says what the machine did then, not forever


@dataclass(slots=True, frozen=True)
class LiveRequest:
    """One generation: the prompt, the sampling settings and the cache plan (budget and positions only for an
    eviction plan; :meth:`of` drops them otherwise, so equal runs share one key)."""

    prompt: str
    max_new_tokens: int
    temperature: float
    seed: int
    plan: str = "full"
    budget: int = 0
    positions: str = "original"

    @classmethod
    def of(cls, prompt: str, max_new_tokens: int, temperature: float, seed: int, plan: str, budget: int,
           positions: str) -> LiveRequest:
        evicting = plan.startswith("evict:")
        return cls(prompt, max_new_tokens, temperature, seed, plan, budget if evicting else 0,
                   positions if evicting else "original")

    @property
    def full(self) -> LiveRequest:
        """The same generation with the full cache."""
        return replace(self, plan="full", budget=0, positions="original")

    def settings(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed)

    def cache_plan(self) -> CachePlan:
        return make_plan(self.plan, self.budget, self.positions)


@st.cache_resource(max_entries=2, show_spinner=False)
def finished_runs(name: str) -> OrderedDict:
    """Finished generations (and comparisons) by request, per model."""
    return OrderedDict()


def _keep(shared: SharedModel, key: object, value: object) -> None:
    runs = finished_runs(shared.name)
    with shared.lock:  # runs are shared by every session: write and trim them together
        runs[key] = value
        while len(runs) > MAX_RUNS:
            runs.popitem(last=False)


def _kept(shared: SharedModel, key: object) -> object | None:
    with shared.lock:
        return finished_runs(shared.name).get(key)


def generation(shared: SharedModel, request: LiveRequest, stream: bool) -> LiveRun:
    """The run of ``request``: kept, or generated now (its text streamed onto the page when ``stream``)."""
    run = _kept(shared, request)
    if run is not None:
        if stream:
            st.markdown(run.text)
        return run
    with shared.lock, user_errors("Generation"):
        settings, plan = request.settings(), request.cache_plan()
        if stream:
            sink: list[LiveRun] = []
            st.write_stream(stream_run(shared.model, shared.tokenizer, request.prompt, settings, plan, sink))
            run = sink[0]
        else:
            run = run_live(shared.model, shared.tokenizer, request.prompt, settings, plan)
        _keep(shared, request, run)
    return run


def comparison(shared: SharedModel, request: LiveRequest, full: LiveRun) -> pd.DataFrame:
    """The full cache's tokens scored through both caches (teacher forcing), kept like the runs."""
    key = ("vs", request)
    table = _kept(shared, key)
    if table is None:
        with shared.lock, user_errors("Comparison"):
            table = compare_to_full(shared.model, shared.tokenizer, request.prompt, request.settings(),
                                    request.cache_plan(), full.table)
            _keep(shared, key, table)
    return table


def step_timing(shared: SharedModel, request: LiveRequest, run: LiveRun) -> tuple[PhaseTiming, float]:
    """Prefill and decode ms of ``run`` through its plan in interleaved rounds, warmed up and repeated
    (:func:`time_generation`), and how many seconds ago they were measured; kept for :data:`TIMING_TTL_S` s only
    (a timing says what the machine did then), measured under a progress bar when due."""
    key = ("timing", request)
    kept = _kept(shared, key)
    if kept is None or time.time() - kept[1] > TIMING_TTL_S:
        with user_errors("Timing"), progress_bar(show_after_s=0.0) as bar, shared.lock:
            bar(0.5, "Timing prefill and decode: interleaved rounds, repeated...")
            kept = (time_generation(shared.model, run.ids, run.prompt_len, request.cache_plan()), time.time())
        _keep(shared, key, kept)
    return kept[0], time.time() - kept[1]


@st.cache_resource(max_entries=8, show_spinner=False)
def _attention(name: str, request: LiveRequest, _shared: SharedModel, _run: LiveRun) -> torch.Tensor:
    with _shared.lock:
        return run_attention(_shared.model, _run)


def attention(shared: SharedModel, request: LiveRequest, run: LiveRun, layer: int, head: int | None) -> np.ndarray:
    """``[T, T]`` full-cache attention of one layer (``head`` None: heads averaged) over the run of ``request``;
    every layer is captured once per run (one forward) and kept."""
    with user_errors("Attention"):
        return layer_map(_attention(shared.name, request, shared, run), layer, head)


@st.cache_data(max_entries=64, show_spinner=False)
def steps_view(name: str, request: LiveRequest, layer: int, head: int | None, thresholds: AttentionPatterns,
               steps: tuple[int, ...], _run: LiveRun, _attn: np.ndarray) -> StepView:
    """Steps ``steps`` of the run of ``request`` seen through layer ``layer`` / ``head`` (computed once each)."""
    return step_view(_run, _attn, thresholds, steps)
