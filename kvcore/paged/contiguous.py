"""A contiguous first-fit allocator over one linear range of token slots (pre-paging serving systems).

Each request needs one unbroken extent; freed extents merge with free neighbours. What remains is
external fragmentation: free slots split into holes too small for the next request.
"""

from __future__ import annotations

import bisect


class FirstFitAllocator:
    """First-fit over ``capacity`` token slots; extents are ``(start, length)``.

    capacity: total token slots.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 token slot, got {capacity}")
        self.capacity = capacity
        self._starts: list[int] = [0]
        self._lengths: list[int] = [capacity]

    @property
    def num_free(self) -> int:
        return sum(self._lengths)

    def holes(self) -> list[int]:
        """Lengths of the free extents, in address order."""
        return list(self._lengths)

    def largest_hole(self) -> int:
        return max(self._lengths, default=0)

    def allocate(self, size: int) -> int | None:
        """Start of the first free extent of ``size`` slots, or None if no hole is big enough."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        for i, length in enumerate(self._lengths):
            if length >= size:
                start = self._starts[i]
                if length == size:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i] += size
                    self._lengths[i] -= size
                return start
        return None

    def free(self, start: int, size: int) -> None:
        """Return an extent; merge it with adjacent free extents."""
        i = bisect.bisect_left(self._starts, start)
        overlaps_next = i < len(self._starts) and self._starts[i] < start + size
        overlaps_prev = i > 0 and self._starts[i - 1] + self._lengths[i - 1] > start
        if overlaps_next or overlaps_prev:
            raise ValueError(f"extent ({start}, {size}) overlaps free memory: double free")
        self._starts.insert(i, start)
        self._lengths.insert(i, size)
        if i + 1 < len(self._starts) and self._starts[i] + self._lengths[i] == self._starts[i + 1]:
            self._lengths[i] += self._lengths.pop(i + 1)
            self._starts.pop(i + 1)
        if i and self._starts[i - 1] + self._lengths[i - 1] == self._starts[i]:
            self._lengths[i - 1] += self._lengths.pop(i)
            self._starts.pop(i)
