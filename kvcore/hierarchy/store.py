"""A tiered KV chunk store: per-tier eviction, demotion to the next tier, write-through or write-back.

Follows LMCache's storage manager: every chunk has the same size (``chunk_bytes``), tier 0 is GPU HBM,
lower tiers are slower and larger. Rules:

- **write** (a chunk was just computed in HBM): write-back puts it in the first tier only; write-through
  also copies it into every lower tier at once (LMCache's ``store`` to all enabled backends).
- **evict**: a tier over capacity evicts its policy's victim. If no lower tier holds a copy and no upper
  tier still holds it, the victim is *demoted* into the next tier (bytes cross that link); if there is no
  lower tier it is *dropped* (counted). A victim with a lower copy leaves silently (it is clean).
- **load / promote**: a hit in a lower tier copies the chunk up (the lower copy stays, so the chunk is
  clean when later evicted from above).

A tier whose capacity is below one chunk is off: writes and demotions skip it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

from kvcore.hierarchy.policies import LFU, LRU, make_policy
from kvcore.hierarchy.tiers import Tier

WRITE_MODES = ("write-back", "write-through")


class TieredStore:
    """Chunks across ``tiers`` (fastest first), each with its own eviction order.

    chunk_bytes: bytes of one chunk (all chunks are full, so equal). policy: one name for every tier or
    one per tier ('lru', 'lfu', 'fifo'). write_mode: 'write-back' or 'write-through'.
    """

    def __init__(self, tiers: Sequence[Tier], chunk_bytes: int, policy: str | Sequence[str] = "lru",
                 write_mode: str = "write-back") -> None:
        if not tiers:
            raise ValueError("a store needs at least one tier")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        if write_mode not in WRITE_MODES:
            raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
        names = [policy] * len(tiers) if isinstance(policy, str) else list(policy)
        if len(names) != len(tiers):
            raise ValueError(f"give one policy or one per tier ({len(tiers)}), got {len(names)}")
        self.tiers = list(tiers)
        self.chunk_bytes = chunk_bytes
        self.write_mode = write_mode
        self.capacity = [int(t.capacity_bytes // chunk_bytes) for t in tiers]
        self.orders: list[LRU | LFU] = [make_policy(n) for n in names]
        self.moved: dict[tuple[str, str, str], int] = defaultdict(int)  # (from, to, why) -> bytes
        self.evictions = [0] * len(tiers)
        self.peak = [0] * len(tiers)
        self.drops = 0
        self.dropped: set[Hashable] = set()
        self._moving: set[Hashable] = set()

    # -- queries ---------------------------------------------------------------------------------
    def where(self, key: Hashable) -> list[int]:
        """Indices of the tiers holding ``key``, fastest first."""
        return [i for i, order in enumerate(self.orders) if key in order]

    def fastest(self, key: Hashable) -> int | None:
        """Index of the fastest tier holding ``key``, or None."""
        for i, order in enumerate(self.orders):
            if key in order:
                return i
        return None

    def occupancy(self) -> list[int]:
        """Chunks resident in each tier."""
        return [len(order) for order in self.orders]

    # -- verbs -----------------------------------------------------------------------------------
    def write(self, key: Hashable) -> None:
        """A chunk was computed in HBM: keep it per the write mode."""
        self.dropped.discard(key)
        top = self._next_on(0)
        if top is None:
            self._drop(key)
            return
        targets = range(top, len(self.tiers)) if self.write_mode == "write-through" else [top]
        for i in targets:
            if self.capacity[i] > 0:
                self._place(key, i, 0, "write")

    def touch(self, key: Hashable, tier: int) -> None:
        """Record a hit on ``key`` in ``tier``."""
        self.orders[tier].touch(key)

    def promote(self, key: Hashable, src: int, dst: int, why: str = "load") -> None:
        """Copy ``key`` from tier ``src`` up into tier ``dst`` (a load or a prefetch); the source copy stays."""
        if dst >= src:
            raise ValueError(f"promote moves a chunk up: dst ({dst}) must be < src ({src})")
        if key in self.orders[src]:  # it may have been evicted since it was read
            self.orders[src].touch(key)
        target = self._next_on(dst)
        if target is not None and target < src:
            self._place(key, target, src, why)

    # -- mechanics -------------------------------------------------------------------------------
    def _next_on(self, start: int) -> int | None:
        for i in range(start, len(self.tiers)):
            if self.capacity[i] > 0:
                return i
        return None

    def _place(self, key: Hashable, tier: int, src: int, why: str) -> None:
        order = self.orders[tier]
        if key in order:
            order.touch(key)
            return
        self._moving.add(key)  # room made for it may evict its other copy: that is not a loss
        while len(order) >= self.capacity[tier]:
            victim = order.victim()
            order.remove(victim)
            self.evictions[tier] += 1
            self._demote(victim, tier)
        self._moving.discard(key)
        order.insert(key)
        self.peak[tier] = max(self.peak[tier], len(order))
        if src != tier:
            self.moved[(self.tiers[src].name, self.tiers[tier].name, why)] += self.chunk_bytes

    def _demote(self, key: Hashable, tier: int) -> None:
        if key in self._moving or self.fastest(key) is not None:
            return  # a copy lives elsewhere: clean below, or still hot above (demoted when that copy goes)
        below = self._next_on(tier + 1)
        if below is None:
            self._drop(key)
        else:
            self._place(key, below, tier, "demote")

    def _drop(self, key: Hashable) -> None:
        self.drops += 1
        self.dropped.add(key)
