"""Serving schedulers (static, continuous, chunked prefill) simulated on the real block manager."""

from kvcore.sched.cost import CostModel, prefill_pairs

__all__ = ["CostModel", "prefill_pairs"]
