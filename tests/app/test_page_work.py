"""A heavy page's default view does a bounded, counted amount of model work when nothing is cached (forward passes
of the bundled model, never wall time), and none when its results are kept (a restarted server reads them back)."""

from __future__ import annotations

import inspect

import pytest

from kvcore.eviction.evaluate import TIMED_STEPS, EvictionConfig
from kvcore.models.generate import time_generation
from kvcore.quant.evaluate import PAGE_TOKENS, PAGE_WINDOWS
from tests.app.conftest import assert_clean, open_page
from tests.conftest import Forwards
from ui import disk_cache, eviction_runs, eviction_steps, live_runs
from ui.models import shared_model

TIMING = {name: p.default for name, p in inspect.signature(time_generation).parameters.items()}


@pytest.fixture
def cold(tmp_path, monkeypatch):
    """Nothing kept: an empty results folder, and the heavy pages' in-process caches emptied."""
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(tmp_path / "results"))

    def forget() -> None:
        disk_cache.forget()
        for cached in (eviction_runs.reference, eviction_runs.reference_claims, eviction_runs.measured,
                       eviction_steps.step_view, live_runs.finished_runs, live_runs._attention, live_runs.steps_view):
            cached.clear()
        eviction_runs.forget_times()

    forget()
    return forget


def test_the_eviction_default_is_one_forward_per_evicting_run_plus_the_timed_steps(cold):
    runs = len(EvictionConfig().runs())  # the full cache and 4 policies x 2 budgets
    with Forwards(shared_model().model) as forwards:
        assert_clean(open_page("eviction"))
    # the reference pass, one replayed forward per evicting run (the full cache's is the reference's), then per run
    # one forward up to its timed steps and the TIMED_STEPS + 1 one-token steps themselves
    assert forwards.count == 1 + (runs - 1) + runs * (1 + TIMED_STEPS + 1)
    assert forwards.tokens.count(1) == runs * (TIMED_STEPS + 1)
    cold_restart = forwards.count
    cold()  # a restarted server on the same results folder: the sweep's summary comes back from disk (no reference
    # pass, no run); only the step times are measured afresh, on the text's tokens
    with Forwards(shared_model().model) as forwards:
        assert_clean(open_page("eviction"))
    assert forwards.count == runs * (1 + TIMED_STEPS + 1) < cold_restart


def test_the_quantization_default_decodes_every_method_in_one_batch_then_reads_it_back(cold):
    with Forwards(shared_model().model) as forwards:
        assert_clean(open_page("quantization"))
    # one capture per window, then every (method, window) pair in one batch: a prefill of half the window and one
    # step per token of the other half
    assert forwards.count == PAGE_WINDOWS + 1 + PAGE_TOKENS // 2
    disk_cache.forget()
    with Forwards(shared_model().model) as forwards:
        assert_clean(open_page("quantization"))
    assert forwards.count == 0


def test_the_live_model_default_generates_once_times_in_rounds_and_captures_attention_once(cold):
    repeats, warmup, decode_steps = TIMING["repeats"], TIMING["warmup"], TIMING["decode_steps"]
    with Forwards(shared_model().model) as forwards:
        at = open_page("live_model")
    assert_clean(at)
    generated = len(at.dataframe[0].value)
    # one forward per generated token (the full cache is the run itself), timing rounds of a prefill and its
    # decode steps, one capture of every layer's attention (the step player and the map are views of it)
    assert forwards.count == generated + (warmup + repeats) * (1 + min(decode_steps, generated)) + 1
