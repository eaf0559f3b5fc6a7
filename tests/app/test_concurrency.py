"""Many users at once: 8 AppTest sessions on different pages, run in threads, see their own numbers.

Sessions share the process-wide caches (the bundled model, cached results), as they do on one
Streamlit server. Each concurrent session must show exactly what the same page shows when it runs
alone: no cross-talk through shared state. Wall-clock measurements (timings, bandwidth) are left
out of the comparison because they are not meant to repeat.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from unittest.mock import MagicMock

import pandas as pd
import pytest
from streamlit.runtime import Runtime
from streamlit.runtime.caching.storage.dummy_cache_storage import MemoryCacheStorageManager
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.runtime.scriptrunner.script_cache import ScriptCache
from streamlit.testing.v1 import app_test, local_script_runner
from streamlit.testing.v1.util import patch_config_options

from tests.app.conftest import assert_clean, open_page

# Each session opens a page with its own non-default settings, so a leak would show.
SESSIONS = [
    ("home", {"tokens": "2048", "batch": "3"}),
    ("home", {"tokens": "65536", "bits": "4"}),
    ("paged_blocks", {}),
    ("continuous_batching", {}),
    ("eviction", {"ntok": "64"}),  # the two model pages on short texts: what matters is that runs stay apart
    ("quantization", {"qtokens": "64"}),
    ("memory_hierarchy", {}),
    ("live_model", {}),
]
# Columns and metrics that hold wall-clock measurements (and what is read off them: the machine's load at the time,
# a faster / slower verdict between two timings).
TIMED = re.compile(r"(^|_)(ms|s|us|sec|secs|seconds|time|timing|latency_measured|tok_s|tokens_per_s|tps|GB_s|"
                   r"gbps|bandwidth|measured|elapsed|wall|load)($|_)|/s|per_s|speed|throughput_measured|"
                   r"_vs_contiguous", re.I)


def snapshot(at) -> dict[str, object]:
    """What a user reads on the page: metric values and table contents, minus wall-clock columns."""
    tables = []
    for frame in at.dataframe:
        df = frame.value
        if isinstance(df, pd.DataFrame):
            keep = [c for c in df.columns if not TIMED.search(str(c))]
            tables.append(df[keep].to_csv(index=False))
    metrics = [(m.label, m.value) for m in at.metric if not TIMED.search(m.label)]
    return {"metrics": metrics, "tables": tables, "markdown": [m.value for m in at.markdown]}


def render(page: str, query: dict[str, str]) -> dict[str, object]:
    at = open_page(page, query)
    assert_clean(at)
    return snapshot(at)


class _PerRunRuntime:
    """Stands in for ``Runtime`` inside AppTest so concurrent runs don't reset the one shared runtime.

    AppTest installs a fresh mock runtime before each run and removes it after, a process-wide
    singleton; a real server has one runtime for all sessions, which is what this test needs.
    """

    _instance = None


@contextmanager
def _already_patched(options):
    """AppTest patches global config around each run; the fixture patches it once for all threads."""
    yield


@pytest.fixture
def one_runtime(monkeypatch):
    shared = MagicMock(spec=Runtime)
    shared.media_file_mgr = MediaFileManager(MemoryMediaFileStorage("/mock/media"))
    shared.cache_storage_manager = MemoryCacheStorageManager()
    monkeypatch.setattr(app_test, "Runtime", _PerRunRuntime)
    monkeypatch.setattr(Runtime, "_instance", shared)
    # A server compiles each script once, under one lock, for all sessions; AppTest gives every run
    # its own cache, so eight threads would compile the same pages at once. Python 3.11's compiler
    # is not safe for that (``SystemError: AST constructor recursion depth mismatch``, fixed in later
    # CPython releases), so the sessions share one script cache, as they do on a real server.
    scripts = ScriptCache()
    monkeypatch.setattr(app_test, "ScriptCache", lambda: scripts)
    monkeypatch.setattr(local_script_runner, "ScriptCache", lambda: scripts)
    # Per-run patching of the global config races between threads (one run's exit turns testing
    # mode off under another); patch it once around the whole test instead.
    monkeypatch.setattr(app_test, "patch_config_options", _already_patched)
    with patch_config_options({"global.appTest": True}):
        yield


@pytest.mark.slow
@pytest.mark.usefixtures("one_runtime")
def test_eight_concurrent_sessions_match_their_single_session_runs():
    alone = [render(page, query) for page, query in SESSIONS]  # also warms the shared caches
    with ThreadPoolExecutor(max_workers=len(SESSIONS)) as pool:
        together = list(pool.map(lambda s: render(*s), SESSIONS))
    for (page, query), a, b in zip(SESSIONS, alone, together, strict=True):
        assert a["metrics"] == b["metrics"], (page, query)
        assert a["tables"] == b["tables"], (page, query)
    assert alone[0]["metrics"] != alone[1]["metrics"]  # the two Home sessions differ, and stayed apart
