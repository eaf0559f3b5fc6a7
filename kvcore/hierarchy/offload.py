"""LMCache-style KV offload simulation: chunked prefix reuse across GPU/CPU/disk/remote tiers.

Follows LMCache (Liu et al. 2024, "CacheGen"/LMCache; docs: storage backends, ``chunk_size`` 256): each
prompt is cut into chunks keyed by prefix hash; at prefill the longest cached prefix is looked up (the
lookup stops at the first missing chunk, like LMCache's ``retrieve``); for each cached chunk the engine
takes the cheaper of loading it from its fastest tier and recomputing it, where recompute time comes from
:class:`~kvcore.sched.cost.CostModel`; the rest of the prompt is prefilled in one pass. New chunks are
stored (write-back or write-through), tiers evict and demote (:mod:`kvcore.hierarchy.store`), and an
optional prefetch warms a chat session's history into GPU or CPU shortly before its next turn.

TTFT here is the request's own prefill latency (loads + one prefill pass), with no queueing behind other
requests; loads are not overlapped with compute (layer-wise pipelining would hide part of them).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kvcore.hierarchy.store import WRITE_MODES, TieredStore
from kvcore.hierarchy.tiers import Tier
from kvcore.hierarchy.workload import Request, chunk_keys
from kvcore.sched.cost import CostModel, prefill_pairs

PREFETCH_TARGETS = ("off", "gpu", "cpu")
RECOMPUTED, COMPUTED = "recomputed (cheaper than loading)", "computed (not cached)"


@dataclass(slots=True)
class OffloadConfig:
    """Settings of the offload simulation.

    chunk_tokens: tokens per chunk (LMCache default 256). policy: eviction order of every tier ('lru',
    'lfu', 'fifo'). write_mode: 'write-back' or 'write-through'. prefetch: 'off', 'gpu' or 'cpu' (where a
    chat session's history is warmed). prefetch_lead_s: seconds before the next turn's arrival the
    prefetch starts (e.g. a typing signal). store_output: also keep the answer's KV (the next turn reuses
    it). snapshots: how many residency snapshots the chunk map records.
    """

    chunk_tokens: int = 256
    policy: str = "lru"
    write_mode: str = "write-back"
    prefetch: str = "off"
    prefetch_lead_s: float = 5.0
    store_output: bool = True
    snapshots: int = 40

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_tokens <= 65536:
            raise ValueError(f"chunk_tokens must be in [1, 65536], got {self.chunk_tokens}")
        if self.policy not in ("lru", "lfu", "fifo"):
            raise ValueError(f"policy must be 'lru', 'lfu' or 'fifo', got {self.policy!r}")
        if self.write_mode not in WRITE_MODES:
            raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {self.write_mode!r}")
        if self.prefetch not in PREFETCH_TARGETS:
            raise ValueError(f"prefetch must be one of {PREFETCH_TARGETS}, got {self.prefetch!r}")
        if self.prefetch_lead_s < 0:
            raise ValueError(f"prefetch_lead_s must be >= 0 seconds, got {self.prefetch_lead_s}")
        if not 1 <= self.snapshots <= 1000:
            raise ValueError(f"snapshots must be in [1, 1000], got {self.snapshots}")


@dataclass(slots=True)
class OffloadResult:
    """What the simulation measured.

    requests: one row per request (tokens served per source, load seconds, TTFT with and without the
    hierarchy). sources: tokens and share per source (each tier, recomputed, computed). tiers: per tier
    capacity, evictions, peak chunks. links: bytes moved per (from, to, why). residency: long format
    (snapshot, request, time_s, chunk, tier) of where each chunk lives. drops: chunks dropped from the
    last tier.
    """

    requests: pd.DataFrame
    sources: pd.DataFrame
    tiers: pd.DataFrame
    links: pd.DataFrame
    residency: pd.DataFrame
    drops: int
    chunk_bytes: int
    extra: dict = field(default_factory=dict)

    def ttft_summary(self) -> pd.DataFrame:
        """TTFT p50/p90/p99/mean (ms) with the hierarchy and with recompute of the whole prompt."""
        rows = []
        for label, col in (("with hierarchy", "ttft_s"), ("recompute whole prompt", "ttft_recompute_s")):
            v = self.requests[col].to_numpy() * 1e3
            rows.append({"setup": label, "p50_ms": np.percentile(v, 50), "p90_ms": np.percentile(v, 90),
                         "p99_ms": np.percentile(v, 99), "mean_ms": v.mean()})
        return pd.DataFrame(rows)


def recompute_time(cost: CostModel, chunk_index: int, chunk_tokens: int) -> float:
    """Seconds to prefill chunk ``chunk_index`` after its prefix is in HBM (the cost model, no step overhead)."""
    cached = chunk_index * chunk_tokens
    return cost.step_time(chunk_tokens, prefill_pairs(chunk_tokens, cached), cached) - cost.step_overhead_s


def should_load(tier: Tier, chunk_bytes: int, cost: CostModel, chunk_index: int, chunk_tokens: int) -> bool:
    """True when loading the chunk from ``tier`` is strictly faster than recomputing it."""
    return tier.read_time(chunk_bytes) < recompute_time(cost, chunk_index, chunk_tokens)


class _Run:
    """One pass over a workload; holds the store and per-request tallies."""

    def __init__(self, requests: Sequence[Request], tiers: Sequence[Tier], cost: CostModel,
                 config: OffloadConfig) -> None:
        self.reqs, self.tiers, self.cost, self.cfg = list(requests), list(tiers), cost, config
        self.C = config.chunk_tokens
        self.chunk_bytes = int(cost.kv_bytes_per_token * self.C)
        self.store = TieredStore(tiers, self.chunk_bytes, config.policy, config.write_mode)
        self.ids: dict[int, int] = {}  # chunk key -> small id, in order of first write
        self.prefetch_done: dict[int, float] = {}
        self.rows: list[dict] = []
        self.snaps: list[tuple[int, int, float, int, str]] = []
        self.num_snaps = 0
        self.snap_every = max(1, len(self.reqs) // config.snapshots)
        self._recompute = [recompute_time(cost, i, self.C) for i in range(64)]

    def recompute(self, i: int) -> float:
        while i >= len(self._recompute):
            self._recompute.append(recompute_time(self.cost, len(self._recompute), self.C))
        return self._recompute[i]

    def cached_prefix(self, keys: list[int]) -> int:
        """Leading chunks found in some tier (the lookup stops at the first miss)."""
        for i, key in enumerate(keys):
            if self.store.fastest(key) is None:
                return i
        return len(keys)

    def write(self, key: int) -> None:
        self.ids.setdefault(key, len(self.ids))
        self.store.write(key)

    def arrive(self, r: Request, now: float) -> float:
        """Serve the prefill of ``r``; return its completion time."""
        keys = chunk_keys(r.segments, self.C)
        served = [0.0] * len(self.tiers)
        recomputed, load_s, pairs, kv_read = 0, 0.0, 0, 0
        hit = self.cached_prefix(keys)
        plan = []  # decided on the lookup's view, applied after, as if the hit chunks were pinned
        for i, key in enumerate(keys[:hit]):
            tier = self.store.fastest(key)
            if tier == 0:
                plan.append(("reuse", key, tier))
                served[0] += self.C
                kv_read += self.C
            elif self.tiers[tier].read_time(self.chunk_bytes) < self.recompute(i):
                plan.append(("load", key, tier))
                load_s += self.tiers[tier].read_time(self.chunk_bytes)
                served[tier] += self.C
                kv_read += self.C
            else:
                plan.append(("recompute", key, tier))
                recomputed += self.C
                pairs += prefill_pairs(self.C, i * self.C)
        for action, key, tier in plan:
            if action == "load":
                self.store.promote(key, tier, 0, "load")
            elif action == "reuse" and key in self.store.orders[0]:
                self.store.touch(key, 0)
            else:  # recomputed, or evicted from HBM by this request's own writes: it is in HBM now
                self.write(key)
        for key in keys[hit:]:
            self.write(key)
        T, start = r.prompt_tokens, hit * self.C
        computed = T - start
        pairs += prefill_pairs(computed, start)
        new = recomputed + computed
        if new == 0:  # a full hit still runs the last token to get its logits
            new, pairs = 1, T
        wait = max(0.0, self.prefetch_done.pop(r.index, now) - now)
        ttft = wait + load_s + self.cost.step_time(new, pairs, kv_read)
        self.rows.append({"request": r.index, "arrival_s": r.arrival_s, "session": r.session, "turn": r.turn,
                          "prompt_tokens": T, **{t.name: s for t, s in zip(self.tiers, served, strict=True)},
                          RECOMPUTED: recomputed, COMPUTED: computed, "load_s": load_s, "prefetch_wait_s": wait,
                          "ttft_s": ttft,
                          "ttft_recompute_s": self.cost.step_time(T, prefill_pairs(T, 0), 0)})
        ctx = T + r.output_tokens // 2
        return now + ttft + r.output_tokens * self.cost.step_time(1, ctx, ctx)

    def complete(self, r: Request) -> None:
        """The answer is done: keep its KV (the chunks past the prompt's full chunks)."""
        if self.cfg.store_output:
            n_prompt = r.prompt_tokens // self.C
            for key in chunk_keys((*r.segments, r.output), self.C)[n_prompt:]:
                self.write(key)

    def prefetch(self, r: Request, now: float) -> None:
        """Warm the cached prefix of ``r`` into the prefetch target tier before it arrives."""
        target = 0 if self.cfg.prefetch == "gpu" else min(1, len(self.tiers) - 1)
        busy = 0.0
        for key in chunk_keys(r.segments, self.C):
            tier = self.store.fastest(key)
            if tier is None:
                break
            if tier > target:
                busy += self.tiers[tier].read_time(self.chunk_bytes)
                self.store.promote(key, tier, target, "prefetch")
        self.prefetch_done[r.index] = now + busy

    def snapshot(self, r: Request, now: float) -> None:
        snap = self.num_snaps
        self.num_snaps += 1
        for tier, order in zip(self.tiers, self.store.orders, strict=True):
            self.snaps.extend((snap, r.index, now, self.ids[k], tier.name) for k in order)


def simulate_offload(requests: Sequence[Request], tiers: Sequence[Tier], cost: CostModel,
                     config: OffloadConfig | None = None) -> OffloadResult:
    """Replay ``requests`` through the tiered store; see the module docstring for the rules.

    tiers: fastest first; tier 0 is GPU HBM, where prefill runs. cost: the step-time model of the GPU
    (its ``kv_bits`` sets the chunk bytes).
    """
    config = config or OffloadConfig()
    if not requests:
        raise ValueError("the workload has no requests")
    run = _Run(requests, tiers, cost, config)
    events: list[tuple[float, int, int, int]] = [(r.arrival_s, 1, r.index, r.index) for r in run.reqs]
    heapq.heapify(events)
    by_index = {r.index: r for r in run.reqs}
    arrived = 0
    while events:
        now, kind, _, idx = heapq.heappop(events)
        r = by_index[idx]
        if kind == 0:
            run.complete(r)
            if config.prefetch != "off" and r.next_index is not None and r.next_index in by_index:
                nxt = by_index[r.next_index]
                start = max(now, nxt.arrival_s - config.prefetch_lead_s)
                if start < nxt.arrival_s:  # a turn that already arrived has nothing left to prefetch
                    heapq.heappush(events, (start, 2, nxt.index, nxt.index))
        elif kind == 1:
            heapq.heappush(events, (run.arrive(r, now), 0, r.index, r.index))
            arrived += 1
            if arrived % run.snap_every == 0 or arrived == len(run.reqs):
                run.snapshot(r, now)
        else:
            run.prefetch(r, now)
    return _result(run)


def _result(run: _Run) -> OffloadResult:
    reqs = pd.DataFrame(run.rows).sort_values("request", ignore_index=True)
    sources = [t.name for t in run.tiers] + [RECOMPUTED, COMPUTED]
    totals = reqs[sources].sum()
    src = pd.DataFrame({"source": sources, "tokens": totals.to_numpy().astype(np.int64),
                        "share": (totals / reqs["prompt_tokens"].sum()).to_numpy()})
    store = run.store
    tiers = pd.DataFrame({
        "tier": [t.name for t in run.tiers],
        "capacity_chunks": store.capacity,
        "capacity_GB": [t.capacity_bytes / 1e9 for t in run.tiers],
        "read_GBps": [t.read_bandwidth / 1e9 for t in run.tiers],
        "hit_rate_tokens": [totals[t.name] / reqs["prompt_tokens"].sum() for t in run.tiers],
        "peak_chunks": store.peak, "final_chunks": store.occupancy(), "evictions": store.evictions,
    })
    links = pd.DataFrame([{"from": a, "to": b, "why": why, "bytes": n, "GB": n / 1e9}
                          for (a, b, why), n in sorted(store.moved.items())],
                         columns=["from", "to", "why", "bytes", "GB"])
    residency = pd.DataFrame(run.snaps, columns=["snapshot", "request", "time_s", "chunk", "tier"])
    return OffloadResult(reqs, src, tiers, links, residency, store.drops, run.chunk_bytes,
                         {"unique_chunks": len(run.ids)})


def offload_summary(result: OffloadResult) -> pd.DataFrame:
    """A two-column (metric, value) digest: token share per source, TTFT percentiles, bytes, drops."""
    rows = [(f"tokens from {s}", share) for s, share in zip(result.sources["source"], result.sources["share"],
                                                            strict=True)]
    for t in result.ttft_summary().itertuples():
        rows += [(f"TTFT p50 ms, {t.setup}", t.p50_ms), (f"TTFT p90 ms, {t.setup}", t.p90_ms)]
    rows += [(f"GB {r['from']} -> {r['to']} ({r['why']})", r["GB"]) for _, r in result.links.iterrows()]
    rows += [("chunks dropped from the last tier", result.drops), ("unique chunks", result.extra["unique_chunks"]),
             ("chunk MB", result.chunk_bytes / 1e6)]
    return pd.DataFrame(rows, columns=["metric", "value"])
