"""Serving schedulers (static, continuous, chunked prefill) simulated on the real block manager."""

from kvcore.sched.compare import DEFAULT_BUDGETS, Comparison, ServingSetup, compare, engine_configs, takeaways
from kvcore.sched.config import POLICIES, POLICY_LABELS, PREEMPTION, SimConfig
from kvcore.sched.cost import CostModel, FittedCost, prefill_pairs
from kvcore.sched.metrics import PHASES, SimResult
from kvcore.sched.request import Request
from kvcore.sched.simulate import simulate
from kvcore.sched.trace import parse_trace, read_trace
from kvcore.sched.workload import ARRIVALS, LENGTHS, Workload, WorkloadConfig, make_workload

__all__ = [
    "ARRIVALS",
    "DEFAULT_BUDGETS",
    "LENGTHS",
    "PHASES",
    "POLICIES",
    "POLICY_LABELS",
    "PREEMPTION",
    "Comparison",
    "CostModel",
    "FittedCost",
    "Request",
    "ServingSetup",
    "SimConfig",
    "SimResult",
    "Workload",
    "WorkloadConfig",
    "compare",
    "engine_configs",
    "make_workload",
    "parse_trace",
    "prefill_pairs",
    "read_trace",
    "simulate",
    "takeaways",
]
