"""Serving-config search: the engine settings with the highest throughput under latency SLOs, on the simulator.

Follows Vidur-Search (Agrawal et al., MLSys 2024): simulate every configuration of a grid (``max_num_seqs`` x
``max_num_batched_tokens`` x chunked prefill or continuous batching x block size x prefix caching) on one
workload, with the roofline cost of a model on a GPU preset or a step time fitted to this machine's engine,
and keep the configurations whose p99 time to first token and p99 time per output token meet the SLOs.

* **best**: the configuration meeting the SLOs with the highest output tokens/s at the workload's arrival rate
  (ties: lower TTFT p99, then lower TPOT p99, then grid order).
* **Pareto front**: the configurations no other beats on both throughput and the chosen latency (p99).
* **capacity**: the best configuration at other arrival rates (the same requests, arrivals compressed or
  stretched in time): rates doubling up from the workload's, then ``probes`` rates evenly between the last one
  meeting the SLOs and the first one missing them. The capacity is the highest probed rate below the first miss.
  When no configuration meets the SLOs, the one closest to them is probed at halving rates instead.

Every simulation is one task of :func:`kvcore.study.engines.run_tasks`, so a search runs in this process,
in a process pool, or on a Ray cluster alike.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from kvcore.sched.compare import RULES, ServingSetup
from kvcore.sched.config import SimConfig
from kvcore.sched.cost import FittedCost
from kvcore.sched.simulate import simulate
from kvcore.sched.workload import Workload
from kvcore.study.engines import TaskResult, run_tasks
from kvcore.study.names import LATENCIES

SCHEDULERS = ("continuous", "chunked")
CONFIG_COLUMNS = ("scheduler", "max_num_seqs", "max_num_batched_tokens", "block_size", "prefix_caching")
METRICS = ("output_tok_per_s", "requests_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99",
           "e2e_ms_p99", "preemptions", "peak_kv_usage", "prefix_hit_rate", "kv_blocks")


@dataclass(slots=True, frozen=True)
class SLO:
    """Latency targets, p99 over requests: time to first token and time per output token, in ms."""

    ttft_p99_ms: float = 500.0
    tpot_p99_ms: float = 50.0

    def __post_init__(self) -> None:
        for name in ("ttft_p99_ms", "tpot_p99_ms"):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"SLO {name} must be a positive number of ms, got {value!r}")

    def met(self, ttft_p99_ms: float, tpot_p99_ms: float) -> bool:
        """Both p99s at or under their targets (a NaN p99, nothing measured, does not meet them)."""
        return bool(ttft_p99_ms <= self.ttft_p99_ms and tpot_p99_ms <= self.tpot_p99_ms)


@dataclass(slots=True, frozen=True)
class ServingConfig:
    """One point of the search: vLLM's engine arguments of the same names (chunked = enable_chunked_prefill)."""

    scheduler: str = "chunked"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    prefix_caching: bool = False

    def record(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in CONFIG_COLUMNS}


def _ints(name: str, values: tuple, low: int = 1) -> None:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
        raise ValueError(f"{name} must be one or more integers >= {low}, got {values!r}")


@dataclass(slots=True, frozen=True)
class SearchSpace:
    """The values crossed; a combination with fewer batched tokens than sequences is left out (vLLM refuses it)."""

    max_num_seqs: tuple[int, ...] = (64, 128, 256)
    max_num_batched_tokens: tuple[int, ...] = (2048, 8192)
    schedulers: tuple[str, ...] = SCHEDULERS
    block_sizes: tuple[int, ...] = (16, 32)
    prefix_caching: tuple[bool, ...] = (False, True)

    def __post_init__(self) -> None:
        _ints("max_num_seqs", self.max_num_seqs)
        _ints("max_num_batched_tokens", self.max_num_batched_tokens)
        _ints("block_sizes", self.block_sizes)
        bad = [s for s in self.schedulers if s not in SCHEDULERS]
        if bad or not self.schedulers:
            raise ValueError(f"schedulers must be some of {SCHEDULERS}, got {self.schedulers!r}")
        if not self.prefix_caching or any(not isinstance(p, bool) for p in self.prefix_caching):
            raise ValueError(f"prefix_caching must be one or both of False, True, got {self.prefix_caching!r}")

    def configs(self) -> list[ServingConfig]:
        """Every valid combination, in a fixed order (the last setting changes fastest)."""
        axes = (dict.fromkeys(self.schedulers), dict.fromkeys(self.max_num_seqs),
                dict.fromkeys(self.max_num_batched_tokens), dict.fromkeys(self.block_sizes),
                dict.fromkeys(self.prefix_caching))
        return [ServingConfig(*combo) for combo in itertools.product(*axes) if combo[2] >= combo[1]]


@dataclass(slots=True, frozen=True)
class Deployment:
    """What every configuration shares: the model and GPU presets (roofline cost), or a fitted step time with a
    pool of ``num_blocks`` blocks; the scheduler rules (textbook or vLLM 0.33's)."""

    model: str = "llama-3-8b"
    gpu: str = "H100 80GB"
    cost: FittedCost | None = None
    num_blocks: int | None = None
    rules: str = RULES[0]

    def sim_config(self, config: ServingConfig) -> SimConfig:
        """The simulator's engine for ``config`` (ValueError for unknown presets or a pool without a size)."""
        budget = config.max_num_batched_tokens
        setup = ServingSetup(self.model, self.gpu, (config.scheduler,), budget, budget, config.max_num_seqs,
                             "recompute", None, config.prefix_caching, config.block_size, self.num_blocks,
                             self.rules, self.cost)
        return setup.configs()[0]


@dataclass(slots=True, frozen=True)
class SearchTask:
    """One simulation: a configuration on the workload with its arrivals ``rate_scale`` times as dense."""

    deployment: Deployment
    config: ServingConfig
    workload: Workload
    rate_scale: float = 1.0


def scale_arrivals(workload: Workload, factor: float) -> Workload:
    """The same requests arriving ``factor`` times as fast (every arrival time divided by ``factor``)."""
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"a rate factor must be a positive number, got {factor}")
    if factor == 1.0:
        return workload
    return replace(workload, requests=tuple(replace(r, arrival_s=r.arrival_s / factor) for r in workload.requests))


def offered_rate(workload: Workload) -> float:
    """Requests per second the workload offers: (requests - 1) / the span of arrivals (NaN if all arrive at once)."""
    span = workload.requests[-1].arrival_s - workload.requests[0].arrival_s
    return (len(workload.requests) - 1) / span if span > 0 else float("nan")


def simulate_task(task: SearchTask) -> dict[str, object]:
    """Simulate one task; its metrics, or an ``error`` when the configuration cannot serve the workload."""
    row: dict[str, object] = task.config.record()
    try:
        result = simulate(scale_arrivals(task.workload, task.rate_scale), task.deployment.sim_config(task.config))
    except ValueError as exc:
        return row | dict.fromkeys(METRICS, float("nan")) | {"error": str(exc)}
    summary = result.summary.iloc[0]
    return row | {m: summary[m].item() if hasattr(summary[m], "item") else summary[m] for m in METRICS} | \
        {"error": None}


@dataclass(slots=True)
class SearchResult:
    """configs: one row per configuration (metrics, meets_slo, pareto, best); best: the best row (None when no
    configuration meets the SLOs); probed: the row whose capacity was searched (the best one, else the one closest
    to the SLOs); capacity: its probes (rate, metrics, meets_slo); capacity_rps: the highest probed rate meeting the
    SLOs below the first one that does not (NaN when even the lowest misses them); failing_rps: that first one (inf
    when none missed them)."""

    configs: pd.DataFrame
    capacity: pd.DataFrame
    best: dict[str, object] | None
    rate: float
    slo: SLO
    latency: str
    capacity_rps: float = float("nan")
    failing_rps: float = float("nan")
    seconds: float = 0.0
    simulations: int = 0
    lines: list[str] = field(default_factory=list)
    probed: dict[str, object] | None = None


def pareto_front(throughput: Sequence[float], latency: Sequence[float]) -> list[bool]:
    """Which points no other point beats: at least as much throughput and at most as much latency, one strictly.
    NaN points are never on the front."""
    t, lat = np.asarray(throughput, dtype=float), np.asarray(latency, dtype=float)
    ok = np.isfinite(t) & np.isfinite(lat)
    front = []
    for i in range(len(t)):
        dominated = ok & (t >= t[i]) & (lat <= lat[i]) & ((t > t[i]) | (lat < lat[i]))
        front.append(bool(ok[i] and not dominated.any()))
    return front


def best_index(table: pd.DataFrame) -> int | None:
    """The row meeting the SLOs with the most throughput (ties: lower TTFT p99, TPOT p99, then first); None if none."""
    ok = table[table["meets_slo"]]
    if ok.empty:
        return None
    order = ok.assign(_neg=-ok["output_tok_per_s"]).sort_values(["_neg", "ttft_ms_p99", "tpot_ms_p99"], kind="stable")
    return int(order.index[0])


def capacity_bracket(rates: Sequence[float], met: Sequence[bool]) -> tuple[float, float]:
    """(highest rate meeting the SLOs below the first failing one, the first failing rate) over probes sorted by
    rate; (NaN, lowest rate) when the lowest fails, (highest, inf) when none fails."""
    pairs = sorted(zip(rates, met, strict=True))
    last = float("nan")
    for rate, ok in pairs:
        if not ok:
            return last, float(rate)
        last = float(rate)
    return last, float("inf")


Runner = Callable[[list[SearchTask]], list[TaskResult]]


def search(workload: Workload, deployment: Deployment, space: SearchSpace, slo: SLO, *, rate: float | None = None,
           latency: str = "tpot_ms_p99", probes: int = 4, engine: str = "local", jobs: int = 1,
           address: str | None = None, on_result: Callable[[TaskResult], None] | None = None) -> SearchResult:
    """Search ``space`` on ``workload`` (see the module doc).

    rate: the workload's arrival rate in requests/s (None: measured from its arrivals). latency: the p99 of the
    Pareto front (one of ``LATENCIES``). probes: rates per capacity round (0: no capacity search).
    """
    if latency not in LATENCIES:
        raise ValueError(f"latency must be one of {LATENCIES}, got {latency!r}")
    if isinstance(probes, bool) or not isinstance(probes, int) or not 0 <= probes <= 32:
        raise ValueError(f"probes must be an integer in 0..32, got {probes!r}")
    configs = space.configs()
    if not configs:
        raise ValueError("the search space has no valid configuration (max_num_batched_tokens < max_num_seqs in all)")
    started = time.perf_counter()

    def run(tasks: list[SearchTask]) -> list[dict[str, object]]:
        done = run_tasks(simulate_task, tasks, engine=engine, jobs=jobs, address=address, on_result=on_result)
        return [r.value if r.error is None else tasks[i].config.record() | {"error": r.error}
                for i, r in enumerate(done)]

    table = pd.DataFrame(run([SearchTask(deployment, c, workload) for c in configs]))
    table = table.reindex(columns=[*CONFIG_COLUMNS, *METRICS, "error"])
    table["meets_slo"] = [slo.met(a, b) if e is None or pd.isna(e) else False
                          for a, b, e in zip(table["ttft_ms_p99"], table["tpot_ms_p99"], table["error"], strict=True)]
    table["pareto"] = pareto_front(table["output_tok_per_s"], table[latency])
    best = best_index(table)
    table["best"] = [i == best for i in range(len(table))]
    base_rate = offered_rate(workload) if rate is None else float(rate)
    probed = best if best is not None else closest_index(table, slo)
    result = SearchResult(table, pd.DataFrame(), None if best is None else table.iloc[best].to_dict(), base_rate,
                          slo, latency, simulations=len(configs))
    if probed is not None and probes and math.isfinite(base_rate):
        result.probed = table.iloc[probed].to_dict()
        _capacity(result, configs[probed], deployment, workload, probes, run)
    result.seconds = time.perf_counter() - started
    result.lines = summary_lines(result)
    return result


def closest_index(table: pd.DataFrame, slo: SLO) -> int | None:
    """The configuration nearest to meeting the SLOs (smallest worst ratio of p99 to target); None if none ran."""
    ratio = np.maximum(table["ttft_ms_p99"] / slo.ttft_p99_ms, table["tpot_ms_p99"] / slo.tpot_p99_ms)
    ratio = ratio.where(table["error"].isna() & np.isfinite(ratio))
    return None if ratio.isna().all() else int(ratio.idxmin())


def _capacity(result: SearchResult, config: ServingConfig, deployment: Deployment, workload: Workload, probes: int,
              run: Callable[[list[SearchTask]], list[dict[str, object]]]) -> None:
    """Probe a configuration at other rates: doubling up from the workload's (halving down when it misses the SLOs
    there), then evenly inside the bracket found."""
    rows = [dict(result.probed or {}) | {"rate_scale": 1.0, "round": 0}]
    step = 2.0 if _met(result.slo, rows[0]) else 0.5
    scales = [step ** k for k in range(1, probes + 1)]
    for number in (1, 2):
        found = run([SearchTask(deployment, config, workload, s) for s in scales])
        rows += [r | {"rate_scale": s, "round": number} for r, s in zip(found, scales, strict=True)]
        result.simulations += len(scales)
        low, high = capacity_bracket([r["rate_scale"] for r in rows], [_met(result.slo, r) for r in rows])
        if not (math.isfinite(low) and math.isfinite(high)):
            break
        scales = [low + (high - low) * k / (probes + 1) for k in range(1, probes + 1)]
    table = pd.DataFrame(rows)
    table["rate_rps"] = table["rate_scale"] * result.rate
    table["meets_slo"] = [_met(result.slo, r) for r in rows]
    table = table.sort_values("rate_scale", kind="stable").reset_index(drop=True)
    result.capacity = table[["rate_rps", "rate_scale", "round", *METRICS, "meets_slo", "error"]]
    low, high = capacity_bracket(table["rate_scale"], table["meets_slo"])
    result.capacity_rps, result.failing_rps = low * result.rate, high * result.rate


def _met(slo: SLO, row: dict[str, object]) -> bool:
    error = row.get("error")
    return (error is None or (isinstance(error, float) and math.isnan(error))) and \
        slo.met(float(row["ttft_ms_p99"]), float(row["tpot_ms_p99"]))


def describe_config(row: dict[str, object]) -> str:
    """``"chunked prefill, max_num_seqs=128, max_num_batched_tokens=2048, block 16, prefix caching off"``."""
    name = "chunked prefill" if row["scheduler"] == "chunked" else "continuous batching"
    return (f"{name}, max_num_seqs={row['max_num_seqs']}, max_num_batched_tokens={row['max_num_batched_tokens']}, "
            f"block {row['block_size']}, prefix caching {'on' if row['prefix_caching'] else 'off'}")


def binding_slo(table: pd.DataFrame, slo: SLO) -> str:
    """Why no configuration of ``table`` (the search's configs) meets ``slo``, in one sentence: the SLO that none of
    the configurations that ran meets ("binds"), with the lowest p99 reached against its target; both when neither
    is met; or that each is met, but never both by one configuration."""
    ran = table[table["error"].isna()]
    if ran.empty:
        return "No configuration could serve the workload (each row's error says why)."
    ttft_ok = int((ran["ttft_ms_p99"] <= slo.ttft_p99_ms).sum())
    tpot_ok = int((ran["tpot_ms_p99"] <= slo.tpot_p99_ms).sum())
    ttft = f"the lowest TTFT p99 is {ran['ttft_ms_p99'].min():,.0f} ms against {slo.ttft_p99_ms:,g} ms"
    tpot = f"the lowest TPOT p99 is {ran['tpot_ms_p99'].min():,.1f} ms against {slo.tpot_p99_ms:,g} ms"
    if not ttft_ok and not tpot_ok:
        return f"Both SLOs bind: {ttft}, and {tpot}."
    if not ttft_ok:
        return f"The TTFT SLO binds: {ttft} ({tpot_ok} of {len(ran)} configurations meet the TPOT SLO)."
    if not tpot_ok:
        return f"The TPOT SLO binds: {tpot} ({ttft_ok} of {len(ran)} configurations meet the TTFT SLO)."
    meet = f"configuration{'s meet' if ttft_ok != 1 else ' meets'}"
    return (f"Each SLO is met on its own ({ttft_ok} {meet} the TTFT SLO, {tpot_ok} the TPOT SLO), but never both by "
            "one configuration.")


def summary_lines(result: SearchResult) -> list[str]:
    """What the search found, in sentences computed from its tables."""
    slo = f"TTFT p99 <= {result.slo.ttft_p99_ms:g} ms and TPOT p99 <= {result.slo.tpot_p99_ms:g} ms"
    meeting = int(result.configs["meets_slo"].sum())
    lines = [f"{meeting} of {len(result.configs)} configurations meet {slo} at {result.rate:.3g} requests/s "
             f"({result.simulations} simulations, {result.seconds:.1f} s)."]
    if result.best is None:
        lines.append(f"No configuration meets the SLOs at this rate. {binding_slo(result.configs, result.slo)}")
    else:
        b = result.best
        lines.append(f"Best: {describe_config(b)}: {float(b['output_tok_per_s']):,.0f} output tokens/s, TTFT p99 "
                     f"{float(b['ttft_ms_p99']):,.0f} ms, TPOT p99 {float(b['tpot_ms_p99']):.1f} ms.")
    if result.probed is not None:
        who = "the best configuration" if result.best is not None else \
            f"the configuration closest to the SLOs ({describe_config(result.probed)})"
        if math.isinf(result.failing_rps):
            lines.append(f"{who[0].upper()}{who[1:]} still meets the SLOs at {result.capacity_rps:.3g} requests/s, "
                         "the highest rate probed.")
        elif math.isfinite(result.capacity_rps):
            lines.append(f"Capacity of {who}: {result.capacity_rps:.3g} requests/s; at {result.failing_rps:.3g} "
                         "requests/s it misses the SLOs.")
        else:
            lines.append(f"{who[0].upper()}{who[1:]} misses the SLOs even at {result.failing_rps:.3g} requests/s, "
                         "the lowest rate probed.")
    front = int(result.configs["pareto"].sum())
    lines.append(f"Pareto front of throughput vs {result.latency}: {front} configuration{'s' if front != 1 else ''}.")
    return lines
