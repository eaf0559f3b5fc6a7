"""Results kept on disk: read back instead of recomputed, keyed by settings, weights and the code they ran; a change
to any module the computation imports is a new key; torn files, full folders and Hub models never break a page;
two sessions asking at once compute once."""

from __future__ import annotations

import os
import threading
import time

import pytest

from ui import disk_cache


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(tmp_path / "results"))
    disk_cache.forget()
    yield tmp_path / "results"
    disk_cache.forget()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A tiny project tree: kvcore.a imports kvcore.b; kvcore.c stands apart."""
    root = tmp_path / "project"
    (root / "kvcore").mkdir(parents=True)
    (root / "kvcore" / "__init__.py").write_text('"""pkg"""\n')
    (root / "kvcore" / "a.py").write_text("from kvcore import b\nimport numpy\n")
    (root / "kvcore" / "b.py").write_text("X = 1\n")
    (root / "kvcore" / "c.py").write_text("Y = 1\n")
    monkeypatch.setattr(disk_cache, "ROOT", root)
    disk_cache.code_hash.cache_clear()
    yield root
    disk_cache.code_hash.cache_clear()


class Counter:
    def __init__(self, value: object = 42) -> None:
        self.calls, self.value = 0, value

    def __call__(self, progress) -> object:
        self.calls += 1
        progress(0.5, "half way")
        return self.value


def test_the_closure_follows_static_imports_of_the_project_only(project):
    assert disk_cache.import_closure(["kvcore.a"]) == ["kvcore", "kvcore.a", "kvcore.b"]
    assert disk_cache.import_closure(["kvcore.c"]) == ["kvcore", "kvcore.c"]


def test_the_real_eviction_closure_holds_what_a_run_executes():
    closure = disk_cache.import_closure(["kvcore.eviction.evaluate"])
    assert {"kvcore.eviction.layerwise", "kvcore.eviction.runner", "kvcore.models.cache", "kvcore.noise",
            "kvcore.eviction.h2o", "kvcore"} <= set(closure)
    assert not any(m.startswith(("kvcore.engine", "kvcore.kernels", "ui")) for m in closure)


def test_editing_an_imported_module_changes_the_hash_and_an_unrelated_one_does_not(project):
    before = disk_cache.code_hash(("kvcore.a",))
    (project / "kvcore" / "c.py").write_text("Y = 2\n")
    disk_cache.code_hash.cache_clear()
    assert disk_cache.code_hash(("kvcore.a",)) == before
    (project / "kvcore" / "b.py").write_text("X = 2\n")
    disk_cache.code_hash.cache_clear()
    assert disk_cache.code_hash(("kvcore.a",)) != before


def test_a_result_is_computed_once_then_read_back(folder, project):
    compute, seen = Counter({"ppl": 1.5}), []
    first = disk_cache.computed("run", ("h2o", 32), ("kvcore.a",), "w1", compute, lambda f, label: seen.append(label))
    again = disk_cache.computed("run", ("h2o", 32), ("kvcore.a",), "w1", compute)
    assert again is first  # from memory
    disk_cache.forget()  # a restarted server: memory empty, the file stays
    restarted = disk_cache.computed("run", ("h2o", 32), ("kvcore.a",), "w1", compute)
    assert restarted == {"ppl": 1.5}
    assert restarted is not first
    assert compute.calls == 1
    assert seen == ["half way"]
    assert len(list(folder.glob("run-*.pkl"))) == 1


def test_other_settings_weights_or_code_are_other_results(folder, project):
    compute = Counter()
    disk_cache.computed("run", ("h2o", 32), ("kvcore.a",), "w1", compute)
    disk_cache.computed("run", ("h2o", 64), ("kvcore.a",), "w1", compute)
    disk_cache.computed("run", ("h2o", 32), ("kvcore.a",), "w2", compute)
    (project / "kvcore" / "b.py").write_text("X = 3\n")
    disk_cache.code_hash.cache_clear()
    disk_cache.computed("run", ("h2o", 32), ("kvcore.a",), "w1", compute)
    assert compute.calls == 4


def test_a_model_whose_weights_may_change_is_never_kept(folder):
    assert disk_cache.weights_key("bundled").startswith("bundled:")
    assert disk_cache.weights_key(" ") == disk_cache.weights_key("bundled")
    assert disk_cache.weights_key("smollm2-135m").startswith("smollm2-135m:")
    assert disk_cache.weights_key("gpt2") is None
    assert disk_cache.weights_key("/some/folder") is None
    compute = Counter()
    disk_cache.computed("run", ("gpt2", 1), ("kvcore.eviction.evaluate",), None, compute)
    disk_cache.computed("run", ("gpt2", 1), ("kvcore.eviction.evaluate",), None, compute)
    assert compute.calls == 1  # kept in this process's memory
    assert not folder.exists()  # never on disk
    disk_cache.forget()
    disk_cache.computed("run", ("gpt2", 1), ("kvcore.eviction.evaluate",), None, compute)
    assert compute.calls == 2


def test_a_torn_file_is_recomputed_and_an_unwritable_folder_keeps_nothing(folder, project, monkeypatch):
    compute = Counter()
    disk_cache.computed("run", 1, ("kvcore.a",), "w", compute)
    (path,) = folder.glob("run-*.pkl")
    path.write_bytes(b"\x80\x05 torn")
    disk_cache.forget()
    assert disk_cache.computed("run", 1, ("kvcore.a",), "w", compute) == 42
    assert compute.calls == 2
    blocked = folder.parent / "blocked"
    blocked.write_text("a file where the folder should be")
    monkeypatch.setenv(disk_cache.CACHE_ENV, str(blocked / "results"))
    disk_cache.forget()
    assert disk_cache.computed("run", 1, ("kvcore.a",), "w", compute) == 42  # no error, nothing kept
    assert compute.calls == 3


def test_the_folder_is_pruned_least_recently_used_first(folder):
    folder.mkdir(parents=True)
    for i, name in enumerate(["old", "used", "new"]):
        path = folder / f"{name}.pkl"
        path.write_bytes(b"x" * 100)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    os.utime(folder / "used.pkl", (2_000_000, 2_000_000))  # read since
    assert [p.name for p in disk_cache.prune(folder, max_bytes=200)] == ["old.pkl"]
    assert sorted(p.name for p in folder.glob("*.pkl")) == ["new.pkl", "used.pkl"]


def test_two_sessions_asking_at_once_compute_once_and_the_second_follows_the_progress(folder, project):
    started, release, calls, seen = threading.Event(), threading.Event(), [], []

    def slow(progress):
        calls.append(1)
        progress(0.25, "a quarter")
        started.set()
        release.wait(10)
        return "done"

    first = threading.Thread(target=lambda: disk_cache.computed("run", 7, ("kvcore.a",), "w", slow))
    first.start()
    started.wait(10)
    threading.Timer(0.5, release.set).start()
    got = disk_cache.computed("run", 7, ("kvcore.a",), "w", slow, lambda f, label: seen.append((f, label)))
    first.join(10)
    assert got == "done"
    assert len(calls) == 1
    assert (0.25, "a quarter") in seen


def test_a_failed_computation_is_retried_by_the_session_that_waited(folder, project):
    started, calls = threading.Event(), []

    def fails(progress):
        calls.append("fail")
        started.set()
        time.sleep(0.3)
        raise RuntimeError("stopped")

    def first():
        with pytest.raises(RuntimeError):
            disk_cache.computed("run", 8, ("kvcore.a",), "w", fails)

    thread = threading.Thread(target=first)
    thread.start()
    started.wait(10)
    assert disk_cache.computed("run", 8, ("kvcore.a",), "w", Counter("ok")) == "ok"
    thread.join(10)
    assert calls == ["fail"]
