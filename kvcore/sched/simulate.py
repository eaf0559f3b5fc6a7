"""Run a workload through one scheduler on the real block manager, step by step, in simulated time.

Each step: requests that have arrived join the waiting queue; the scheduler grants tokens and allocates
KV through ``kvcore.paged.KVCacheManager``; the step lasts ``CostModel.step_time(new tokens, attention
pairs, KV tokens read)`` plus host-link time for swapped KV; tokens sampled in the step are stamped
with its end time. When nothing runs, time jumps to the next arrival.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvcore.sched.config import SimConfig
from kvcore.sched.metrics import SimResult, build_result
from kvcore.sched.request import RequestState
from kvcore.sched.scheduler import Scheduler, StepWork
from kvcore.sched.workload import Workload

PROGRESS_EVERY = 512  # steps between progress callbacks


def simulate(workload: Workload, config: SimConfig, progress: Callable[[float], None] | None = None) -> SimResult:
    """Serve every request of ``workload`` with ``config``; return per-request, per-step and summary tables.

    progress: optional callback, given the fraction of requests finished (0..1) now and then.
    Raises ValueError when a request can never be served (longer than the KV pool, or, without chunked
    prefill, than the token budget).
    """
    num_blocks = config.pool_blocks()
    _check_fits(workload, config, num_blocks)
    sched = Scheduler(config, num_blocks)
    states = [RequestState.new(r, workload.prompt_ids(r.index)) for r in workload.requests]
    arrivals = [r.arrival_s for r in workload.requests]
    cost, host_bw = config.cost, config.cost.gpu.host_link_bandwidth
    kv_per_token = cost.kv_bytes_per_token
    columns: dict[str, list] = {k: [] for k in TIMELINE_COLUMNS}
    itl_counts: list[int] = []
    ends = sched.step_end_s
    n, pending, done, now, step = len(states), 0, 0, 0.0, 0
    while done < n:
        while pending < n and arrivals[pending] <= now:
            sched.waiting.append(states[pending])
            pending += 1
        if not sched.running and not sched.waiting:
            now = arrivals[pending]
            continue
        itl_before = len(sched.itl_gaps)
        work = sched.schedule(now, step)
        swap_s = work.swap_tokens * kv_per_token / host_bw
        if work.new_tokens == 0 and swap_s == 0:
            if pending >= n and not sched.running:
                raise RuntimeError("the scheduler made no progress with nothing left to arrive")
            now = max(now, arrivals[pending]) if pending < n else now
            continue
        dt = cost.step_time(work.new_tokens, work.attn_pairs, work.kv_tokens_read) + swap_s
        end = now + dt
        ends.append(end)
        itl_counts.append(len(sched.itl_gaps) - itl_before)
        for r in work.prefill_done:
            if r.num_generated == 1:
                r.first_token_s = end
            sched.set_phase(r, "decode", end)
        for r in work.finished:
            r.finish_s = end
            sched.set_phase(r, "done", end)
        done += len(work.finished)
        _record(columns, step, now, dt, swap_s, sched, work)
        now = end
        step += 1
        if progress is not None and step % PROGRESS_EVERY == 0:
            progress(done / n)
    if progress is not None:
        progress(1.0)
    # each gap ran from the previous token to its step's start; the step's own duration completes it
    itl = np.asarray(sched.itl_gaps) + np.repeat(np.asarray(columns["step_s"]), itl_counts)
    return build_result(workload, config, num_blocks, states, columns, sched, itl)


TIMELINE_COLUMNS = ("step", "time_s", "step_s", "running", "waiting", "kv_blocks_used", "batch_tokens",
                    "prefill_tokens", "decode_tokens", "output_tokens", "swap_s", "preemptions")


def _record(columns: dict[str, list], step: int, now: float, dt: float, swap_s: float, sched: Scheduler,
            work: StepWork) -> None:
    values = (step, now, dt, len(sched.running) + len(work.finished), len(sched.waiting), work.kv_blocks_used,
              work.new_tokens, work.prefill_tokens, work.decode_tokens, work.sampled_tokens, swap_s, work.preemptions)
    for name, value in zip(TIMELINE_COLUMNS, values, strict=True):
        columns[name].append(value)


def _check_fits(workload: Workload, config: SimConfig, num_blocks: int) -> None:
    bs = config.block_size
    longest = max(workload.requests, key=lambda r: r.prompt_tokens + r.output_tokens)
    need = -(-(longest.prompt_tokens + longest.output_tokens) // bs)
    if need > num_blocks:
        raise ValueError(
            f"request {longest.index} ({longest.prompt_tokens} prompt + {longest.output_tokens} output tokens) "
            f"needs {need} KV blocks of {bs} tokens but the pool has {num_blocks}; give the pool more blocks "
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
