"""Cached runs of the Quantization page on the chosen model (the bundled one or SmolLM2): captured Q/K/V, every
method measured, K/V magnitude maps and greedy text. Keys are typed: the model's name, the text
(:class:`~kvcore.quant.evaluate.QuantText`) and the custom method's settings
(:class:`~kvcore.quant.methods.CustomSettings`); every use of a model holds its lock.

The measurement of every method (the page's heavy part: each method decodes the text token by token) is kept on
disk across server restarts, keyed by the model, the settings, the weights and the code (:mod:`ui.disk_cache`),
and runs under a progress bar that says how far the decode is. Its speed columns say when and under what load
they were measured (:func:`speed_note`)."""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from kvcore.models.loader import model_name
from kvcore.models.perplexity import Progress
from kvcore.noise import load_note
from kvcore.quant import evaluate as qe
from kvcore.quant.methods import METHODS, CustomSettings, QuantMethod, method_named
from kvcore.quant.model_kv import CapturedKV
from ui import background, disk_cache
from ui.models import BUNDLED, SharedModel, shared_model
from ui.progress import progress_bar


def model(name: str = BUNDLED) -> tuple[Any, Any]:
    """The model ``name`` and its tokenizer, shared by every page and session."""
    shared = shared_model(name)
    return shared.model, shared.tokenizer


@st.cache_resource(show_spinner="Capturing queries, keys and values...")
def captured(name: str, text: qe.QuantText) -> CapturedKV:
    """Queries, keys and values of every layer of model ``name`` over the first text window."""
    shared = shared_model(name)
    with shared.lock:
        return qe.capture_qkv(shared.model, text.ids(shared.tokenizer)[0])


MODULES = ("kvcore.quant.evaluate",)  # what a measurement executes (their import closure keys the disk cache)


def _methods(custom: CustomSettings | None) -> dict[str, QuantMethod]:
    return dict(METHODS) if custom is None else {"fp16": METHODS["fp16"], "custom": custom.method()}


def _settings(text: qe.QuantText, custom: CustomSettings | None, key: str) -> tuple[object, ...]:
    return "quant-eval", (key, text, custom), MODULES, disk_cache.weights_key(key)


def measure(text: qe.QuantText, custom: CustomSettings | None = None, model: SharedModel | None = None,
            name: str = BUNDLED, progress: Progress | None = None) -> qe.QuantEval:
    """Every registered method measured (``custom`` None), or fp16 and the custom method, on model ``name``: from
    memory, from disk, or decoded now (reporting to ``progress``, by default a progress bar here). The model's lock
    is held per forward pass, so a visitor's next view of the model runs between the decode's steps. model: a
    private copy of that model to decode with (the background warm-up's; its own name counts then); by default the
    shared one."""
    methods = _methods(custom)
    key = model_name(model.name if model is not None else name)

    def compute(report: Progress) -> qe.QuantEval:
        shared = model or shared_model(key)
        return qe.evaluate(shared.model, text.ids(shared.tokenizer), methods, progress=report, lock=shared.lock)

    def label(report: Progress) -> Progress:
        return lambda fraction, what: report(fraction, f"{len(methods)} methods on {key}: {what}")

    if progress is not None:  # a bar that already names the work
        return disk_cache.computed(*_settings(text, custom, key), compute, progress)
    with progress_bar() as bar:
        return disk_cache.computed(*_settings(text, custom, key), compute, label(bar))


def speed_note(result: qe.QuantEval) -> str:
    """When the speed columns were measured and what else ran then (they are kept with the results)."""
    if not math.isfinite(result.measured_at):
        return "tokens_per_s: when measured not recorded"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(result.measured_at))
    return f"tokens_per_s measured {when}, {load_note(result.load_1min)}"


def results(name: str, text: qe.QuantText, method: str, custom: CustomSettings) -> qe.QuantEval | None:
    """Every registered method on model ``name``, plus the custom one when it is the method shown: kept, or decoded
    behind the page (:func:`ui.background.computed_behind`: None meanwhile, and a bar here follows the decode)."""
    needed = [None, custom] if method == "custom" else [None]
    key = model_name(name)

    def kept() -> qe.QuantEval | None:
        found = [disk_cache.kept(*_settings(text, c, key)) for c in needed]
        return None if any(r is None for r in found) else functools.reduce(qe.combine, found)

    def work(bar: Progress) -> None:
        for i, c in enumerate(needed):
            measure(text, c, name=name, progress=lambda f, what, i=i: bar((i + f) / len(needed), what))

    return background.computed_behind(("quantization", key, text, custom if method == "custom" else None),
                                      f"Decoding the text through every method's cache on {key}", kept, work)


@st.cache_data(show_spinner="Storing the K/V with the method...")
def first_look(name: str, text: qe.QuantText, method: str, custom: CustomSettings) -> tuple[pd.DataFrame,
                                                                                            pd.DataFrame]:
    """What the page shows before the decode is done: the method's errors by layer and every layer's channel
    magnitudes (:func:`kvcore.quant.evaluate.errors`, a second or two), equal to the full measurement's."""
    shared = shared_model(name)
    with shared.lock:
        return qe.errors(shared.model, text.ids(shared.tokenizer), {method: method_named(method, custom)})


@st.cache_data(show_spinner=False)
def maps(name: str, text: qe.QuantText, layer: int, head: int | None, method: str,
         custom: CustomSettings) -> list[np.ndarray]:
    """Token x channel magnitudes of K, V and of the method's K and V errors at ``layer`` (``head`` None = all)."""
    cap = captured(name, text)
    k_hat, v_hat, _ = qe.reconstruct(cap, method_named(method, custom), layer)
    k, v = cap.keys[layer], cap.values[layer]
    return [qe.channel_magnitudes(t, head).numpy() for t in (k, v, k_hat - k, v_hat - v)]


@st.cache_data(show_spinner="Generating with both caches...")
def texts(name: str, text: qe.QuantText, new_tokens: int, method: str, custom: CustomSettings) -> list[str]:
    """The prompt (first half of window 1), then its greedy continuation through the fp16 and the method's cache."""
    shared = shared_model(name)
    prompt = text.ids(shared.tokenizer)[0, : text.tokens // 2]
    with shared.lock:
        return [shared.tokenizer.decode(prompt, skip_special_tokens=True)] + [
            qe.generate_text(shared.model, shared.tokenizer, prompt, m, new_tokens) for m in (
                METHODS["fp16"], method_named(method, custom))]
