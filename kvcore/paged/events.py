"""The block manager's event log: what happened to which block, step by step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from kvcore.paged.hashing import short_hash

# allocate: a block popped from the free queue for a request; hit: a cached block reused (touched);
# evict: a cached block popped for reuse, its hash dropped; cache: a block became full, hash recorded;
# copy_on_write: a shared partial block copied before a write; fork: a block shared with a child;
# free: a request dropped its reference (detail says whether the block went back to the queue).
EVENT_KINDS = ("allocate", "hit", "evict", "cache", "copy_on_write", "fork", "free")


@dataclass(slots=True, frozen=True)
class KVEvent:
    """One thing that happened to one block.

    step: the manager's step counter (one per successful allocate/append/fork/free call).
    block_hash: the block's hash when relevant (hit, evict, cache), else None.
    """

    step: int
    kind: str
    request_id: str
    block_id: int
    block_hash: int | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"event kind must be one of {', '.join(EVENT_KINDS)}; got {self.kind!r}")
        if self.block_id < 0:
            raise ValueError(f"block_id must be >= 0, got {self.block_id}")


def events_frame(events: Sequence[KVEvent]) -> pd.DataFrame:
    """The event log as a table: step, event, request, block, hash (6 hex digits), detail."""
    return pd.DataFrame(
        {
            "step": [e.step for e in events],
            "event": [e.kind for e in events],
            "request": [e.request_id for e in events],
            "block": [e.block_id for e in events],
            "hash": [short_hash(e.block_hash) for e in events],
            "detail": [e.detail for e in events],
        }
    )
