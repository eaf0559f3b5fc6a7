"""What a run records: when each request was scheduled, got its first token and finished, one row per step,
phase intervals per request (for the Gantt view), gaps between a request's tokens, the schedule and the
preemptions. The scheduler decides and knows no time; the simulator and the engine each drive a Recorder
with their own clock (simulated or measured)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvcore.sched.request import RequestState
from kvcore.sched.scheduler import Scheduler, SchedulerOutput

TIMELINE_COLUMNS = ("step", "time_s", "step_s", "running", "waiting", "kv_blocks_used", "batch_tokens",
                    "prefill_tokens", "decode_tokens", "output_tokens", "swap_s", "swap_tokens", "preemptions",
                    "attn_pairs", "kv_tokens_read", "sequences", "prefill_seqs")


@dataclass(slots=True)
class RequestTimes:
    """When things happened to one sequence (seconds of the run's clock) and the phase it is in."""

    phase_start_s: float
    phase: str = "waiting"
    first_scheduled_s: float = math.nan
    first_token_s: float = math.nan
    last_token_s: float = math.nan
    finish_s: float = math.nan


class Recorder:
    """What a run leaves behind besides the requests' own times: per-step rows, phase intervals, token gaps,
    the schedule (step, request, tokens) and the preemptions (step, request)."""

    def __init__(self) -> None:
        self.times: dict[str, RequestTimes] = {}  # by sequence id (RequestState.rid)
        self.columns: dict[str, list] = {k: [] for k in TIMELINE_COLUMNS}
        self.phases: list[tuple[int, str, float, float]] = []
        self.itl_s: list[float] = []
        self.schedule: list[tuple[int, int, int]] = []
        self.preemptions: list[tuple[int, int]] = []

    def of(self, r: RequestState) -> RequestTimes:
        """``r``'s times (a sequence is waiting from its request's arrival until it is first seen)."""
        times = self.times.get(r.rid)
        if times is None:
            times = self.times[r.rid] = RequestTimes(r.req.arrival_s)
        return times

    def set_phase(self, r: RequestState, phase: str, t: float) -> None:
        """Close ``r``'s current phase interval at ``t`` (kept if not empty) and open ``phase``."""
        times = self.of(r)
        if t > times.phase_start_s:
            self.phases.append((r.req.index, times.phase, times.phase_start_s, t))
        times.phase, times.phase_start_s = phase, t

    def scheduled(self, out: SchedulerOutput, sched: Scheduler, now: float, dt: float, swap_s: float) -> None:
        """A step starts at ``now`` and lasts ``dt``: its row, its grants, admissions and preemptions."""
        for r in out.preempted:
            self.set_phase(r, "preempted", now)
            self.preemptions.append((out.step, r.req.index))
        for r in out.admitted:
            times = self.of(r)
            if math.isnan(times.first_scheduled_s):
                times.first_scheduled_s = now
            self.set_phase(r, "prefill" if r.in_prefill else "decode", now)
        self.schedule += [(out.step, r.req.index, n) for r, n in out.scheduled]
        values = (out.step, now, dt, len(sched.running), len(sched.waiting), out.kv_blocks_used, out.new_tokens,
                  out.prefill_tokens, out.decode_tokens, len(out.sampling), swap_s, out.swap_tokens, len(out.preempted),
                  out.attn_pairs, out.kv_tokens_read, len(out.scheduled), out.prefill_seqs)
        for name, value in zip(TIMELINE_COLUMNS, values, strict=True):
            self.columns[name].append(value)

    def sampled(self, out: SchedulerOutput, finished: list[RequestState], end: float) -> None:
        """The step that ended at ``end`` produced a token for each sampling request."""
        for r in out.sampling:
            times = self.of(r)
            if len(r.output_ids) == 1:
                times.first_token_s = end
            else:
                self.itl_s.append(end - times.last_token_s)
            times.last_token_s = end
            if times.phase == "prefill":
                self.set_phase(r, "decode", end)
        for r in finished:
            self.of(r).finish_s = end
            self.set_phase(r, "done", end)
