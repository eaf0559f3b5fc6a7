"""Run independent tasks on this machine's cores or on a Ray cluster; results come back in task order.

One call, :func:`run_tasks`, serves the sweep and the serving-config search. A task is a module-level
function and a picklable item; the function runs in a worker and returns a value. Engines:

* ``local`` (default): one job runs the tasks in this process, one after another; more jobs run them in a
  process pool (``spawn`` start, so no worker inherits a half-initialised torch from a fork).
* ``ray``: each task is a Ray task (``ray.remote`` with ``num_cpus``/``num_gpus`` from :class:`Resources`,
  ``max_retries`` when a worker dies), joined as they finish with ``ray.wait``. With ``address`` the driver
  joins a running cluster and ships the ``kvcore`` package to it (``runtime_env`` ``py_modules``); without,
  it starts a local Ray, or uses the one already started in this process.

A task that raises is not retried (a bad setting stays bad); its message is kept with its result, and the
other tasks go on. Every task runs with ``Resources.cpus`` torch threads.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcore.device import torch_threads

ENGINES = ("local", "ray")
KVCORE_DIR = Path(__file__).resolve().parents[1]


@dataclass(slots=True, frozen=True)
class Resources:
    """What each task asks for. cpus: cores (and torch threads); gpus: GPUs, a fraction shares one (Ray only);
    retries: how often Ray reruns a task whose worker died (a task that raises is never rerun)."""

    cpus: float = 1.0
    gpus: float = 0.0
    retries: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int | float) or not self.cpus > 0:
            raise ValueError(f"cpus per task must be a number > 0, got {self.cpus!r}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int | float) or self.gpus < 0:
            raise ValueError(f"gpus per task must be a number >= 0, got {self.gpus!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


@dataclass(slots=True)
class TaskResult:
    """One task's outcome: its index among the tasks, the value (None on failure), the error message
    (None on success) and the seconds the task ran in its worker."""

    index: int
    value: Any = None
    error: str | None = None
    seconds: float = float("nan")


def run_task(fn: Callable[[Any], Any], item: Any, threads: int = 1) -> tuple[Any, str | None, float]:
    """``fn(item)`` on ``threads`` torch threads: (value, None, seconds), or (None, message, seconds) if it raised."""
    start = time.perf_counter()
    try:
        with torch_threads(threads):
            return fn(item), None, time.perf_counter() - start
    except Exception as exc:  # a task's failure is its result; the other tasks go on
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" ({Path(last.filename).name}:{last.lineno})" if not isinstance(exc, ValueError) else ""
        return None, f"{type(exc).__name__}: {exc}{where}", time.perf_counter() - start


def run_tasks(fn: Callable[[Any], Any], items: Sequence[Any], *, engine: str = "local", jobs: int = 1,
              address: str | None = None, resources: Resources | Sequence[Resources] | None = None,
              on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
    """Run ``fn`` on every item with ``engine``; return the results in item order.

    jobs: parallel tasks of the local engine (1 = in this process), cores of a local Ray started here.
    address: a running Ray cluster to join (``"auto"`` or ``"host:6379"``); ray only. resources: one for
    every task, or one per task (the local engine only reads the threads; GPUs are placed by Ray).
    on_result: called in this process as each task finishes (in finishing order), e.g. to move a progress bar.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    if address is not None and engine != "ray":
        raise ValueError("--address joins a Ray cluster: use it with --engine ray")
    each = _per_task(resources, len(items))
    if engine == "ray":
        stream = _ray(fn, items, jobs, address, each)
    elif jobs == 1 or len(items) <= 1:
        stream = (TaskResult(i, *run_task(fn, item, each[i].threads)) for i, item in enumerate(items))
    else:
        stream = _pool(fn, items, jobs, each)
    results: list[TaskResult | None] = [None] * len(items)
    for result in stream:
        results[result.index] = result
        if on_result is not None:
            on_result(result)
    return [r if r is not None else TaskResult(i, error="the task never reported back") for i, r in enumerate(results)]


def _per_task(resources: Resources | Sequence[Resources] | None, count: int) -> list[Resources]:
    if resources is None or isinstance(resources, Resources):
        return [resources or Resources()] * count
    if len(resources) != count:
        raise ValueError(f"give one Resources per task: {count} tasks, {len(resources)} resources")
    return list(resources)


@contextmanager
def _bare_main() -> Iterator[None]:
    """Start spawned workers without re-running the parent's main script.

    A spawned worker imports the parent's ``__main__`` by path unless it is a module run with ``-m``; a script
    that is not safe to import (a notebook cell, a generated app script under test) would fail there. Tasks
    only need importable functions, so workers start from an empty main while the pool starts them.
    """
    main = sys.modules["__main__"]
    if getattr(main, "__spec__", None) is not None or not getattr(main, "__file__", None):
        yield
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _pool(fn: Callable[[Any], Any], items: Sequence[Any], jobs: int,
          resources: list[Resources]) -> Iterator[TaskResult]:
    context = multiprocessing.get_context("spawn")
    with _bare_main(), ProcessPoolExecutor(max_workers=min(jobs, len(items)), mp_context=context) as pool:
        futures = {pool.submit(run_task, fn, item, resources[i].threads): i for i, item in enumerate(items)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    yield TaskResult(futures[future], *future.result())
                except BrokenProcessPool as exc:  # a worker died (killed, out of memory): every pending task is lost
                    yield TaskResult(futures[future], error=f"a worker process died: {exc}")


def _ray(fn: Callable[[Any], Any], items: Sequence[Any], jobs: int, address: str | None,
         resources: list[Resources]) -> Iterator[TaskResult]:
    try:
        import ray
    except ImportError as exc:
        raise ValueError("--engine ray needs Ray: pip install -r requirements-dev.txt (or pip install ray)") from exc
    started = not ray.is_initialized()
    try:
        if started and address is not None:
            ray.init(address=address, runtime_env={"py_modules": [str(KVCORE_DIR)]}, log_to_driver=False)
        elif started:
            ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        raise ValueError(f"cannot join the Ray cluster at {address}: {exc}. Is its head running (ray start --head)?"
                         ) from exc
    try:
        remote = ray.remote(run_task)
        refs = {remote.options(num_cpus=r.cpus, num_gpus=r.gpus, max_retries=r.retries, retry_exceptions=False)
                .remote(fn, item, r.threads): i for i, (item, r) in enumerate(zip(items, resources, strict=True))}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    yield TaskResult(refs[ref], *ray.get(ref))
                except ray.exceptions.RayError as exc:  # the worker died more often than retries allow
                    yield TaskResult(refs[ref], error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    finally:
        if started:
            ray.shutdown()
