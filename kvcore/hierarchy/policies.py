"""Per-tier eviction order for KV chunks: LRU, LFU, FIFO.

Each tier of the hierarchy keeps its resident chunk keys in one of these. LMCache's local CPU and disk
backends evict in LRU order by default (``LRUEvictor``) and offer FIFO/LFU variants; the semantics here:

- LRU: the chunk whose last insert or hit is oldest leaves first.
- LFU: the chunk with the fewest hits since it entered *this* tier leaves first (a chunk entering counts
  1; a re-entry after eviction starts again at 1); ties go to the least recently used.
- FIFO: the chunk that entered first leaves first; hits do not change the order.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable, Iterator


class LRU:
    """Least recently used first (insert and touch move a key to the back)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
        """Add a key (it becomes the most recent)."""
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        """Record a hit on a resident key."""
        self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        """Drop a key."""
        del self._order[key]

    def victim(self) -> Hashable:
        """The key that would be evicted next (not removed)."""
        return next(iter(self._order))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._order)


class FIFO(LRU):
    """First in, first out: hits leave the order alone."""

    def touch(self, key: Hashable) -> None:
        """A hit does not reorder FIFO."""
        if key not in self._order:
            raise KeyError(key)


class LFU:
    """Fewest hits first, ties broken by least recent use (a heap with lazy deletion)."""

    def __init__(self) -> None:
        self._count: dict[Hashable, int] = {}
        self._last: dict[Hashable, int] = {}
        self._heap: list[tuple[int, int, Hashable]] = []
        self._clock = 0

    def _push(self, key: Hashable) -> None:
        self._clock += 1
        self._last[key] = self._clock
        # The clock is unique, so heap tuples never compare keys.
        heapq.heappush(self._heap, (self._count[key], self._clock, key))
        if len(self._heap) > 4 * len(self._count) + 64:
            self._heap = [(self._count[k], self._last[k], k) for k in self._count]
            heapq.heapify(self._heap)

    def insert(self, key: Hashable) -> None:
        """Add a key with one use."""
        self._count[key] = 1
        self._push(key)

    def touch(self, key: Hashable) -> None:
        """Count a hit."""
        self._count[key] += 1
        self._push(key)

    def remove(self, key: Hashable) -> None:
        """Drop a key (its heap entries go stale)."""
        del self._count[key]
        del self._last[key]

    def victim(self) -> Hashable:
        """The key with the fewest uses, least recently used among equals."""
        while True:
            count, last, key = self._heap[0]
            if self._count.get(key) == count and self._last.get(key) == last:
                return key
            heapq.heappop(self._heap)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._count

    def __len__(self) -> int:
        return len(self._count)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._count)


POLICIES: dict[str, type[LRU] | type[LFU]] = {"lru": LRU, "lfu": LFU, "fifo": FIFO}


def make_policy(name: str) -> LRU | LFU:
    """A fresh, empty eviction order by name ('lru', 'lfu', 'fifo')."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"eviction policy must be one of {sorted(POLICIES)}, got {name!r}") from None
