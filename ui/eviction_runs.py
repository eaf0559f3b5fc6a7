"""Streamlit-cached runs of the Eviction page: the full-cache reference of a text, and each policy run.

A run is cached on its own (keyed by the text and its :class:`~kvcore.eviction.evaluate.RunSpec`), so a
view that adds a policy or a budget only runs what is new; every use of the model holds its lock. Runs
carry decode timings, so they are kept for :data:`RUN_TTL_S` seconds only: a later visitor gets speeds
measured under the load of their own time, not of the first visit's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st

from kvcore.eviction.evaluate import EvictionConfig, EvictionResults, RunSpec, model_claims, run_all, summarize
from kvcore.eviction.reference import Reference, reference_pass
from kvcore.eviction.runner import RunResult
from kvcore.models.loader import model_name
from kvcore.models.runtime import text_ids
from ui.models import shared_model
from ui.progress import with_progress


@dataclass(slots=True, frozen=True)
class EvictionText:
    """What a sweep streams: a model (bundled, Hub name or folder), a text, and how many of its tokens."""

    model: str
    text: str
    max_tokens: int

    def __post_init__(self) -> None:  # one cache entry per model, however the URL spells it
        object.__setattr__(self, "model", model_name(self.model))


@st.cache_resource(max_entries=4, show_spinner="Full-cache reference pass...")
def reference(source: EvictionText) -> Reference:
    """The text through the full cache once (what every run is measured against)."""
    shared = shared_model(source.model)
    with shared.lock:
        return reference_pass(shared.model, text_ids(shared.model, shared.tokenizer, source.text, source.max_tokens))


RUN_TTL_S = 900


@st.cache_resource(max_entries=4, show_spinner="Checking the literature's claims on this model...")
def reference_claims(source: EvictionText) -> list[dict[str, Any]]:
    """Attention sinks and Knorm's premise, measured on the text's reference (they depend on nothing else)."""
    return model_claims(reference(source))


@st.cache_data(max_entries=256, ttl=RUN_TTL_S, show_spinner=False)
def run(source: EvictionText, spec: RunSpec) -> RunResult:
    """One policy at one budget on the text."""
    shared = shared_model(source.model)
    with shared.lock:
        return spec.run(shared.model, reference(source))


def sweep(source: EvictionText, config: EvictionConfig) -> EvictionResults:
    """Every run of ``config`` on the text (cached one by one) under a progress bar, gathered into tables."""
    ref = reference(source)
    runs = with_progress("Running policies...", lambda bar: run_all(
        config.runs(), lambda spec: run(source, spec),
        lambda done, total, label: bar(done / total, f"{label} ({done}/{total})")))
    return summarize(ref, runs, config, shared_model(source.model).tokenizer, reference_claims(source))
