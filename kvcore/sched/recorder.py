"""What a simulated run records besides the requests' own times: one row per step, phase intervals per
request (for the Gantt view), gaps between a request's tokens, the schedule and the preemptions."""

from __future__ import annotations

import math

from kvcore.sched.request import RequestState
from kvcore.sched.scheduler import Scheduler, SchedulerOutput

TIMELINE_COLUMNS = ("step", "time_s", "step_s", "running", "waiting", "kv_blocks_used", "batch_tokens",
                    "prefill_tokens", "decode_tokens", "output_tokens", "swap_s", "swap_tokens", "preemptions",
                    "attn_pairs", "kv_tokens_read")


class Recorder:
    """What a run leaves behind besides the requests' own times: per-step rows, phase intervals, token gaps,
    the schedule (step, request, tokens) and the preemptions (step, request)."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {k: [] for k in TIMELINE_COLUMNS}
        self.phases: list[tuple[int, str, float, float]] = []
        self.itl_s: list[float] = []
        self.schedule: list[tuple[int, int, int]] = []
        self.preemptions: list[tuple[int, int]] = []

    def set_phase(self, r: RequestState, phase: str, t: float) -> None:
        """Close ``r``'s current phase interval at ``t`` (kept if not empty) and open ``phase``."""
        if t > r.phase_start_s:
            self.phases.append((r.req.index, r.phase, r.phase_start_s, t))
        r.phase, r.phase_start_s = phase, t

    def scheduled(self, out: SchedulerOutput, sched: Scheduler, now: float, dt: float, swap_s: float) -> None:
        """A step starts at ``now`` and lasts ``dt``: its row, its grants, admissions and preemptions."""
        for r in out.preempted:
            self.set_phase(r, "preempted", now)
            self.preemptions.append((out.step, r.req.index))
        for r in out.admitted:
            if math.isnan(r.first_scheduled_s):
                r.first_scheduled_s = now
            self.set_phase(r, "prefill" if r.in_prefill else "decode", now)
        self.schedule += [(out.step, r.req.index, n) for r, n in out.scheduled]
        values = (out.step, now, dt, len(sched.running), len(sched.waiting), out.kv_blocks_used, out.new_tokens,
                  out.prefill_tokens, out.decode_tokens, len(out.sampling), swap_s, out.swap_tokens, len(out.preempted),
                  out.attn_pairs, out.kv_tokens_read)
        for name, value in zip(TIMELINE_COLUMNS, values, strict=True):
            self.columns[name].append(value)

    def sampled(self, out: SchedulerOutput, finished: list[RequestState], end: float) -> None:
        """The step that ended at ``end`` produced a token for each sampling request."""
        for r in out.sampling:
            if len(r.output_ids) == 1:
                r.first_token_s = end
            else:
                self.itl_s.append(end - r.last_token_s)
            r.last_token_s = end
            if r.phase == "prefill":
                self.set_phase(r, "decode", end)
        for r in finished:
            r.finish_s = end
            self.set_phase(r, "done", end)
