"""Several schedulers on the same workload, side by side: the experiment behind the page and the CLI."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pandas as pd

from kvcore.sched.config import POLICIES, POLICY_LABELS, SimConfig
from kvcore.sched.cost import CostModel, FittedCost
from kvcore.sched.metrics import SimResult
from kvcore.sched.simulate import simulate
from kvcore.sched.workload import Workload
from kvcore.shapes import GPU_PRESETS, PRESETS

# Budgets in tokens per step: vLLM's max_num_batched_tokens when prompts go whole, Sarathi-Serve's
# token budget for chunked prefill (it uses 512 and 2048 in its evaluation).
DEFAULT_BUDGETS = {"static": 8192, "continuous": 8192, "chunked": 512}
# Which rules the iteration-level schedulers follow: vLLM's design documents, or vLLM 0.33's own code
# (SimConfig.vllm: null block, whole-sequence admission, unhashed blocks freed first; optionally async).
RULES = ("textbook", "vLLM 0.33", "vLLM 0.33 async")


@dataclass(slots=True)
class Comparison:
    """The results of each scheduler and their tables stacked with a ``scheduler`` column.

    summary: one row per scheduler. timeline / requests / phases: every run's table, concatenated.
    """

    results: tuple[SimResult, ...]
    summary: pd.DataFrame
    timeline: pd.DataFrame
    requests: pd.DataFrame
    phases: pd.DataFrame


def engine_configs(base: SimConfig, policies: Sequence[str] = POLICIES, *, budget: int | None = None,
                   chunk_budget: int | None = None) -> list[SimConfig]:
    """One config per policy, alike except for the policy and its token budget.

    budget: max_num_batched_tokens of static / continuous; chunk_budget: that of chunked prefill
    (defaults: ``DEFAULT_BUDGETS``).
    """
    if not policies:
        raise ValueError(f"pick at least one scheduler from {POLICIES}")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown scheduler(s) {unknown}; allowed: {POLICIES}")
    budgets = {"static": budget, "continuous": budget, "chunked": chunk_budget}
    return [replace(base, policy=p, max_num_batched_tokens=budgets[p] or DEFAULT_BUDGETS[p])
            for p in dict.fromkeys(policies)]


@dataclass(slots=True, frozen=True)
class ServingSetup:
    """What the engines of one comparison share (a hashable key): the model and GPU presets, which schedulers,
    their token budgets, and the :class:`SimConfig` fields besides the cost model and the policy."""

    model: str = "llama-3-8b"
    gpu: str = "H100 80GB"
    policies: tuple[str, ...] = POLICIES
    budget: int = DEFAULT_BUDGETS["continuous"]
    chunk_budget: int = DEFAULT_BUDGETS["chunked"]
    max_num_seqs: int = 256
    preemption: str = "recompute"
    host_kv_blocks: int | None = None
    enable_prefix_caching: bool = False
    block_size: int = 16
    num_blocks: int | None = None
    rules: str = "textbook"
    cost: FittedCost | None = None

    def configs(self) -> list[SimConfig]:
        """One :class:`SimConfig` per scheduler (:func:`engine_configs`); unknown presets raise ValueError.

        With vLLM rules the continuous and chunked schedulers take vLLM 0.33's (static batching, which vLLM does
        not have, keeps the textbook ones). cost: a step time fitted to a real engine instead of the model on the
        GPU preset (then ``num_blocks`` sizes the pool).
        """
        if self.cost is None and (self.model not in PRESETS or self.gpu not in GPU_PRESETS):
            raise ValueError(f"unknown model or GPU preset {self.model!r} / {self.gpu!r}")
        if self.rules not in RULES:
            raise ValueError(f"rules must be one of {RULES}, got {self.rules!r}")
        if self.cost is not None and self.num_blocks is None:
            raise ValueError("a fitted engine cost knows no GPU memory: give the pool's blocks")
        cost = self.cost or CostModel(PRESETS[self.model], GPU_PRESETS[self.gpu])
        base = SimConfig(cost, max_num_seqs=self.max_num_seqs,
                         preemption=self.preemption, host_kv_blocks=self.host_kv_blocks,
                         enable_prefix_caching=self.enable_prefix_caching, block_size=self.block_size,
                         num_blocks=self.num_blocks)
        configs = engine_configs(base, self.policies, budget=self.budget, chunk_budget=self.chunk_budget)
        if self.rules == "textbook":
            return configs
        if self.preemption != "recompute":
            raise ValueError("vLLM 0.33 preempts by recompute only; pick recompute preemption for its rules")
        return [c if c.policy == "static" else replace(
            c, null_block=True, scheduler_reserve_full_isl=True, prepend_unhashed_free_blocks=True,
            async_scheduling=self.rules.endswith("async")) for c in configs]


def compare(workload: Workload, configs: Sequence[SimConfig],
            progress: Callable[[float], None] | None = None) -> Comparison:
    """``simulate`` each config on ``workload``; progress gets the overall fraction done."""
    results = []
    for i, config in enumerate(configs):
        def part(fraction: float, i: int = i) -> None:
            if progress is not None:
                progress((i + fraction) / len(configs))
        results.append(simulate(workload, config, part))

    def stacked(table: str) -> pd.DataFrame:
        frames = [getattr(r, table).assign(scheduler=r.label) for r in results]
        return pd.concat(frames, ignore_index=True)
    summary = pd.concat([r.summary for r in results], ignore_index=True)
    return Comparison(tuple(results), summary, stacked("timeline"), stacked("requests"), stacked("phases"))


def rules_difference(textbook: pd.DataFrame, vllm: pd.DataFrame) -> pd.DataFrame:
    """What vLLM's own rules change, per scheduler: each metric under both rules and the change in %.

    textbook / vllm: ``Comparison.summary`` tables of the same workload and settings.
    """
    metrics = ["output_tok_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p99", "preemptions", "peak_kv_usage",
               "steps"]
    a, b = textbook.set_index("scheduler")[metrics], vllm.set_index("scheduler")[metrics]
    rows = []
    for name in a.index.intersection(b.index):
        for metric in metrics:
            x, y = float(a.loc[name, metric]), float(b.loc[name, metric])
            rows.append({"scheduler": name, "metric": metric, "textbook": x, "vllm_0_33": y,
                         "change_pct": (y - x) / x * 100 if x else float("nan")})
    return pd.DataFrame(rows)


def takeaways(summary: pd.DataFrame) -> list[str]:
    """Sentences comparing the schedulers of a ``Comparison.summary``, computed from its numbers."""
    s = summary.set_index("scheduler")
    static, cont, chunk = (POLICY_LABELS[p] for p in POLICIES)
    lines = []
    if static in s.index and cont in s.index:
        ratio = s.loc[cont, "output_tok_per_s"] / s.loc[static, "output_tok_per_s"]
        lines.append(f"Continuous batching delivers {ratio:.2f}x the output tokens/s of static batching "
                     f"(TTFT p50 {s.loc[cont, 'ttft_ms_p50']:,.0f} ms vs {s.loc[static, 'ttft_ms_p50']:,.0f} ms).")
    if cont in s.index and chunk in s.index:
        c, k = s.loc[cont], s.loc[chunk]
        lines.append(f"Chunked prefill: TTFT p50 {k.ttft_ms_p50:,.1f} ms vs {c.ttft_ms_p50:,.1f} ms, TPOT p99 "
                     f"{k.tpot_ms_p99:.2f} ms vs {c.tpot_ms_p99:.2f} ms, ITL p99 {k.itl_ms_p99:.1f} ms vs "
                     f"{c.itl_ms_p99:.1f} ms (chunked vs continuous).")
    preempted = s[s["preemptions"] > 0]
    if len(preempted):
        lines.append("Preemptions: " + ", ".join(f"{name} {int(v)}" for name, v in preempted["preemptions"].items())
                     + " (the KV pool ran out of blocks).")
    return lines
