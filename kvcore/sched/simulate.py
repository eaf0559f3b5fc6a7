"""Run a workload through one scheduler on the real block manager, step by step, in simulated time.

The loop is vLLM's engine core (``vllm/v1/engine/core.py``): requests that have arrived join the waiting
queue; ``Scheduler.schedule`` grants tokens and allocates KV through ``kvcore.paged.KVCacheManager``; the
step lasts the cost model's ``step_time(new tokens, attention pairs, KV tokens read)`` plus host-link time
for swapped KV; then ``Scheduler.update_from_output`` takes the step's samples, stamped with its end time.
Synchronously the output is taken right after its step (``EngineCore.step``); with ``async_scheduling``
two steps are in flight and each output is taken after the next step is scheduled
(``EngineCore.step_with_batch_queue``). When nothing runs, time jumps to the next arrival.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from kvcore.sched.config import SimConfig
from kvcore.sched.metrics import SimResult, build_result
from kvcore.sched.recorder import Recorder
from kvcore.sched.request import RequestState
from kvcore.sched.scheduler import Scheduler, SchedulerOutput
from kvcore.sched.workload import Workload

PROGRESS_EVERY = 512  # steps between progress callbacks
def simulate(workload: Workload, config: SimConfig, progress: Callable[[float], None] | None = None,
             on_step: Callable[[SchedulerOutput, Scheduler], None] | None = None) -> SimResult:
    """Serve every request of ``workload`` with ``config``; return per-request, per-step and summary tables.

    progress: optional callback, given the fraction of requests finished (0..1) now and then.
    on_step: called as ``on_step(output, scheduler)`` right after each step is scheduled (to read block tables).
    Raises ValueError when a request can never be served (longer than the KV pool, or, without chunked
    prefill, than the token budget).
    """
    if config.cost is None:
        raise ValueError("a simulation needs a cost model for its step times (config.cost is None)")
    num_blocks = config.pool_blocks()
    _check_fits(workload, config, num_blocks - config.null_block)
    sched, rec = Scheduler(config, num_blocks), Recorder()
    states = [RequestState.new(r, workload.prompt_ids(r.index)) for r in workload.requests]
    arrivals = [r.arrival_s for r in workload.requests]
    cost, depth = config.cost, 2 if config.async_scheduling else 1
    in_flight: deque[tuple[SchedulerOutput, float]] = deque()  # newest first
    n, pending, done, now = len(states), 0, 0, 0.0
    while done < n:
        while pending < n and arrivals[pending] <= now:
            sched.add_request(states[pending])
            pending += 1
        if sched.has_requests():
            out = sched.schedule()
            if out.scheduled or out.preempted:
                swap_s = out.swap_tokens * cost.kv_bytes_per_token / cost.host_link_bandwidth
                dt = cost.step_time(out.new_tokens, out.attn_pairs, out.kv_tokens_read, len(out.scheduled),
                                    out.prefill_seqs) + swap_s
                rec.scheduled(out, sched, now, dt, swap_s)
                if on_step is not None:
                    on_step(out, sched)
                now += dt
                in_flight.appendleft((out, now))
                if len(in_flight) < depth:
                    continue
        if not in_flight:  # nothing runs and nothing could be admitted: wait for the next arrival
            if pending >= n:
                raise RuntimeError("the scheduler made no progress with nothing left to arrive")
            now = max(now, arrivals[pending])
            continue
        out, end = in_flight.pop()
        finished = sched.update_from_output(out)
        rec.sampled(out, finished, end)
        done += len(finished)
        if progress is not None and (out.step + 1) % PROGRESS_EVERY == 0:
            progress(done / n)
    if progress is not None:
        progress(1.0)
    return build_result(workload, config, num_blocks, states, rec, sched, np.asarray(rec.itl_s))


def _check_fits(workload: Workload, config: SimConfig, usable_blocks: int) -> None:
    bs = config.block_size
    longest = max(workload.requests, key=lambda r: r.prompt_tokens + r.output_tokens)
    need = -(-(longest.prompt_tokens + longest.output_tokens) // bs)
    if need > usable_blocks:
        raise ValueError(
            f"request {longest.index} ({longest.prompt_tokens} prompt + {longest.output_tokens} output tokens) "
            f"needs {need} KV blocks of {bs} tokens but the pool has {usable_blocks}; give the pool more blocks "
            "or shorten the requests")
    if config.policy == "continuous":
        limit = config.max_num_batched_tokens
        if longest.prompt_tokens + longest.output_tokens > limit:
            raise ValueError(
                f"request {longest.index} has {longest.prompt_tokens + longest.output_tokens} prompt + output "
                f"tokens, more than the token budget ({limit}); without chunked prefill a prompt (and, after a "
                "recompute preemption, its generated tokens) is prefilled in one step, so the budget must cover "
                "the longest request (vLLM: max_num_batched_tokens >= max_model_len). Raise the budget or use "
                "chunked prefill")
