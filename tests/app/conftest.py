"""AppTest helpers: open a page of the real app (through app.py's navigation) with URL params."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT

# Pages keep heavy results on disk across server restarts (ui.disk_cache): tests start from an empty folder of their
# own, so every run computes what it checks.
os.environ["KVLAB_RESULTS_CACHE"] = tempfile.mkdtemp(prefix="kvlab-test-results-")
# No background warm-up of the default views (ui.warmup): a test sees only the work of the page it opens.
os.environ["KVLAB_WARMUP"] = "0"

# torch and transformers import slowly on a 2-core machine; a page's first run may take a while.
TIMEOUT = 180


def open_page(page: str, query: Mapping[str, str] | None = None, timeout: float = TIMEOUT) -> AppTest:
    """Run ``app.py``, switch to ``app_pages/<page>.py`` with the given query params, return the AppTest."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    if page != "home":
        at.switch_page(f"app_pages/{page}.py")
        at.run()
    return at


def assert_clean(at: AppTest) -> None:
    """No exception element and no uncaught error on the page."""
    assert not at.exception, [e.value for e in at.exception]


def bound_places(at: AppTest) -> dict[str, tuple[str | int, ...]]:
    """Where each URL-bound widget is on the page: its query parameter -> its path of child indices from the main
    area or the sidebar."""
    def walk(node, path: tuple[str | int, ...]) -> dict[str, tuple[str | int, ...]]:
        places = {}
        for index, child in getattr(node, "children", {}).items():
            key = getattr(getattr(child, "proto", None), "query_param_key", "")
            if key:
                places[key] = (*path, index)
            places |= walk(child, (*path, index))
        return places
    return walk(at.main, ("main",)) | walk(at.sidebar, ("sidebar",))


def assert_no_bound_widget_moved_up(before: AppTest, after: AppTest) -> None:
    """Every URL-bound widget on both pages is at the same place or further down on ``after``: a widget that moves
    up between two runs stops writing its value to the URL (why: ``ui.params``)."""
    first, then = bound_places(before), bound_places(after)
    assert first, "no URL-bound widget found"
    moved = {key: (first[key], then[key]) for key in first.keys() & then.keys() if then[key] < first[key]}
    assert not moved, f"moved up (before, after): {moved}"


@pytest.fixture
def page() -> Callable[..., AppTest]:
    """``page("home", {"tokens": "4096"})`` -> a rendered AppTest, asserted exception-free."""
    def _open(name: str, query: Mapping[str, str] | None = None) -> AppTest:
        at = open_page(name, query)
        assert_clean(at)
        return at
    return _open


@pytest.fixture
def behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Background work on (as on a server), with no warm-up started: only what the page starts runs behind it."""
    from ui import background, warmup

    monkeypatch.setattr(background, "enabled", lambda: True)
    monkeypatch.setattr(warmup, "start", lambda: None)
    yield
    background.BEHIND.join()


@pytest.fixture(autouse=True)
def no_warm_up_left_running() -> Iterator[None]:
    """A test that started the server's warm-up (ui.warmup) for real would leave its thread computing the default
    views under the tests that follow (their counts and pending sections would see it): fail that test instead."""
    yield
    import threading

    left = [t for t in threading.enumerate() if t.name == "kvlab-warmup" and t.is_alive()]
    assert not left, "the test left the background warm-up running (was warmup.start un-patched?)"


class Calls:
    """Counts calls of functions that a module looks up by name, each under an alias:
    ``Calls(monkeypatch, needle_runs, grids="run_needle")`` wraps ``needle_runs.run_needle`` and counts its calls
    in ``.grids`` (the work a page does, not its time)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, **names: str) -> None:
        for alias, name in names.items():
            setattr(self, alias, 0)
            monkeypatch.setattr(module, name, self._counted(alias, getattr(module, name)))

    def _counted(self, alias: str, real: Callable) -> Callable:
        def counted(*args, **kwargs):
            setattr(self, alias, getattr(self, alias) + 1)
            return real(*args, **kwargs)
        return counted
