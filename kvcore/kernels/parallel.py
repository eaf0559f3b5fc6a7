"""Split-K work items (a sequence's run of chunks) and how the CPU kernels run them: one intra-op thread.

Follows vLLM PagedAttention V2, whose grid is (sequence, head, partition): here a work item is a span of
one sequence's chunks. A chunk's ops are small (tens of microseconds). With several intra-op threads each
op is an OpenMP parallel region ending in a barrier, and on a shared, loaded machine a descheduled
thread stalls every barrier for a scheduler slice: the chunk loop then runs many times slower than on
one thread (benchmarks/RESULTS.md). So the CPU kernels run their loop on one intra-op thread, and
``workers > 1`` runs spans on that many single-threaded Python threads (the caller and long-lived pool
threads). The torch kernels' threads share the GIL between ops; the fused C kernels release it for a
whole span, so their workers run truly in parallel (1.4-1.7x on two cores).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

from kvcore.device import torch_threads

DEFAULT_WORKERS: int | None = None  # None: one worker per torch intra-op thread (resolve_workers)
_local = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
SPANS_PER_WORKER = 4  # more spans than workers, so a slowed worker is made up for by the others


@dataclass(frozen=True, slots=True)
class Span:
    """Chunks ``[first, stop)`` of sequence ``seq``: one work item."""

    seq: int
    first: int
    stop: int


@cache
def _openmp_backend() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the block (or, as a decorator, the function) on one intra-op thread, then restore the count.

    With the OpenMP backend ``torch.set_num_threads`` changes this thread's OpenMP and MKL settings and
    the default that threads started meanwhile inherit; other running threads are unaffected. Other
    backends cannot change the count once work has started, so the block runs as it is.
    """
    outer = getattr(_local, "threads", None)
    _local.threads = outer or torch.get_num_threads()  # what resolve_workers sees inside the block
    try:
        with torch_threads(1 if _openmp_backend() else None):
            yield
    finally:
        _local.threads = outer


def resolve_workers(workers: int | None) -> int:
    """``workers``, or with None one per torch intra-op thread.

    Each worker runs single-threaded ops, so there are no OpenMP barriers to stall: on the 2-core machine
    of benchmarks/RESULTS.md two workers beat one both idle and with a core taken by other work.
    """
    threads = getattr(_local, "threads", None) or torch.get_num_threads()  # the count before one_intra_op_thread
    return max(1, threads if workers is None else workers)


def plan_spans(num_chunks: list[int], workers: int | None) -> list[Span]:
    """Cut each sequence's ``num_chunks[b]`` chunks into spans, biggest first.

    One span per sequence for one worker; for several, spans of at most
    ``ceil(total / (SPANS_PER_WORKER * workers))`` chunks, so one long sequence is split across workers
    (flash-decoding's point) and many short ones are not split at all.
    """
    workers = resolve_workers(workers)
    total = sum(num_chunks)
    size = max(num_chunks, default=1) if workers <= 1 else max(1, -(-total // (SPANS_PER_WORKER * workers)))
    spans = [Span(b, i, min(i + size, n)) for b, n in enumerate(num_chunks) for i in range(0, n, size)]
    return sorted(spans, key=lambda s: s.first - s.stop)  # longest first: a greedy balanced schedule


def _pool(helpers: int) -> ThreadPoolExecutor:
    """A long-lived pool of ``helpers`` threads: starting threads per call cost 10-40% at 1k tokens.

    Its threads start inside :func:`run_spans`, on one intra-op thread, and keep that count.
    """
    with _pools_lock:
        if helpers not in _pools:
            _pools[helpers] = ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="kvcore-spans")
        return _pools[helpers]


def run_spans(spans: list[Span], work: Callable[[Span], None], workers: int | None = DEFAULT_WORKERS) -> None:
    """Call ``work(span)`` for every span on one intra-op thread: inline, or on ``workers`` threads.

    The calling thread is one of the workers: it starts on the spans at once while ``workers - 1``
    pool threads wake up (waking an idle core took 2-3 ms on the 2-core VM of benchmarks/RESULTS.md,
    a third of a 1k-token call), and every thread takes the next span when it finishes one. ``work``
    must write disjoint outputs per span and must not call :func:`run_spans` itself (the pool is
    shared). Pool threads start while the intra-op count is 1, so they inherit it.
    """
    workers = resolve_workers(workers)
    with one_intra_op_thread():
        if workers <= 1 or len(spans) <= 1:
            for span in spans:
                work(span)
            return
        queue, lock = iter(spans), threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    span = next(queue, None)
                if span is None:
                    return
                work(span)

        helpers = [_pool(workers - 1).submit(drain) for _ in range(min(workers, len(spans)) - 1)]
        try:
            drain()
        finally:
            for helper in helpers:  # one still queued (the pool busy with another call) has nothing left to do
                if not helper.cancel():
                    helper.result()  # waits for a running helper; re-raises its exception
