"""Work done in the background, and the page sections that wait for it without holding the page.

The server's warm-up (:mod:`ui.warmup`) runs its steps (:data:`STEPS`) one at a time on one thread. Its queue
(:data:`WARMUP`) is known before the thread imports any model code, so a page opened at once already sees what is
coming; a section waiting for a step moves it to the front, behind the timing measurements (:data:`TIMED`: they run
first and alone, once no page has run for a second, :data:`PAGES`). A section whose result is being computed in the
background shows a progress bar that follows it and reruns the page once it is done (:func:`wait_for`): the rest of
the page is complete meanwhile, and the visitor does nothing to see the result. This module imports no model code.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import streamlit as st

from ui import timings
from ui.progress import progress_bar

Status = tuple[float, str]  # how far (0-1) and what is being computed
T = TypeVar("T")

CALIBRATION = "the Serving engine's calibration"
BUNDLED = "the bundled model"
EVICTION = "Eviction"
LIVE_MODEL = "Live model"
QUANTIZATION = "Quantization"
NEEDLE = "the Eviction page's needle test"
SMOLLM2 = "smollm2-135m"  # the real model: its default views are warmed last, on the copy the needle test loaded
LIVE_MODEL_SMOLLM2 = f"Live model on {SMOLLM2}"
EVICTION_SMOLLM2 = f"Eviction on {SMOLLM2}"
QUANTIZATION_SMOLLM2 = f"Quantization on {SMOLLM2}"
STEPS = (CALIBRATION, BUNDLED, EVICTION, LIVE_MODEL, QUANTIZATION, NEEDLE, LIVE_MODEL_SMOLLM2, EVICTION_SMOLLM2,
         QUANTIZATION_SMOLLM2)  # the warm-up's order
TIMED = (CALIBRATION,)  # timing measurements: first, alone, at the server's own priority
POLL_S = 1.0  # how often a waiting section looks again
WARMUP_ENV = "KVLAB_WARMUP"  # "0": no background work (the AppTest suite: its counts see only the page under test)


def counted_fragment(run_every: float | None = None, follower: bool = False
                     ) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """``st.fragment(run_every=...)`` whose runs count as page runs (:data:`PAGES`): a step player's step, or a bar
    a visitor watches, which the warm-up gives way to like a whole page. follower: a bar following work behind a
    page, which that work does not wait for (:func:`pages_first`)."""
    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(*args: object, **kwargs: object) -> T:
            with PAGES.page_run(follower):
                return fn(*args, **kwargs)
        return st.fragment(run, run_every=run_every)
    return decorate


def enabled() -> bool:
    """Whether this server works in the background (the warm-up, sections computed behind the page)."""
    return os.environ.get(WARMUP_ENV, "1").strip() != "0"


@dataclass(slots=True)
class Queue:
    """The warm-up's steps: those still queued (in the order they will run), the one running, those done or
    failed. Thread-safe; one per server process (:data:`WARMUP`)."""

    queued: list[str] = field(default_factory=list)
    running: str | None = None
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fill(self, names: tuple[str, ...] | list[str]) -> None:
        """Queue ``names`` afresh (the warm-up starting)."""
        with self.lock:
            self.queued, self.running, self.done, self.failed = list(names), None, [], []

    def take(self) -> str | None:
        """The next step, now running (None: nothing left)."""
        with self.lock:
            self.running = self.queued.pop(0) if self.queued else None
            return self.running

    def finish(self, name: str, ok: bool) -> None:
        """``name`` ran (``ok``) or failed."""
        with self.lock:
            (self.done if ok else self.failed).append(name)
            if self.running == name:
                self.running = None

    def hurry(self, name: str) -> None:
        """Run ``name`` next, behind the timing measurements still queued (a visitor is waiting for it)."""
        with self.lock:
            if name in self.queued:
                self.queued.remove(name)
                ahead = sum(1 for step in self.queued if step in TIMED)
                self.queued.insert(ahead, name)

    def state(self, name: str) -> str | None:
        """``"queued"``, ``"running"``, ``"done"`` or ``"failed"``; None when the warm-up never had it (it is off)."""
        with self.lock:
            if name == self.running:
                return "running"
            for state, names in (("queued", self.queued), ("done", self.done), ("failed", self.failed)):
                if name in names:
                    return state
            return None

    def waiting_line(self, name: str) -> str:
        """Where ``name`` stands, in words."""
        with self.lock:
            if name == self.running:
                return "starting in the background"
            if name not in self.queued:
                return "done"
            ahead = ([self.running] if self.running else []) + self.queued[:self.queued.index(name)]
            return f"queued in the background warm-up behind {', '.join(ahead)}" if ahead else \
                "next in the background warm-up"


WARMUP = Queue()


@dataclass(slots=True)
class Activity:
    """How many page scripts this server is running now (app.py counts each run), so that a timing measurement in
    the background can start when no page is running beside it."""

    running: int = 0
    last_end: float = 0.0
    visiting: int = 0  # the runs among them that are no bar following background work
    last_visit_end: float = 0.0
    changed: threading.Condition = field(default_factory=threading.Condition)
    local: threading.local = field(default_factory=threading.local)  # .depth: page runs on this thread now

    @contextmanager
    def page_run(self, follower: bool = False) -> Iterator[None]:
        """Count the block as a page run (follower: a bar following background work)."""
        with self.changed:
            self.running += 1
            self.visiting += not follower
        self.local.depth = getattr(self.local, "depth", 0) + 1
        try:
            yield
        finally:
            self.local.depth -= 1
            with self.changed:
                self.running -= 1
                self.visiting -= not follower
                self.last_end = time.monotonic()
                if not follower:
                    self.last_visit_end = self.last_end
                self.changed.notify_all()

    def in_page(self) -> bool:
        """Whether this thread is running a page now."""
        return getattr(self.local, "depth", 0) > 0

    def wait_idle(self, quiet_s: float = 1.0, timeout_s: float = 30.0, followers: bool = True) -> bool:
        """Wait until no page has run for ``quiet_s`` seconds (at most ``timeout_s``); False when it timed out.
        followers: whether bars following background work count (False: only pages and player steps)."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                now = time.monotonic()
                running, last_end = (self.running, self.last_end) if followers else \
                    (self.visiting, self.last_visit_end)
                quiet_for = now - last_end if running == 0 else -1.0
                if quiet_for >= quiet_s:
                    return True
                if now >= deadline:
                    return False
                wait = quiet_s - quiet_for if quiet_for >= 0 else quiet_s
                self.changed.wait(min(wait, deadline - now))


PAGES = Activity()


class PageFirstLock:
    """The re-entrant lock every user of a shared model holds (:class:`ui.models.SharedModel`), with one rule added:
    a page goes first. Work behind the pages that asks for it while a page is waiting for it waits until no page
    is, and hands it over when a page began waiting while it waited too; a page arriving later waits for the part
    in progress only. Without the rule, a page that waited for one run of such work then drew lots against the threads
    also waiting: Quantization's first look on SmolLM2 took 8.9 s behind two pages' work, about 1 s alone."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pages = 0  # pages waiting for the lock now
        self._changed = threading.Condition()
        self._local = threading.local()  # .depth: how many times this thread holds it

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """As ``threading.RLock.acquire``; a thread not running a page first waits until no page waits."""
        depth = getattr(self._local, "depth", 0)
        page = PAGES.in_page()
        if depth or page:  # re-entry, or a page: counted as waiting until it holds the lock
            counted = page and not depth
            if counted:
                with self._changed:
                    self._pages += 1
            try:
                held = self._lock.acquire(blocking, timeout)
            finally:
                if counted:
                    with self._changed:
                        self._pages -= 1
                        self._changed.notify_all()
        else:
            held = self._behind(blocking, None if timeout < 0 else time.monotonic() + timeout)
        if held:
            self._local.depth = depth + 1
        return held

    def _behind(self, blocking: bool, deadline: float | None) -> bool:
        """Take the lock for work behind the pages: only while no page waits for it, and handed over when one
        started waiting while this thread waited for the lock itself."""
        while True:
            with self._changed:
                while self._pages:
                    left = None if deadline is None else deadline - time.monotonic()
                    if not blocking or (left is not None and left <= 0):
                        return False
                    self._changed.wait(left)
            left = -1 if deadline is None or not blocking else max(0.0, deadline - time.monotonic())
            if not self._lock.acquire(blocking, left):
                return False
            with self._changed:
                if not self._pages:
                    return True
            self._lock.release()  # a page began waiting meanwhile: it goes first

    def release(self) -> None:
        self._local.depth -= 1
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()
timings.give_way_to(lambda: PAGES.running > 0)  # the warm-up pauses while a visitor's page or player step runs


@dataclass(slots=True)
class Behind:
    """Work a page starts on a thread of its own and then follows (:func:`wait_for`) instead of waiting for it: at
    most one thread per key, how far it has got, and why it failed (a thread has no page to show an error on).

    What the work computes it keeps itself, where the page reads it back (a cache, a kept store); a timing among it
    starts once no page has run for a moment (:data:`PAGES`), so that the page that started it has finished drawing,
    and the warm-up pauses while it runs (:mod:`ui.timings`).
    """

    running: dict[Hashable, Status] = field(default_factory=dict)
    failed: dict[Hashable, Exception] = field(default_factory=dict)
    threads: dict[Hashable, threading.Thread] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, key: Hashable, what: str, work: Callable[[Callable[[float, str], None]], object],
              timing: bool = False) -> None:
        """Run ``work(report)`` on a thread unless one is running for ``key`` or its failure is not yet shown;
        ``report(fraction, label)`` says how far it is. what: the work in words (the progress bar's first words);
        timing: wait first for the pages to be quiet (at most :data:`TIMING_WAIT_S` seconds)."""
        with self.lock:
            if key in self.running or key in self.failed:
                return
            self.running[key] = (0.0, f"{what}: starting")

        def report(fraction: float, label: str) -> None:
            with self.lock:
                self.running[key] = (fraction, f"{what}: {label}")

        def run() -> None:
            try:
                if timing:
                    pages_first()
                    with timings.measuring():  # the warm-up pauses meanwhile
                        work(report)
                else:
                    work(report)
            except Exception as exc:  # kept for the page to show
                with self.lock:
                    self.failed[key] = exc
            finally:
                with self.lock:
                    self.running.pop(key, None)

        thread = threading.Thread(target=run, name=f"behind the page: {what}", daemon=True)
        with self.lock:
            self.threads = {k: t for k, t in self.threads.items() if t.is_alive()}
            self.threads[key] = thread
        thread.start()

    def status(self, key: Hashable) -> Status | None:
        """How far the work for ``key`` has got; None when no thread is at it."""
        with self.lock:
            return self.running.get(key)

    def failure(self, key: Hashable) -> Exception | None:
        """Why the work for ``key`` failed, handed over once: the next :meth:`start` tries again."""
        with self.lock:
            return self.failed.pop(key, None)

    def join(self, timeout_s: float = 300.0) -> None:
        """Wait for every thread started so far (tests)."""
        for thread in list(self.threads.values()):
            thread.join(timeout=timeout_s)


TIMING_WAIT_S = 10.0
BEHIND = Behind()


def pages_first() -> None:
    """Called by work behind a page between its parts (runs, rounds): a visitor's page running now goes first, so
    that it neither waits for the rest of the work nor shares the CPU with a timing (at most :data:`TIMING_WAIT_S`
    seconds). The same work run inside a page (background work off) never waits for its own page."""
    if not PAGES.in_page():  # the bars following background work (this one's among them) are no reason to wait
        PAGES.wait_idle(quiet_s=0.2, timeout_s=TIMING_WAIT_S, followers=False)


def turns(lock: threading.RLock | PageFirstLock, waiting: Callable[[], None] | None = None
          ) -> Callable[[], AbstractContextManager]:
    """Turns for work that takes a shared model run by run (round by round): a visitor's page first
    (:func:`pages_first`, nothing when the work runs inside a page), then the model's ``lock`` for one part only.
    waiting: called every :data:`LOCK_POLL_S` seconds while another user holds the lock (to say who)."""
    @contextmanager
    def turn() -> Iterator[None]:
        pages_first()
        while not lock.acquire(timeout=LOCK_POLL_S):
            if waiting is not None:
                waiting()
        try:
            yield
        finally:
            lock.release()
    return turn


LOCK_POLL_S = 0.5


@dataclass(slots=True)
class Expiring(Generic[T]):
    """Values kept ``ttl_s`` seconds, at most ``size`` of them (the oldest dropped first); thread-safe. For what work
    behind a page measures: a timing says what the machine did when it was taken, not forever."""

    ttl_s: float
    size: int
    items: dict[Hashable, tuple[T, float]] = field(default_factory=dict)  # value, when kept (monotonic s)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, key: Hashable) -> T | None:
        """The value kept for ``key`` less than :attr:`ttl_s` seconds ago, else None."""
        with self.lock:
            kept = self.items.get(key)
        return None if kept is None or time.monotonic() - kept[1] > self.ttl_s else kept[0]

    def put(self, key: Hashable, value: T) -> None:
        """Keep ``value`` for ``key`` from now on."""
        with self.lock:
            self.items.pop(key, None)
            self.items[key] = (value, time.monotonic())
            for old in list(self.items)[:max(0, len(self.items) - self.size)]:
                del self.items[old]

    def clear(self) -> None:
        """Drop every value (tests; the next view measures again)."""
        with self.lock:
            self.items.clear()


@dataclass(slots=True, frozen=True)
class Pending:
    """A section's result as the background sees it. kept: the result once computed, else None. in_flight: how
    far a thread computing it has got (None: none is). step: the warm-up step that computes it (None: no step
    does, e.g. settings other than the page's default). what: what is computed, in words."""

    kept: Callable[[], object | None]
    in_flight: Callable[[], Status | None]
    step: str | None
    what: str

    def status(self) -> Status | None:
        """How far the background has got, or None when it is not (or no longer) computing the result."""
        if self.kept() is not None:
            return None
        flight = self.in_flight()
        if flight is not None:
            return flight
        state = WARMUP.state(self.step) if self.step else None
        if state in ("queued", "running"):
            return 0.0, f"{self.what}: {WARMUP.waiting_line(self.step)}..."
        return None


@counted_fragment(run_every=POLL_S, follower=True)  # a visitor watching a bar: the warm-up's later steps wait for quiet
def _follow(pending: Pending) -> None:
    status = pending.status()
    if status is None:
        st.rerun()  # done: the whole page again, which now finds the result
    fraction, label = status
    st.progress(min(max(float(fraction), 0.0), 1.0), text=label)
    st.caption("Computed in the background; the rest of the page is ready, and this section fills in by itself "
               "when it is done.")


def wait_for(pending: Pending, button: str, key: str, off_note: str) -> bool:
    """Draw what a section shows while its result is not kept; True when the caller should compute it now.

    While the background computes it (or the warm-up has it queued): a progress bar that follows it and reruns the
    page when it is done (False). A default result the warm-up never had (the warm-up is off): ``off_note`` and a
    button labelled ``button`` (True once pressed). Otherwise (other settings, or the warm-up's try is over): True.
    """
    state = WARMUP.state(pending.step) if pending.step else None
    if pending.in_flight() is not None or state in ("queued", "running"):
        if pending.step:
            WARMUP.hurry(pending.step)
        _follow(pending)
        return False
    if pending.step is not None and state is None:
        st.info(off_note, icon=":material/schedule:")
        return st.button(button, key=key)
    return True


def computed_behind(key: Hashable, what: str, kept: Callable[[], T | None],
                    work: Callable[[Callable[[float, str], None]], object], timing: bool = False) -> T | None:
    """A section's result: ``kept()`` when it is there; else ``work`` (which keeps it where ``kept`` finds it) runs
    behind the page (:data:`BEHIND`) while a bar here follows it and reruns the page when it is done (None). With
    background work off (:func:`enabled`), ``work`` runs here under a progress bar instead. A failure behind the page
    is raised here, on the page that follows it (and the next view tries again). Every way holds one place on the
    page (the bar's, or an empty element once the result is kept), so what follows keeps its place (why:
    :mod:`ui.params`)."""
    result = kept()
    if result is not None:
        st.empty()
        return result
    if not enabled():
        with progress_bar(show_after_s=0.0) as bar:
            work(lambda fraction, label: bar(fraction, f"{what}: {label}"))
        return kept()
    failure = BEHIND.failure(key)
    if failure is not None:
        raise failure
    BEHIND.start(key, what, work, timing)
    _follow(Pending(kept, lambda: BEHIND.status(key), None, what))
    return None
