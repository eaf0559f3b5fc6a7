"""ui.timings: a thread that gives way (the warm-up) waits at its progress reports while a timing is measured;
every other thread never waits there."""

from __future__ import annotations

import threading
import time

from ui import timings


def test_a_thread_that_gives_way_pauses_while_a_timing_runs_and_others_do_not():
    reached: list[float] = []
    go = threading.Event()

    def warmup() -> None:
        timings.give_way_here()
        go.wait()
        timings.pause_point()
        reached.append(time.monotonic())

    thread = threading.Thread(target=warmup)
    thread.start()
    with timings.measuring():
        assert timings.running() == 1
        go.set()
        timings.pause_point()  # this thread does not give way: no wait
        time.sleep(0.3)
        assert reached == []  # the warm-up waits for the timing
        released = time.monotonic()
    thread.join(5)
    assert reached
    assert reached[0] >= released
    assert timings.running() == 0


def test_a_pause_ends_after_its_limit_if_a_timing_never_does():
    done = []

    def warmup() -> None:
        timings.give_way_here()
        timings.pause_point(max_pause_s=0.2)
        done.append(True)

    with timings.measuring():
        thread = threading.Thread(target=warmup)
        thread.start()
        thread.join(5)
        assert done == [True]


def test_the_warm_up_gives_way_to_a_page_run():
    from ui import background

    reached = []
    go = threading.Event()

    def warmup() -> None:
        timings.give_way_here()
        go.wait()
        timings.pause_point()
        reached.append(True)

    thread = threading.Thread(target=warmup)
    thread.start()
    with background.PAGES.page_run():
        go.set()
        time.sleep(0.3)
        assert reached == []
    thread.join(5)
    assert reached == [True]


def test_work_behind_a_page_lets_pages_go_first_but_a_page_never_waits_for_itself():
    from ui import background

    ran = threading.Event()

    def visitor():
        with background.PAGES.page_run():
            ran.set()
            time.sleep(0.6)

    thread = threading.Thread(target=visitor)
    thread.start()
    ran.wait()
    start = time.monotonic()
    background.pages_first()  # another thread's page runs: wait for it, then 0.2 s of quiet
    assert time.monotonic() - start >= 0.5
    thread.join()
    with background.PAGES.page_run():
        start = time.monotonic()
        background.pages_first()  # inside a page (background work off): no wait
        assert time.monotonic() - start < 0.1


def test_a_bar_following_background_work_holds_the_warm_up_but_not_that_work():
    from ui import background

    done = threading.Event()

    def follower():
        with background.PAGES.page_run(follower=True):
            done.wait(2.0)

    thread = threading.Thread(target=follower)
    thread.start()
    time.sleep(0.3)  # the follower's run has started; the last visit ended long enough ago
    start = time.monotonic()
    background.pages_first()
    assert time.monotonic() - start < 0.5  # the work behind the page goes on
    assert not background.PAGES.wait_idle(quiet_s=0.1, timeout_s=0.3)  # the warm-up still waits for the bar
    done.set()
    thread.join()


def test_a_turn_says_it_waits_while_another_user_holds_the_model():
    from ui import background

    lock, held, calls = threading.RLock(), threading.Event(), []

    def other_user():
        with lock:
            held.set()
            time.sleep(1.2)

    thread = threading.Thread(target=other_user)
    thread.start()
    held.wait()
    with background.turns(lock, lambda: calls.append(time.monotonic()))():
        assert lock._is_owned()  # the turn holds the model
    assert len(calls) >= 1  # it said so at least once while it waited (every 0.5 s)
    thread.join()
    assert not lock._is_owned()


def test_a_page_waiting_for_a_shared_model_goes_before_work_behind_the_pages():
    """The defect: a page that waited for one run of work behind the pages then drew lots for the model's lock against
    the threads also waiting (Quantization's first look on SmolLM2 took 8.9 s, about 1 s alone)."""
    from ui import background

    lock, order = background.PageFirstLock(), []

    def behind() -> None:
        with lock:
            order.append("behind")

    def page() -> None:
        with background.PAGES.page_run(), lock:
            order.append("page")

    with lock:  # a run in progress; work behind the pages asks first, then a page
        waiting = threading.Thread(target=behind)
        waiting.start()
        time.sleep(0.2)
        visitor = threading.Thread(target=page)
        visitor.start()
        time.sleep(0.2)
        with lock:  # re-entrant for its holder
            pass
    waiting.join(5)
    visitor.join(5)
    assert order == ["page", "behind"]
    assert lock.acquire(timeout=0.1)  # free again, with RLock's signature
    assert not threading.Thread(target=lambda: order.append(lock.acquire(blocking=False))).start()
    time.sleep(0.1)
    assert order[-1] is False  # held here: another thread cannot take it
    lock.release()
