"""Paged KV cache: block manager with prefix caching, fork and copy-on-write, a paged KV store, and the
fragmentation and parallel-sampling experiments (vLLM, Kwon et al. 2023; vLLM v1 prefix caching).
"""

from kvcore.paged.block import FreeKVCacheBlockQueue, KVCacheBlock
from kvcore.paged.cache import PagedKVCache
from kvcore.paged.events import EVENT_KINDS, KVEvent, events_frame
from kvcore.paged.fragmentation import ALLOCATORS, FragmentationConfig, fragmentation_experiment, waste_breakdown
from kvcore.paged.hashing import hash_block_tokens, hash_full_blocks
from kvcore.paged.manager import KVCacheManager
from kvcore.paged.sampling import parallel_sampling_memory
from kvcore.paged.store import PagedKVStore, slot_mapping
from kvcore.paged.synthetic import synthetic_kv
from kvcore.paged.workload import LENGTH_KINDS, LengthDistribution, generate_workload

__all__ = [
    "ALLOCATORS",
    "EVENT_KINDS",
    "LENGTH_KINDS",
    "FragmentationConfig",
    "FreeKVCacheBlockQueue",
    "KVCacheBlock",
    "KVCacheManager",
    "KVEvent",
    "LengthDistribution",
    "PagedKVCache",
    "PagedKVStore",
    "events_frame",
    "fragmentation_experiment",
    "generate_workload",
    "hash_block_tokens",
    "hash_full_blocks",
    "parallel_sampling_memory",
    "slot_mapping",
    "synthetic_kv",
    "waste_breakdown",
]

