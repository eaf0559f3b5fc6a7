"""Runs of the Serving engine page: one engine experiment, keyed by the model name and the workload and engine
settings dataclasses (timings describe the machine when they ran, so a result is kept ten minutes only), and the
engine's calibration, made once per model, block size and thread count and kept in this server's memory only (a
measurement of this machine, never written to disk), with when, how long and under what load it was taken. The
default view's calibration is measured by the background warm-up (:func:`ui.warm_defaults.warm_calibration`),
other settings' behind the page (:func:`calibrated_behind`). Every use of the model holds its lock (a calibration
and the serving runs behind a page take it step by step or run by run)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import pandas as pd
import streamlit as st

from kvcore.engine.calibrate import calibrate_engine
from kvcore.engine.experiment import EngineSettings
from kvcore.engine.report import EngineReport, check_page_limits, engine_report, predict_run
from kvcore.engine.workload import ServeWorkload
from kvcore.models.loader import BUNDLED_NAME, model_name
from kvcore.noise import load_average
from kvcore.sched.cost import FittedCost
from ui import background, disk_cache
from ui.models import SharedModel, shared_model
from ui.progress import Progress, progress_bar, with_progress

MODULES = ("kvcore.engine.calibrate",)
BY_WARMUP = "the server's background warm-up, as the server started"
BY_PAGE = "this page, when a visitor asked for it"
KEPT_CALIBRATIONS = 8


@dataclass(slots=True, frozen=True)
class CalibrationKey:
    """What a calibration is made for: a model, the engine's block size and its torch threads."""

    model: str
    block_size: int
    threads: int | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", model_name(self.model))


# The page's default view: the bundled model at the engine's default block size and threads.
DEFAULT_CALIBRATION = CalibrationKey(BUNDLED_NAME, EngineSettings().block_size, EngineSettings().threads)


@dataclass(slots=True, frozen=True)
class Calibration:
    """A calibration and the conditions it was taken under. measured_at: when it ended (Unix seconds); seconds:
    how long it ran; load_before / load_after: the machine's 1-minute load average as it started and ended; by:
    who asked for it (the warm-up or a visit)."""

    cost: FittedCost
    measured_at: float
    seconds: float
    load_before: float
    load_after: float
    by: str


_kept: OrderedDict[CalibrationKey, Calibration] = OrderedDict()
_kept_lock = threading.Lock()


# The workload each model's view opens on (URL keys of the Serving engine page): the bundled model's, and for
# SmolLM2 (23x its parameters) one that stays inside the page's work limit with transformers beside the engine.
WORKLOAD_DEFAULTS = {"eg_n": 16, "eg_pmax": 128, "eg_omax": 32}
MODEL_WORKLOADS = {"smollm2-135m": {"eg_n": 4, "eg_pmax": 64, "eg_omax": 32}}


def workload_defaults(model: str) -> dict[str, int]:
    """The Serving engine page's workload defaults for ``model`` (the bundled model's for any model not listed)."""
    return WORKLOAD_DEFAULTS | MODEL_WORKLOADS.get(model, {})


def choose_model_workload(model_key: str = "eg_model") -> None:
    """The model selectbox's ``on_change``: a newly chosen model opens on its own workload defaults, so a model
    that the bundled model's workload would overload (SmolLM2) opens on a view the page serves."""
    st.session_state.update(workload_defaults(st.session_state[model_key]))


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def report(model: str, workload: ServeWorkload, settings: EngineSettings, transformers: bool) -> EngineReport:
    """Serve the workload on the engine (and on transformers, interleaved), snapshot the pool."""
    shared = shared_model(model)
    check_page_limits(shared.model, workload, settings, transformers)
    return with_progress("Serving...", lambda bar: _serve(shared, workload, settings, transformers, bar))


COMPARISON_TTL_S = 600  # as long as report() keeps a run: a timing says what the machine did then
# comparisons measured behind the page, by (model, workload, settings)
_compared: background.Expiring[EngineReport] = background.Expiring(COMPARISON_TTL_S, 8)


def kept_comparison(key: tuple) -> EngineReport | None:
    """The engine-vs-transformers report for ``key`` = (model, workload, settings) measured behind the page less
    than :data:`COMPARISON_TTL_S` seconds ago, else None."""
    return _compared.get(key)


def _compare(key: tuple, bar: Progress) -> None:
    model, workload, settings = key
    _compared.put(key, _serve(shared_model(model), workload, settings, True, bar))


def served(model: str, workload: ServeWorkload, settings: EngineSettings, transformers: bool
           ) -> tuple[EngineReport, bool]:
    """The report the page shows, and whether its comparison with transformers is being measured behind the page.

    With transformers beside the engine and the server working behind its pages, the interleaved runs of both
    systems (seconds on a real model) are measured on a thread while a bar follows them; meanwhile the page shows one
    engine run, and the whole report once it is there. Otherwise :func:`report`, here. The page's engine run comes
    first and the comparison's thread starts after it, so the page never waits for one of that thread's runs."""
    if not (transformers and background.enabled()):
        return report(model, workload, settings, transformers), False
    check_page_limits(shared_model(model).model, workload, settings, transformers)
    key = (model_name(model), workload, settings)
    alone = report(model, workload, settings, False) if kept_comparison(key) is None else None
    compared = background.computed_behind(
        ("serving comparison", key), "Serving the same requests on transformers and the engine, interleaved",
        lambda: kept_comparison(key), lambda bar: _compare(key, bar), timing=True)
    if compared is not None:
        return compared, False
    return (alone if alone is not None else report(model, workload, settings, False)), True


def _serve(shared: SharedModel, workload: ServeWorkload, settings: EngineSettings, transformers: bool,
           bar: Progress) -> EngineReport:
    """Serve, taking the model's lock per run (:func:`ui.background.turns`: behind a page, a visitor's next view goes
    between the runs) and saying what holds it meanwhile (a calibration measuring on it: runs never share the model
    with a timing)."""
    def waiting() -> None:
        bar(0.0, f"Waiting for {shared.name}: another view is using it")

    return engine_report(shared.model, shared.tokenizer, workload, settings, transformers, bar,
                         turn=background.turns(shared.lock, waiting))


def _measure(key: CalibrationKey, model: SharedModel, by: str, report_progress: Progress) -> Calibration:
    """Calibrate on ``model``, taking its lock step by step (:func:`ui.background.turns`): another page's use of the
    model goes between two grid steps instead of waiting for the whole grid (about 40 s on SmolLM2)."""
    before, start = load_average(), time.perf_counter()
    cost = calibrate_engine(model.model, block_size=key.block_size, threads=key.threads,
                            name=f"{key.model}'s engine on this machine", progress=report_progress,
                            turn=background.turns(model.lock))
    return Calibration(cost, time.time(), time.perf_counter() - start, before, load_average(), by)


def calibrate(key: CalibrationKey, model: SharedModel | None = None, by: str = BY_PAGE,
              progress: Progress | None = None) -> Calibration:
    """The engine's step time on this machine for ``key``, fitted once on a designed grid of steps (it never sees a
    run the page shows); kept in memory for the server's life, never on disk. model: a copy of the key's model to
    measure on (the warm-up's own); by default the shared one. A calibration another thread is making is waited
    for, not made twice."""
    with _kept_lock:
        if key in _kept:
            return _kept[key]
    calibration = disk_cache.computed("engine-calibration", key, MODULES, None,  # None: memory only, never on disk
                                      lambda bar: _measure(key, model or shared_model(key.model), by, bar), progress)
    with _kept_lock:
        _kept[key] = calibration
        while len(_kept) > KEPT_CALIBRATIONS:
            _kept.popitem(last=False)
    return calibration


def calibrated(key: CalibrationKey) -> Calibration | None:
    """The calibration for ``key`` when this server has made it (nothing is measured); else None."""
    with _kept_lock:
        return _kept.get(key)


def calibrating(key: CalibrationKey) -> tuple[float, str] | None:
    """How far a thread calibrating ``key`` (the warm-up's) has got, or None when none is."""
    flight = disk_cache.in_flight("engine-calibration", key, MODULES, None)
    return None if flight is None else (flight[0], f"Calibrating the simulator: {flight[1]}")


def calibrated_behind(key: CalibrationKey) -> Calibration | None:
    """The calibration for ``key`` when this server has made it; else it is measured behind the page on the shared
    model (:func:`ui.background.computed_behind`, a timing: the warm-up pauses) while a bar follows it (None). With
    background work off it is measured here, under a progress bar. A failure is said on the page that follows it,
    and the next view tries again."""
    return background.computed_behind(("engine calibration", key), "Calibrating the simulator",
                                      lambda: calibrated(key), lambda bar: calibrate(key, progress=bar), timing=True)


def forget_calibrations() -> None:
    """Drop every calibration this server made, and the results memory that also holds them (:func:`ui.disk_cache.
    forget`; what is on disk stays): the next view measures afresh."""
    with _kept_lock:
        _kept.clear()
    disk_cache.forget()


def calibration(key: CalibrationKey) -> Calibration:
    """:func:`calibrate` under a progress bar (a visitor is waiting)."""
    with progress_bar() as bar:
        return calibrate(key, progress=lambda fraction, label: bar(
            fraction, f"Calibrating the simulator on a grid of engine steps (once per server): {label}"))


@st.cache_data(ttl=600, max_entries=8, show_spinner=False)
def prediction(model: str, workload: ServeWorkload, settings: EngineSettings, _run: EngineReport, run_key: str,
               _cost: FittedCost, cost_key: float) -> pd.DataFrame:
    """The calibrated simulator's prediction of the shown run (``run_key``: when it was measured; ``cost_key``:
    when the calibration was)."""
    shared = shared_model(model)
    return predict_run(_run, shared.model, shared.tokenizer, workload, settings, _cost)
