"""Settings of one simulated serving engine: the scheduler policy, its limits, the KV pool and the cost model."""

from __future__ import annotations

from dataclasses import dataclass

from kvcore.sched.cost import CostModel, FittedCost

POLICIES = ("static", "continuous", "chunked")
PREEMPTION = ("recompute", "swap")
POLICY_LABELS = {
    "static": "static batching",
    "continuous": "continuous batching",
    "chunked": "chunked prefill",
}


@dataclass(slots=True)
class SimConfig:
    """One engine configuration (vLLM names where vLLM has the knob).

    policy: 'static' (request-level batches, FasterTransformer-style), 'continuous' (iteration-level,
    Orca / vLLM, whole prompts) or 'chunked' (Sarathi-Serve chunked prefill, decodes first).
    max_num_seqs: most requests running at once (static: the batch size).
    max_num_batched_tokens: token budget of one step (chunked: the chunk budget; static: unused, a batch is
    prefilled in one pass).
    preemption: 'recompute' (vLLM v1 default: free the blocks, recompute later) or 'swap' (copy the KV to
    host memory over the host link and back). host_kv_blocks: size of the host swap pool in blocks; None =
    unbounded. When a sized pool is full, the victim is recomputed instead.
    cost: the step time of a simulation; None for a config that only schedules (a real engine measures its
    own steps), which :func:`kvcore.sched.simulate` refuses.
    enable_prefix_caching: vLLM automatic prefix caching in the block manager.
    block_size: tokens per KV block. num_blocks: KV pool size in blocks; None = what fits on the GPU after
    weights and a ``reserve_fraction`` of HBM (``CostModel.kv_capacity_blocks``).

    vLLM 0.33's own rules, each off by default (the textbook rules of vLLM's design documents), all on in
    :meth:`vllm`: null_block (block 0 is reserved, so ``num_blocks`` counts one unusable block);
    scheduler_reserve_full_isl (a waiting request is admitted only if its whole sequence fits, though only
    its first chunk is allocated); prepend_unhashed_free_blocks (freed blocks without a hash go to the head
    of the free queue); async_scheduling (the next step is scheduled before the last one's samples are
    known: one step of lag, a finished request's seat and blocks come back a step later); max_model_len
    (a request never computes its last position's token past it; None = no limit).
    """

    cost: CostModel | FittedCost | None
    policy: str = "continuous"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    preemption: str = "recompute"
    host_kv_blocks: int | None = None
    enable_prefix_caching: bool = False
    block_size: int = 16
    num_blocks: int | None = None
    reserve_fraction: float = 0.1
    null_block: bool = False
    scheduler_reserve_full_isl: bool = False
    prepend_unhashed_free_blocks: bool = False
    async_scheduling: bool = False
    max_model_len: int | None = None

    @classmethod
    def vllm(cls, cost: CostModel | FittedCost | None, *, max_num_seqs: int, max_num_batched_tokens: int,
             enable_chunked_prefill: bool, enable_prefix_caching: bool, block_size: int, num_blocks: int,
             async_scheduling: bool = False, max_model_len: int | None = None) -> SimConfig:
        """An engine whose every rule is vLLM 0.33's v1 scheduler's (checked step for step against recordings
        of the real scheduler in tests/fixtures/vllm). num_blocks counts as ``KVCacheConfig.num_blocks``
        does: the null block is one of them."""
        return cls(cost, policy="chunked" if enable_chunked_prefill else "continuous", max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
                   block_size=block_size, num_blocks=num_blocks, null_block=True, scheduler_reserve_full_isl=True,
                   prepend_unhashed_free_blocks=True, async_scheduling=async_scheduling, max_model_len=max_model_len)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.preemption not in PREEMPTION:
            raise ValueError(f"preemption must be one of {PREEMPTION}, got {self.preemption!r}")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        if not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens must be an integer >= max_num_seqs ({self.max_num_seqs}), "
                             f"got {self.max_num_batched_tokens!r}: every running request needs a token per step")
        if self.host_kv_blocks is not None and self.host_kv_blocks < 0:
            raise ValueError(f"host_kv_blocks must be None (unbounded) or >= 0, got {self.host_kv_blocks}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"num_blocks must be None (fit the GPU) or an integer >= 1, got {self.num_blocks!r}")
        if not 0 <= self.reserve_fraction < 1:
            raise ValueError(f"reserve_fraction must be in [0, 1), got {self.reserve_fraction}")
        if self.null_block and self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"with the null block the pool needs num_blocks >= 2, got {self.num_blocks}")
        if self.async_scheduling and (self.policy == "static" or self.preemption != "recompute"):
            raise ValueError("async_scheduling follows vLLM's scheduler: continuous or chunked policy with "
                             "recompute preemption")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be None or an integer >= 2, got {self.max_model_len!r}")

    @property
    def label(self) -> str:
        """Human name of the policy."""
        return POLICY_LABELS[self.policy]

    @property
    def chunked(self) -> bool:
        return self.policy == "chunked"

    @property
    def rules(self) -> str:
        """"vLLM 0.33" when every vLLM rule is on, "textbook" when none is, "mixed" otherwise."""
        flags = (self.null_block, self.scheduler_reserve_full_isl, self.prepend_unhashed_free_blocks)
        return "vLLM 0.33" if all(flags) else "textbook" if not any(flags) else "mixed"

    def pool_blocks(self) -> int:
        """KV blocks of the pool: the override, else what fits on the GPU."""
        if self.num_blocks is not None:
            return self.num_blocks
        if not isinstance(self.cost, CostModel):
            raise ValueError("only a GPU cost model knows the GPU's capacity: give num_blocks")
        return self.cost.kv_capacity_blocks(self.block_size, self.reserve_fraction)
