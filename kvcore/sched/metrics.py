"""Serving metrics of a simulation, as vLLM's ``benchmark_serving`` reports them, and the result tables.

* TTFT: first token time - arrival. TPOT: (finish - first token) / (output tokens - 1), per request
  (requests with one output token have none). ITL: gap between consecutive tokens of a request, per
  token. End-to-end latency: finish - arrival. Queue time: first scheduled - arrival.
* Throughput: output tokens / makespan and requests / makespan, makespan = last finish - first arrival.
* Prefix-cache hit rate (tokens): prompt tokens served from the prefix cache / prompt tokens looked up,
  counted once per request, at its first admission. A re-admission after a recompute preemption finds
  the request's own blocks again (its prompt and generated tokens); those hits are reported apart as
  ``readmit_hit_tokens`` and are not in the rate (vLLM counted them until vllm-project/vllm#25780, which
  made a random workload with no shared prefix show a 30% hit rate). Hits are whole blocks and the last
  prompt token is always computed, so a shared prefix shorter than one block can never hit (the floor
  vllm-project/vllm#54607 asks to document) and a fully shared prompt reads below 100%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from kvcore.sched.config import SimConfig
from kvcore.sched.recorder import Recorder
from kvcore.sched.request import RequestState
from kvcore.sched.scheduler import Scheduler
from kvcore.sched.workload import Workload

PHASES = ("waiting", "prefill", "decode", "preempted")
PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class SimResult:
    """Everything one simulation measured.

    requests: one row per request (times in seconds of simulated time, latencies in ms).
    timeline: one row per step (time_s = step start, running / waiting counts, KV blocks held, tokens).
    phases: Gantt intervals (request, start_s, end_s, phase in waiting / prefill / decode / preempted).
    summary: one row of metrics (see the module docstring for definitions).
    num_blocks: size of the KV pool in blocks. schedule: one row per step and request granted tokens
    (``step``, ``request``, ``tokens``, in the order the scheduler granted them); preemption_events: one row
    per preemption (``step``, ``request``).
    """

    config: SimConfig
    requests: pd.DataFrame
    timeline: pd.DataFrame
    phases: pd.DataFrame
    summary: pd.DataFrame
    num_blocks: int
    schedule: pd.DataFrame
    preemption_events: pd.DataFrame

    @property
    def label(self) -> str:
        return self.config.label


def build_result(workload: Workload, config: SimConfig, num_blocks: int, states: list[RequestState],
                 rec: Recorder, sched: Scheduler, itl_s: np.ndarray) -> SimResult:
    """Turn the simulator's lists into DataFrames and the summary row (pandas only here, after the loop)."""
    requests = request_table(states, rec)
    timeline = pd.DataFrame(rec.columns)
    timeline["kv_usage"] = timeline["kv_blocks_used"] / sched.manager.num_usable_blocks
    phases = pd.DataFrame(rec.phases, columns=["request", "phase", "start_s", "end_s"])
    phases = phases[phases["phase"].isin(PHASES)].reset_index(drop=True)
    summary = summarize(config, requests, timeline, itl_s, sched, num_blocks)
    schedule = pd.DataFrame(rec.schedule, columns=["step", "request", "tokens"])
    preemptions = pd.DataFrame(rec.preemptions, columns=["step", "request"])
    return SimResult(config, requests, timeline, phases, summary, num_blocks, schedule, preemptions)


def request_table(states: list[RequestState], rec: Recorder) -> pd.DataFrame:
    """One row per request: lengths, times (from the run's recorder) and latencies."""
    times = [rec.of(s) for s in states]
    df = pd.DataFrame({
        "request": [s.req.index for s in states],
        "arrival_s": [s.req.arrival_s for s in states],
        "prompt_tokens": [s.req.prompt_tokens for s in states],
        "output_tokens": [s.req.output_tokens for s in states],
        "prefix_id": pd.array([s.req.prefix_id for s in states], dtype="Int64"),
        "first_scheduled_s": [t.first_scheduled_s for t in times],
        "first_token_s": [t.first_token_s for t in times],
        "finish_s": [t.finish_s for t in times],
        "generated_tokens": [s.num_generated for s in states],
        "preemptions": [s.num_preemptions for s in states],
        "prefix_hit_tokens": [s.prefix_hit_tokens for s in states],
        "readmit_hit_tokens": [s.readmit_hit_tokens for s in states],
    })
    df["queue_ms"] = (df["first_scheduled_s"] - df["arrival_s"]) * 1e3
    df["ttft_ms"] = (df["first_token_s"] - df["arrival_s"]) * 1e3
    decode_tokens = (df["generated_tokens"] - 1).where(df["generated_tokens"] > 1)
    df["tpot_ms"] = (df["finish_s"] - df["first_token_s"]) * 1e3 / decode_tokens
    df["e2e_ms"] = (df["finish_s"] - df["arrival_s"]) * 1e3
    return df


def percentiles(values: pd.Series | np.ndarray, prefix: str) -> dict[str, float]:
    """``{prefix_p50: ..., prefix_p90: ..., prefix_p99: ...}``, NaN when there are no values."""
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    if not arr.size:
        return {f"{prefix}_p{p}": float("nan") for p in PERCENTILES}
    return {f"{prefix}_p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES), strict=True)}


def summarize(config: SimConfig, requests: pd.DataFrame, timeline: pd.DataFrame, itl_s: np.ndarray,
              sched: Scheduler, num_blocks: int) -> pd.DataFrame:
    """The one-row metrics table of a run."""
    makespan = float(requests["finish_s"].max() - requests["arrival_s"].min())
    out_tokens = int(requests["generated_tokens"].sum())
    prompt_tokens = int(requests["prompt_tokens"].sum())
    first_hits = int(requests["prefix_hit_tokens"].sum())
    durations = timeline["step_s"].to_numpy()
    busy = float(durations.sum())
    row: dict[str, object] = {
        "scheduler": config.label,
        "rules": config.rules + (" async" if config.async_scheduling else ""),
        "requests": len(requests),
        "output_tokens": out_tokens,
        "makespan_s": makespan,
        "output_tok_per_s": out_tokens / makespan if makespan > 0 else float("nan"),
        "requests_per_s": len(requests) / makespan if makespan > 0 else float("nan"),
    }
    row |= percentiles(requests["ttft_ms"], "ttft_ms")
    row |= percentiles(requests["tpot_ms"], "tpot_ms")
    row |= percentiles(itl_s * 1e3, "itl_ms")
    row |= percentiles(requests["e2e_ms"], "e2e_ms")
    row |= percentiles(requests["queue_ms"], "queue_ms")
    bytes_per_token = 0.0 if config.cost is None else config.cost.kv_bytes_per_token  # no cost: nothing swaps
    row |= {
        "preemptions": sched.num_preemptions,
        "swap_fallbacks": sched.swap_fallbacks,
        "swap_GB": float(timeline["swap_tokens"].sum() * bytes_per_token / 1e9),
        "prefix_hit_rate": first_hits / prompt_tokens if config.enable_prefix_caching else 0.0,
        "prefix_hit_tokens": first_hits,
        "readmit_hit_tokens": int(requests["readmit_hit_tokens"].sum()),
        "recomputed_tokens": int(timeline["prefill_tokens"].sum()) - (prompt_tokens - first_hits),
        "mean_batch": float((timeline["running"] * durations).sum() / busy) if busy else 0.0,
        "mean_kv_usage": float((timeline["kv_usage"] * durations).sum() / busy) if busy else 0.0,
        "peak_kv_usage": float(timeline["kv_usage"].max()),
        "kv_blocks": num_blocks,
        "steps": len(timeline),
    }
    return pd.DataFrame([row])
