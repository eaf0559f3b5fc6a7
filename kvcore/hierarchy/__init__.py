"""The memory hierarchy of the KV cache: tiers, offload and prefetch, measured transfer, PD, roofline.

- :mod:`~kvcore.hierarchy.tiers`: GPU HBM / CPU DRAM / NVMe / remote tiers and their presets.
- :mod:`~kvcore.hierarchy.policies`, :mod:`~kvcore.hierarchy.store`: per-tier LRU/LFU/FIFO, demotion.
- :mod:`~kvcore.hierarchy.workload`, :mod:`~kvcore.hierarchy.offload`: LMCache-style chunk reuse.
- :mod:`~kvcore.hierarchy.bandwidth`: real copies of KV-shaped tensors (torch).
- :mod:`~kvcore.hierarchy.disagg`: prefill/decode disaggregation vs colocated serving.
- :mod:`~kvcore.hierarchy.roofline`: prefill vs decode intensity, decode bytes, FlashAttention I/O.
"""

from __future__ import annotations

from kvcore.hierarchy.bandwidth import kv_tensor, measure_bandwidth
from kvcore.hierarchy.disagg import PDConfig, ServeRequest, ServingWorkload, compare_pd, pd_summary
from kvcore.hierarchy.offload import (
    OffloadConfig,
    OffloadResult,
    offload_summary,
    recompute_time,
    should_load,
    simulate_offload,
)
from kvcore.hierarchy.policies import POLICIES, make_policy
from kvcore.hierarchy.roofline import (
    attention_io,
    decode_bytes,
    decode_point,
    kv_crossover_context,
    prefill_point,
    prefill_with_scores,
    roof,
    roofline_points,
)
from kvcore.hierarchy.store import WRITE_MODES, TieredStore
from kvcore.hierarchy.tiers import Tier, default_tiers
from kvcore.hierarchy.workload import ChatWorkload, RagWorkload, Request, chunk_keys

__all__ = [
    "POLICIES", "WRITE_MODES", "ChatWorkload", "OffloadConfig", "OffloadResult", "PDConfig", "RagWorkload",
    "Request", "ServeRequest", "ServingWorkload", "Tier", "TieredStore", "attention_io", "chunk_keys",
    "compare_pd", "decode_bytes", "decode_point", "default_tiers", "kv_crossover_context", "kv_tensor",
    "make_policy", "measure_bandwidth", "offload_summary", "pd_summary", "prefill_point", "prefill_with_scores",
    "recompute_time", "roof", "roofline_points", "should_load", "simulate_offload",
]
