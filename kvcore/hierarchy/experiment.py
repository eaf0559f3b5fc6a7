"""The memory-hierarchy experiments by preset names: what the page and ``python -m kvcore hierarchy`` run.

Each function takes plain values (model and GPU preset names, sizes in GB, rates), builds the
dataclasses of :mod:`kvcore.hierarchy` and returns their result, so the page and the CLI agree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pandas as pd

from kvcore.hierarchy.disagg import PDConfig, ServingWorkload, compare_pd, pd_summary
from kvcore.hierarchy.offload import OffloadConfig, OffloadResult, simulate_offload
from kvcore.hierarchy.roofline import attention_io, decode_bytes, prefill_with_scores, roof, roofline_points
from kvcore.hierarchy.tiers import Tier, default_tiers
from kvcore.hierarchy.workload import ChatWorkload, RagWorkload
from kvcore.sched.cost import CostModel
from kvcore.shapes import GPU_PRESETS, PRESETS

WORKLOADS = ("chat", "rag")


def cost_model(model: str, gpu: str) -> CostModel:
    """The cost model of a model preset on a GPU preset (KeyError names the valid presets)."""
    if model not in PRESETS:
        raise KeyError(f"unknown model {model!r}; presets: {', '.join(PRESETS)}")
    if gpu not in GPU_PRESETS:
        raise KeyError(f"unknown GPU {gpu!r}; presets: {', '.join(GPU_PRESETS)}")
    return CostModel(PRESETS[model], GPU_PRESETS[gpu])


def tiers_for(gpu: str, host_link: str = "pcie", gpu_gb: float = 4.0, cpu_gb: float = 16.0, disk_gb: float = 64.0,
              remote_gb: float = 1000.0, remote_gbps: float = 12.5) -> list[Tier]:
    """:func:`~kvcore.hierarchy.tiers.default_tiers` of a GPU preset with capacities (GB) and the remote
    store's bandwidth (GB/s)."""
    if gpu not in GPU_PRESETS:
        raise KeyError(f"unknown GPU {gpu!r}; presets: {', '.join(GPU_PRESETS)}")
    return default_tiers(GPU_PRESETS[gpu], host_link, gpu_gb, cpu_gb, disk_gb, remote_gb, remote_gbps * 1e9)


def make_workload(kind: str, num_requests: int, seed: int) -> ChatWorkload | RagWorkload:
    """The default chat or RAG workload with ``num_requests`` requests."""
    if kind not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {kind!r}")
    cls = ChatWorkload if kind == "chat" else RagWorkload
    return cls(num_requests=num_requests, seed=seed)


@dataclass(slots=True)
class OffloadRuns:
    """The full hierarchy, and the same workload with only the GPU tier (vLLM's prefix cache alone)."""

    full: OffloadResult
    gpu_only: OffloadResult

    def ttft(self) -> pd.DataFrame:
        """Long table (setup, request, ttft_ms) for the three setups: recompute, GPU only, hierarchy."""
        parts = [("recompute whole prompt", self.full.requests["ttft_recompute_s"]),
                 ("GPU prefix cache only", self.gpu_only.requests["ttft_s"]),
                 ("GPU + CPU + disk + remote", self.full.requests["ttft_s"])]
        return pd.concat([pd.DataFrame({"setup": name, "request": self.full.requests["request"], "ttft_ms": s * 1e3})
                          for name, s in parts], ignore_index=True)

    def ttft_summary(self) -> pd.DataFrame:
        """p50/p90/p99/mean TTFT (ms) per setup."""
        g = self.ttft().groupby("setup", sort=False)["ttft_ms"]
        return pd.DataFrame({"p50_ms": g.quantile(0.5), "p90_ms": g.quantile(0.9), "p99_ms": g.quantile(0.99),
                             "mean_ms": g.mean()}).reset_index()


def run_offload(model: str, gpu: str, tiers: list[Tier], workload: ChatWorkload | RagWorkload,
                config: OffloadConfig) -> OffloadRuns:
    """Simulate the workload over ``tiers`` and over the GPU tier alone."""
    cost = cost_model(model, gpu)
    reqs = workload.generate()
    full = simulate_offload(reqs, tiers, cost, config)
    only = [tiers[0], *(replace(t, capacity_bytes=0.0) for t in tiers[1:])]
    return OffloadRuns(full, simulate_offload(reqs, only, cost, replace(config, snapshots=1)))


def run_pd(model: str, gpu: str, workload: ServingWorkload, config: PDConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-request rows and the summary of colocated vs disaggregated serving."""
    per_request = compare_pd(workload.generate(), cost_model(model, gpu), config)
    return per_request, pd_summary(per_request, config)


@dataclass(slots=True)
class RooflineTables:
    """Everything the roofline tab draws."""

    points: pd.DataFrame
    roof: pd.DataFrame
    decode_bytes: pd.DataFrame
    attention: pd.DataFrame
    prefill_scores: pd.DataFrame


def run_roofline(model: str, gpu: str, context: int, batch: int) -> RooflineTables:
    """Roofline points, the roof, decode bytes at ``batch`` and attention I/O at ``context`` tokens."""
    cost = cost_model(model, gpu)
    contexts = sorted({1024, 8192, 32768, context})
    return RooflineTables(roofline_points(cost, contexts=contexts), roof(cost),
                          decode_bytes(cost, batch, sorted({256, 1024, 4096, 16384, 65536, context})),
                          attention_io(cost, context), prefill_with_scores(cost, context))
