"""The background warm-up computes exactly what the heavy pages' default views need: after it, opening each
default view runs no forward pass of the model (counted, not timed). It starts once per server, and never in these
tests unless asked."""

from __future__ import annotations

import pytest

from tests.app.conftest import assert_clean, open_page
from ui import disk_cache, warm_defaults, warmup
from ui.models import private_model, shared_model


class Forwards:
    """Counts forward passes of the shared bundled model's decoder."""

    def __init__(self) -> None:
        self.count = 0
        self.handle = shared_model().model.model.register_forward_hook(self._seen)

    def _seen(self, *_) -> None:
        self.count += 1

    def __enter__(self) -> Forwards:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


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


def test_the_default_steps_warm_the_model_then_the_quick_pages_then_quantization():
    assert [name for name, _ in warm_defaults.default_steps()] == ["the bundled model", "Eviction", "Live model",
                                                                    "Quantization"]


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
    with Forwards() as shared_forwards:
        STEPS[page](private)
    assert shared_forwards.count == 0  # the pages' shared copy stays free (its lock never held by the warm-up)
    assert private.model is not shared_model().model
    with Forwards() as forwards:
        at = open_page(page)
    assert_clean(at)
    assert forwards.count == 0
