"""Cached runs of the Eviction page: the full-cache reference of a text, and each policy run.

A run is measured once per setting (keyed by the text and its :class:`~kvcore.eviction.evaluate.RunSpec`) and
kept on disk across server restarts (:mod:`ui.disk_cache`: keyed by the settings, the weights and the code),
so a view that adds a policy or a budget only runs what is new; a sweep's tables, verdicts and maps (its
summary, all but the step times) are kept on disk the same way, so a view someone saw before needs neither the
model nor the reference pass. Decode step times are measured apart and kept for :data:`RUN_TTL_S` seconds only: a
later visitor gets speeds measured under the load of their own time, not of the first visit's. Every use of the
model holds its lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
import torch

from kvcore.eviction.claims import COLUMNS
from kvcore.eviction.evaluate import (
    EvictionConfig,
    EvictionResults,
    RunSpec,
    model_claims,
    run_key,
    summarize,
    with_speeds,
)
from kvcore.eviction.reference import Reference, reference_pass
from kvcore.eviction.runner import RunResult
from kvcore.models.loader import BUNDLED_NAME, model_name
from kvcore.models.runtime import text_ids
from ui import background, disk_cache
from ui.models import SharedModel, shared_model
from ui.progress import Progress, progress_bar

RUN_TTL_S = 900
# CPU threads of the reference pass and of each run's measurement. On SmolLM2 the default view's 8 runs took 9.1 s at
# one thread and 6.4 s at two on a quiet 2-core machine (same NLL to 6 decimals), but in the page benchmark, with work
# behind another page on one core, two threads made the view slower (15.2 -> 18.2 s new, rerotate 17.6 -> 28.9 s):
# one thread. Part of a run's key: a thread count may change the last bits.
THREADS = 1
MODULES = ("kvcore.eviction.evaluate",)  # what a run executes (their import closure keys the disk cache)


@dataclass(slots=True, frozen=True)
class EvictionText:
    """What a sweep streams: a model (bundled, Hub name or folder), a text, and how many of its tokens."""

    model: str
    text: str
    max_tokens: int

    def __post_init__(self) -> None:  # one cache entry per model, however the URL spells it
        object.__setattr__(self, "model", model_name(self.model))


def _ids(shared: SharedModel, source: EvictionText) -> torch.Tensor:
    return text_ids(shared.model, shared.tokenizer, source.text, source.max_tokens)


@st.cache_resource(max_entries=4, show_spinner=False)
def reference(source: EvictionText, _model: SharedModel | None = None) -> Reference:
    """The text through the full cache once (what every run is measured against). _model: a copy of the source's
    model to run it on (the warm-up's own); by default the shared one."""
    shared = _model or shared_model(source.model)
    with shared.lock:
        return reference_pass(shared.model, _ids(shared, source), threads=THREADS)


@st.cache_resource(max_entries=4, show_spinner=False)
def reference_claims(source: EvictionText, _model: SharedModel | None = None) -> list[dict[str, Any]]:
    """Attention sinks and Knorm's premise, measured on the text's reference (they depend on nothing else)."""
    return model_claims(reference(source, _model))


def measure_run(source: EvictionText, spec: RunSpec, progress: Progress | None = None,
                model: SharedModel | None = None) -> RunResult:
    """One policy at one budget on the text, all but its step times: from disk, or measured now and kept.

    model: a private copy of the source's model to measure with (the background warm-up's, so it never holds the
    shared model's lock for long); by default the shared one. Either gives the same numbers.
    """
    def compute(report: Progress) -> RunResult:
        shared = model or shared_model(source.model)
        with shared.lock:
            return spec.measure(shared.model, reference(source, model), THREADS)
    return disk_cache.computed(*_run_key(source, spec), compute, progress)


def _run_key(source: EvictionText, spec: RunSpec) -> tuple[object, ...]:
    return "eviction-run", (source, spec, THREADS), MODULES, disk_cache.weights_key(source.model)


@dataclass(slots=True, frozen=True)
class Summary:
    """A sweep's results without step times (:func:`kvcore.eviction.evaluate.summarize` of its untimed runs), and
    each run's ``run_key`` in the order of ``config.runs()`` (where its step times go)."""

    results: EvictionResults
    keys: tuple[str, ...]


def _summary_key(source: EvictionText, config: EvictionConfig) -> tuple[object, ...]:
    return "eviction-summary", (source, config, THREADS), MODULES, disk_cache.weights_key(source.model)


def kept_summary(source: EvictionText, config: EvictionConfig) -> Summary | None:
    """The sweep's summary when it is kept (memory or disk), else None (nothing is computed)."""
    return disk_cache.kept(*_summary_key(source, config))


def summary(source: EvictionText, config: EvictionConfig, model: SharedModel | None = None,
            progress: Progress | None = None) -> Summary:
    """The sweep's summary: kept, or gathered now from the reference and every run (each from disk when kept,
    else measured) and kept. model: a copy of the source's model to compute with (the warm-up's own); by default
    the shared one."""
    def compute(report: Progress) -> Summary:
        specs, runs = config.runs(), []
        report(0.0, "Full-cache reference pass...")
        ref = reference(source, model)
        for i, spec in enumerate(specs):
            report(0.05 + 0.95 * i / len(specs), f"Measuring {spec.label} ({i + 1}/{len(specs)})")
            runs.append(measured(source, spec) if model is None else measure_run(source, spec, model=model))
        tokenizer = (model or shared_model(source.model)).tokenizer
        return Summary(summarize(ref, runs, config, tokenizer, reference_claims(source, model)),
                       tuple(run_key(r) for r in runs))

    return disk_cache.computed(*_summary_key(source, config), compute, progress)


def runs_behind(source: EvictionText) -> bool:
    """Whether a sweep's runs are measured behind the page: on any model but the bundled one (whose default runs take
    about 2 s; SmolLM2's 8 take about 10 s, more under load), when the server works behind its pages."""
    return source.model != BUNDLED_NAME and background.enabled()


def _measure_behind(source: EvictionText, config: EvictionConfig, bar: Progress) -> None:
    specs = config.runs()
    for i, spec in enumerate(specs):
        background.pages_first()  # a visitor's page goes between the runs
        bar(i / len(specs), f"{spec.label} ({i + 1}/{len(specs)})")
        measure_run(source, spec)
    background.pages_first()
    bar(1.0, "the summary of every run")
    summary(source, config)


def reference_verdicts(source: EvictionText) -> pd.DataFrame:
    """The claims the reference alone decides (attention sinks, Knorm's premise), as rows of the verdicts."""
    return pd.DataFrame(reference_claims(source), columns=list(COLUMNS))


@st.cache_data(max_entries=256, show_spinner=False)
def measured(source: EvictionText, spec: RunSpec) -> RunResult:
    """:func:`measure_run`, kept in memory too."""
    return measure_run(source, spec)


Times = tuple[np.ndarray, float]  # a run's decode step times (ms) and the load average then
_times: background.Expiring[Times] = background.Expiring(RUN_TTL_S, 256)  # by (source, spec)


def kept_times(source: EvictionText, spec: RunSpec) -> Times | None:
    """The run's step times when they were taken less than :data:`RUN_TTL_S` seconds ago, else None."""
    return _times.get((source, spec))


def step_times(source: EvictionText, spec: RunSpec, _model: SharedModel | None = None) -> Times:
    """Real decode steps of the run (:meth:`RunSpec.time_steps`) and the load average then: kept, or timed now and
    kept for :data:`RUN_TTL_S` s. _model: a copy of the source's model to time them on (the warm-up's own); by
    default the shared one."""
    if (kept := kept_times(source, spec)) is not None:
        return kept
    shared = _model or shared_model(source.model)
    with shared.lock:  # the text's tokens only: no reference pass
        times = spec.time_steps(shared.model, _ids(shared, source))
    _times.put((source, spec), times)
    return times


def forget_times() -> None:
    """Drop every kept step time (tests; the next view times its runs again)."""
    _times.clear()


def time_runs(source: EvictionText, specs: list[RunSpec], model: SharedModel | None = None,
              progress: Progress | None = None, behind: bool = False) -> list[Times]:
    """:func:`step_times` of every run, saying which it is timing. behind: timed behind a page, so a visitor's page
    goes first between the runs (:func:`ui.background.pages_first`)."""
    timed = []
    for i, spec in enumerate(specs):
        if behind:
            background.pages_first()
        if progress is not None:
            progress(i / len(specs), f"{spec.label} ({i + 1}/{len(specs)})")
        timed.append(step_times(source, spec, model))
    return timed


def sweep(source: EvictionText, config: EvictionConfig, model: SharedModel | None = None) -> EvictionResults | None:
    """Every run of ``config`` on the text gathered into tables (:func:`summary`, under a progress bar when it is
    not kept); their decode steps are timed behind the page when the server works behind its pages
    (:func:`ui.background.computed_behind`: the speed columns fill in), here otherwise. On a model whose runs take
    longer than a view (:func:`runs_behind`) a summary not kept is gathered behind the page: None until it is,
    while a bar follows it.

    model: a copy of the source's model to compute with (the warm-up's own, so it never holds the shared one's
    lock; it times here); by default the shared one. Either gives the same numbers."""
    specs = config.runs()
    if model is None and runs_behind(source):
        measuring = f"Measuring each run against the full cache on {source.model}"
        gathered = background.computed_behind(("eviction runs", source, tuple(specs)), measuring,
                                              lambda: kept_summary(source, config),
                                              lambda bar: _measure_behind(source, config, bar))
        if gathered is None:
            return None
    else:
        with progress_bar() as bar:  # drawn only when the summary is not kept (computed for more than a moment)
            gathered = summary(source, config, model, bar)
    if model is not None:
        timed = time_runs(source, specs, model)
    else:
        def kept() -> list[Times] | None:
            times = [kept_times(source, spec) for spec in specs]
            return None if any(t is None for t in times) else times

        timed = background.computed_behind(("eviction timing", source, tuple(specs)),
                                           "Timing the decode steps of each run", kept,
                                           lambda bar: time_runs(source, specs, progress=bar, behind=True), timing=True)
    if timed is None:
        return gathered.results
    return with_speeds(gathered.results, dict(zip(gathered.keys, timed, strict=True)))
