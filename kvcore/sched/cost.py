"""Step-time cost model of one forward pass of a batch: a roofline over weights and KV traffic.

A step that computes ``new_tokens`` tokens (prefill chunks and decodes together) costs

    time = max(FLOPs / (peak_flops * flops_efficiency), bytes / (hbm_bandwidth * bandwidth_efficiency))
           + step_overhead_s

    FLOPs = 2 * params * new_tokens                       (every linear layer, once per new token)
          + 4 * layers * q_heads * head_dim * attn_pairs  (QK^T and PV, 2 FLOPs per multiply-add)
    bytes = weight_bytes                                  (all weights read once per step)
          + kv_bytes(kv_tokens_read) + kv_bytes(new_tokens)  (attention reads the cache, writes new KV)

``attn_pairs`` counts (query, key) pairs: a decode at context c adds c; a prefill chunk of q tokens
after p cached tokens adds q * p + q * (q + 1) / 2 (causal). This is the model LLM-Viewer and
vLLM/Sarathi papers reason with (Yuan et al. 2024; Agrawal et al. 2024): decode is memory-bound
(weights and KV read for few tokens), prefill compute-bound. Activations and communication are
left out; the efficiency factors say how far below datasheet peak a real engine runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvcore.shapes import GpuSpec, ModelShape, kv_bytes, weight_bytes


@dataclass(slots=True, frozen=True)
class CostModel:
    """Roofline step time for ``shape`` on ``gpu``.

    kv_bits / weight_bits: storage precision. flops_efficiency, bandwidth_efficiency: fraction of
    peak reached (0-1]. step_overhead_s: fixed per-step cost (scheduling, kernel launches), seconds.
    """

    shape: ModelShape
    gpu: GpuSpec
    kv_bits: int = 16
    weight_bits: int = 16
    flops_efficiency: float = 0.5
    bandwidth_efficiency: float = 0.8
    step_overhead_s: float = 0.002

    def __post_init__(self) -> None:
        for name in ("flops_efficiency", "bandwidth_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.step_overhead_s < 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {self.step_overhead_s}")
        if self.kv_bits < 1 or self.weight_bits < 1:
            raise ValueError("kv_bits and weight_bits must be >= 1")

    @property
    def kv_bytes_per_token(self) -> float:
        """KV bytes one token adds across all layers."""
        return kv_bytes(self.shape, 1, bits=self.kv_bits)

    @property
    def host_link_bandwidth(self) -> float:
        """Bytes/s of the GPU's host link (swapped KV goes over it)."""
        return self.gpu.host_link_bandwidth

    @property
    def label(self) -> str:
        """What is timed: ``model on GPU``."""
        return f"{self.shape.name} on {self.gpu.name}"

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights at ``weight_bits``."""
        return weight_bytes(self.shape, self.weight_bits)

    def flops(self, new_tokens: float, attn_pairs: float) -> float:
        """FLOPs of a step (linear layers + attention)."""
        s = self.shape
        return 2.0 * s.num_params * new_tokens + 4.0 * s.num_layers * s.num_q_heads * s.head_dim * attn_pairs

    def bytes_moved(self, new_tokens: float, kv_tokens_read: float) -> float:
        """HBM bytes of a step: weights + KV read + KV written."""
        return self.weight_bytes + self.kv_bytes_per_token * (kv_tokens_read + new_tokens)

    def step_time(self, new_tokens: float, attn_pairs: float, kv_tokens_read: float, num_seqs: int = 0,
                  prefill_seqs: int = 0) -> float:
        """Seconds for one forward pass; 0 when there is nothing to compute (a roofline knows no per-sequence
        cost: ``num_seqs`` and ``prefill_seqs`` are taken for the fitted model's sake)."""
        if new_tokens <= 0:
            return 0.0
        compute = self.flops(new_tokens, attn_pairs) / (self.gpu.bf16_flops * self.flops_efficiency)
        memory = self.bytes_moved(new_tokens, kv_tokens_read) / (self.gpu.hbm_bandwidth * self.bandwidth_efficiency)
        return max(compute, memory) + self.step_overhead_s

    def bound(self, new_tokens: float, attn_pairs: float, kv_tokens_read: float) -> str:
        """'compute' or 'memory': which roofline term sets the step time."""
        compute = self.flops(new_tokens, attn_pairs) / (self.gpu.bf16_flops * self.flops_efficiency)
        memory = self.bytes_moved(new_tokens, kv_tokens_read) / (self.gpu.hbm_bandwidth * self.bandwidth_efficiency)
        return "compute" if compute >= memory else "memory"

    def kv_capacity_tokens(self, reserve_fraction: float = 0.1) -> int:
        """KV tokens that fit: (HBM - weights - activation reserve) / KV bytes per token.

        reserve_fraction: share of HBM kept for activations and workspace (vLLM's
        gpu_memory_utilization = 0.9 leaves 0.1).
        """
        if not 0 <= reserve_fraction < 1:
            raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
        free = self.gpu.hbm_bytes * (1 - reserve_fraction) - self.weight_bytes
        if free <= 0:
            raise ValueError(
                f"{self.shape.name} weights ({self.weight_bytes / 1e9:.1f} GB) do not fit in "
                f"{self.gpu.name} with a {reserve_fraction:.0%} reserve; pick a larger GPU or fewer weight bits"
            )
        return int(free // self.kv_bytes_per_token)

    def kv_capacity_blocks(self, block_size: int, reserve_fraction: float = 0.1) -> int:
        """Whole KV blocks of ``block_size`` tokens that fit (vLLM sizes its block pool this way)."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        return self.kv_capacity_tokens(reserve_fraction) // block_size


def prefill_pairs(num_new: int, num_cached: int) -> int:
    """(query, key) pairs of a causal prefill chunk of ``num_new`` tokens after ``num_cached``."""
    return num_new * num_cached + num_new * (num_new + 1) // 2


@dataclass(slots=True, frozen=True)
class FittedCost:
    """Step time as a linear function of a step's work, fitted to an engine's measured steps (as Vidur profiles
    operators and fits their run time; Agrawal et al. 2024).

    time = intercept_s + per_token_s * new_tokens + per_pair_s * attn_pairs + per_kv_token_s * kv_tokens_read
           + per_seq_s * sequences + per_prefill_s * prefill chunks + per_small_token_s * min(new_tokens, small_rows)
           + per_eager_step_s * (1 if any prefill chunk else 0)
    for a step with work, 0 for an empty one. name: where the fit comes from (shown in tables). r2: the fit's
    coefficient of determination on its own steps (NaN when not fitted). kv_bytes_per_token,
    host_link_bandwidth: what a swap moves and how fast (swap preemption only). held_out_error: median
    absolute error (fraction) on measured steps the fit did not see; grid_steps: steps it was fitted on
    (both from :func:`kvcore.engine.calibrate_engine`). per_small_token_s: what each of the first
    ``small_rows`` tokens adds on top (an engine whose small steps run another, costlier-per-row GEMM).
    per_eager_step_s: what a step with any prefill chunk adds once (an engine that replays pure decode steps as a
    captured graph, as vLLM does with CUDA graphs, runs the others eagerly).
    """

    name: str
    intercept_s: float
    per_token_s: float = 0.0
    per_pair_s: float = 0.0
    per_kv_token_s: float = 0.0
    r2: float = float("nan")
    kv_bytes_per_token: float = 0.0
    host_link_bandwidth: float = float("inf")
    per_seq_s: float = 0.0
    per_prefill_s: float = 0.0
    held_out_error: float = float("nan")
    grid_steps: int = 0
    per_small_token_s: float = 0.0
    small_rows: int = 0
    per_eager_step_s: float = 0.0

    def __post_init__(self) -> None:
        values = (self.intercept_s, self.per_token_s, self.per_pair_s, self.per_kv_token_s, self.per_seq_s,
                  self.per_prefill_s, self.per_small_token_s, self.per_eager_step_s)
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"a fitted step time needs finite coefficients >= 0, got {values}")

    @property
    def label(self) -> str:
        """What is timed: where the fit comes from."""
        return self.name

    def step_time(self, new_tokens: float, attn_pairs: float, kv_tokens_read: float, num_seqs: int = 0,
                  prefill_seqs: int = 0) -> float:
        """Seconds for one step; 0 when there is nothing to compute."""
        if new_tokens <= 0:
            return 0.0
        return (self.intercept_s + self.per_token_s * new_tokens + self.per_pair_s * attn_pairs
                + self.per_kv_token_s * kv_tokens_read + self.per_seq_s * num_seqs + self.per_prefill_s * prefill_seqs
                + self.per_small_token_s * min(new_tokens, self.small_rows)
                + self.per_eager_step_s * (prefill_seqs > 0))
