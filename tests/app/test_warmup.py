"""The background warm-up computes exactly what the heavy pages' default views need: after it, opening each
default view runs no forward pass of the model (counted, not timed). It starts once per server, and never in these
tests unless asked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.app.conftest import assert_clean, open_page
from tests.conftest import ROOT, Forwards
from ui import background, disk_cache, warm_defaults, warmup
from ui.models import private_model, shared_model


def test_the_warm_up_starts_once_and_not_when_turned_off(monkeypatch):
    ran = []
    monkeypatch.setattr(warmup, "_run", lambda: ran.append(1))
    monkeypatch.setenv(warmup.WARMUP_ENV, "0")
    assert warmup.start() is None
    monkeypatch.setenv(warmup.WARMUP_ENV, "1")
    warmup._started.clear()
    try:
        first = warmup.start()
        first.join(10)
        assert warmup.start() is first
        assert ran == [1]
    finally:
        warmup._started.clear()


def test_the_default_steps_calibrate_first_then_the_bundled_views_the_needle_test_and_smollm2s_views():
    assert [name for name, _ in warm_defaults.default_steps()] == [
        "the Serving engine's calibration", "the bundled model", "Eviction", "Live model", "Quantization",
        "the Eviction page's needle test", "Live model on smollm2-135m", "Eviction on smollm2-135m",
        "Quantization on smollm2-135m"]
    assert background.TIMED == (background.CALIBRATION,)


def test_the_queue_is_known_before_the_thread_imports_model_code(monkeypatch):
    monkeypatch.setattr(warmup, "_run", lambda: None)
    monkeypatch.setenv(warmup.WARMUP_ENV, "1")
    warmup._started.clear()
    try:
        warmup.start().join(10)
        assert [background.WARMUP.state(step) for step in background.STEPS] == ["queued"] * len(background.STEPS)
    finally:
        warmup._started.clear()
        background.WARMUP.fill([])


def test_a_waiting_page_moves_its_step_up_behind_the_timing_and_the_steps_run_in_that_order():
    queue = background.Queue()
    queue.fill(list(background.STEPS))
    queue.hurry(background.NEEDLE)  # a visitor on the Eviction page, before the warm-up took its first step
    assert queue.queued[:2] == [background.CALIBRATION, background.NEEDLE]
    ran: list[str] = []
    steps = [(name, lambda name=name: ran.append(name)) for name in background.STEPS]
    rest = [step for step in background.STEPS[1:] if step != background.NEEDLE]
    assert warm_defaults.warm(steps, queue, lambda: ran.append("lower priority")) == [
        background.CALIBRATION, background.NEEDLE, *rest]
    assert ran == [background.CALIBRATION, "lower priority", background.NEEDLE, *rest]
    assert queue.done == ran[:1] + ran[2:]
    assert queue.running is None
    assert queue.state(background.NEEDLE) == "done"


def test_the_timing_waits_until_no_page_is_running():
    pages = background.Activity()
    with pages.page_run():
        assert not pages.wait_idle(quiet_s=0.05, timeout_s=0.2)  # a page is running: timed out
    assert pages.running == 0
    assert pages.wait_idle(quiet_s=0.05, timeout_s=5.0)


def test_a_step_that_fails_is_marked_so_and_a_page_stops_waiting_for_it():
    def broken() -> None:
        raise OSError("no network")

    pending = background.Pending(lambda: None, lambda: None, "broken", "A result")
    background.WARMUP.fill(["broken"])
    try:
        assert pending.status() == (0.0, "A result: next in the background warm-up...")
        assert warm_defaults.warm([("broken", broken)], background.WARMUP) == []
        assert background.WARMUP.state("broken") == "failed"
        assert pending.status() is None  # no longer computed: the page computes it itself, or says what is wrong
    finally:
        background.WARMUP.fill([])


def test_a_failing_step_is_skipped_and_the_rest_still_run():
    def broken() -> None:
        raise OSError("no network")

    assert warm_defaults.warm([("broken", broken), ("fine", lambda: None)]) == ["fine"]


@pytest.fixture(scope="module")
def private():
    return private_model()


STEPS = {"eviction": warm_defaults.warm_eviction, "live_model": warm_defaults.warm_live_model,
         "quantization": warm_defaults.warm_quantization}


@pytest.mark.parametrize("page", list(STEPS))
def test_the_warm_up_computes_on_its_own_copy_and_the_default_view_then_runs_no_forward(page, private, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(tmp_path))
    disk_cache.forget()
    with Forwards(shared_model().model) as shared_forwards:
        STEPS[page](private)
    assert shared_forwards.count == 0  # the pages' shared copy stays free (its lock never held by the warm-up)
    assert private.model is not shared_model().model
    with Forwards(shared_model().model) as forwards:
        at = open_page(page)
    assert_clean(at)
    assert forwards.count == 0


def test_smollm2s_live_model_view_is_warmed_on_its_own_copy_and_the_page_then_runs_no_forward(tmp_path, monkeypatch):
    """The real model's views are the warm-up's last steps; the quickest of them stands for the others here (they
    share warm_eviction and warm_quantization with the bundled model's steps, tested above)."""
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(tmp_path))
    private = private_model("smollm2-135m")
    shared = shared_model("smollm2-135m")
    with Forwards(shared.model) as shared_forwards, Forwards(private.model) as private_forwards:
        warm_defaults.warm_live_model(private)
    assert shared_forwards.count == 0
    assert private_forwards.count > 0
    with Forwards(shared.model) as forwards:
        at = open_page("live_model", {"lm_model": "smollm2-135m"})
    assert_clean(at)
    assert any(c.value.startswith("Model: SmolLM2-135M-Instruct") for c in at.caption)
    assert forwards.count == 0


@pytest.mark.parametrize("path", warmup.WITHOUT_TRANSFORMERS)
def test_a_page_that_skips_the_import_gate_imports_no_transformers(path):
    # a model page waits for transformers' import (one thread at a time: two at once can deadlock inside it and
    # leave a page with a half-initialised module); the pages let through must not import it at all
    source = ROOT / "app_pages" / f"{path or 'home'}.py"
    probe = ("import ast, sys\n"
             f"tree = ast.parse(open({str(source)!r}).read())\n"
             "exec(compile(ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], []), "
             "'imports', 'exec'))\n"
             "print('transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
