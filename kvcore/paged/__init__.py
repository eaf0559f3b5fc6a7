"""Paged KV cache: block manager with prefix caching, fork and copy-on-write, a paged KV store, and the
fragmentation and parallel-sampling experiments (vLLM, Kwon et al. 2023; vLLM v1 prefix caching).

The torch-backed names (PagedKVStore, PagedKVCache, synthetic_kv) load on first use, so the block
manager and the CLI start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvcore.paged.block import FreeKVCacheBlockQueue, KVCacheBlock
from kvcore.paged.events import EVENT_KINDS, KVEvent, events_frame
from kvcore.paged.fragmentation import ALLOCATORS, FragmentationConfig, fragmentation_experiment, waste_breakdown
from kvcore.paged.hashing import hash_block_tokens, hash_full_blocks
from kvcore.paged.manager import KVCacheManager
from kvcore.paged.sampling import parallel_sampling_memory
from kvcore.paged.workload import LENGTH_KINDS, LengthDistribution, generate_workload

_LAZY = {"PagedKVStore": "kvcore.paged.store", "slot_mapping": "kvcore.paged.store",
         "PagedKVCache": "kvcore.paged.cache", "synthetic_kv": "kvcore.paged.synthetic"}

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvcore.paged' has no attribute {name!r}")
