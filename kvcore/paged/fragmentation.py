"""KV memory waste on one workload under three allocators (vLLM paper, Kwon et al. 2023, Fig. 2).

* contiguous, max length: every request reserves ``max_seq_len`` contiguous slots at admission
  (early serving systems); waste = slots reserved for tokens not yet generated + slots never used.
* contiguous, exact length: reserves exactly prompt + output (an oracle length), first fit; waste =
  reserved-for-future + external fragmentation as requests come and go.
* paged: the real :class:`KVCacheManager` (prefix caching off), blocks allocated on demand; waste =
  empty slots in each request's last block. When blocks run out the newest request is preempted and
  recomputed later (vLLM's recompute preemption).

All three run the same FCFS schedule: each step admits waiting requests in order while they fit
(at most ``max_num_seqs`` running), then every running request decodes one token. Per step:
``used`` = tokens stored; ``reserved_future`` = slots held for tokens a request has not generated
yet; ``internal_waste`` = held slots that will never hold a token; ``external_waste`` = all free
slots while the waiting head request is refused although they add up to its reservation (no single
hole is large enough: compaction would admit it), else 0. Reported values are averages over the
steps; waste % = (reserved_future + internal + external) / (used + reserved_future + internal + external).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kvcore.checks import positive_ints
from kvcore.paged.contiguous import FirstFitAllocator
from kvcore.paged.manager import KVCacheManager
from kvcore.paged.workload import LengthDistribution, generate_workload

ALLOCATORS = ("contiguous, max length", "contiguous, exact length", "paged")
WASTE_COLUMNS = ("used", "reserved_future", "internal_waste", "external_waste")


@dataclass(slots=True)
class FragmentationConfig:
    """One workload and one memory size, shared by all allocators.

    num_requests: requests, all queued at step 0. prompt/output: length distributions (tokens).
    max_seq_len: longest request (tokens) and the max-length allocator's reservation.
    block_size: tokens per block. num_blocks: memory = num_blocks * block_size token slots for every
    allocator. max_num_seqs: running requests at most (vLLM's default 256). seed: workload seed.
    """

    num_requests: int = 200
    prompt: LengthDistribution = field(default_factory=lambda: LengthDistribution("lognormal", 161, 1.0))
    output: LengthDistribution = field(default_factory=lambda: LengthDistribution("lognormal", 338, 1.0))
    max_seq_len: int = 2048
    block_size: int = 16
    num_blocks: int = 2048
    max_num_seqs: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        positive_ints(self, "num_requests", "max_seq_len", "block_size", "num_blocks", "max_num_seqs")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.max_seq_len > self.capacity:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must fit in memory: num_blocks x block_size "
                             f"= {self.capacity} token slots")

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    def workload(self) -> pd.DataFrame:
        return generate_workload(self.num_requests, self.prompt, self.output, self.max_seq_len, self.seed)


@dataclass(slots=True)
class _Totals:
    """Per-step quantities summed over steps."""

    steps: int = 0
    running: int = 0
    peak_running: int = 0
    preemptions: int = 0
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WASTE_COLUMNS, 0))

    def add(self, running: int, used: int, reserved: int, internal: int, external: int) -> None:
        self.steps += 1
        self.running += running
        self.peak_running = max(self.peak_running, running)
        for name, value in zip(WASTE_COLUMNS, (used, reserved, internal, external), strict=True):
            self.sums[name] += value

    def row(self, allocator: str, capacity: int) -> dict[str, float | int | str]:
        avg = {name: total / max(1, self.steps) for name, total in self.sums.items()}
        held = sum(avg.values())
        waste = held - avg["used"]
        return {"allocator": allocator, "capacity_tokens": capacity, "steps": self.steps,
                "mean_running": self.running / max(1, self.steps), "peak_running": self.peak_running,
                "preemptions": self.preemptions, **avg,
                "allocated": avg["used"] + avg["reserved_future"] + avg["internal_waste"],
                "waste_pct": 100.0 * waste / held if held else 0.0}


def simulate_contiguous(prompts: np.ndarray, outputs: np.ndarray, config: FragmentationConfig,
                        exact: bool) -> _Totals:
    """FCFS over a first-fit contiguous allocator; reservation = prompt + output (exact) or max_seq_len."""
    alloc = FirstFitAllocator(config.capacity)
    finals = prompts + outputs
    sizes = finals if exact else np.full_like(finals, config.max_seq_len)
    waiting, running, finish = deque(range(len(prompts))), {}, []
    used = reserved = internal = 0
    totals, step = _Totals(), 0
    while waiting or running:
        fragmented = False
        while waiting and len(running) < config.max_num_seqs:
            i = waiting[0]
            start = alloc.allocate(int(sizes[i]))
            if start is None:
                fragmented = alloc.num_free >= sizes[i]
                break
            waiting.popleft()
            running[i] = start
            used, reserved = used + int(prompts[i]), reserved + int(outputs[i])
            internal += int(sizes[i] - finals[i])
            heapq.heappush(finish, (step + int(outputs[i]), i))
        if not running:
            raise ValueError(f"request {waiting[0]} needs {sizes[waiting[0]]} slots; memory has {config.capacity}")
        step += 1
        used, reserved = used + len(running), reserved - len(running)
        totals.add(len(running), used, reserved, internal, alloc.num_free if fragmented else 0)
        while finish and finish[0][0] == step:
            _, i = heapq.heappop(finish)
            alloc.free(running.pop(i), int(sizes[i]))
            used, internal = used - int(finals[i]), internal - int(sizes[i] - finals[i])
    return totals


class _PagedRun:
    """FCFS over the real block manager: blocks on demand, recompute preemption of the newest request."""

    def __init__(self, prompts: np.ndarray, outputs: np.ndarray, config: FragmentationConfig) -> None:
        self.prompts, self.outputs, self.config = prompts, outputs, config
        self.manager = KVCacheManager(config.num_blocks, config.block_size, enable_prefix_caching=False,
                                      log_events=False)
        self.generated = np.zeros(len(prompts), dtype=np.int64)
        self.waiting: deque[int] = deque(range(len(prompts)))
        self.running: list[int] = []
        self.used = 0
        self.totals = _Totals()

    def length(self, i: int) -> int:
        return int(self.prompts[i] + self.generated[i])

    def admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            i = self.waiting[0]
            # A preempted request re-prefills its prompt and the tokens it had generated (recompute).
            if self.manager.allocate(str(i), [0] * self.length(i)) is None:
                break
            self.running.append(self.waiting.popleft())
            self.used += self.length(i)
        if not self.running:
            raise ValueError(f"request {self.waiting[0]} does not fit in {self.config.capacity} token slots")

    def preempt_for(self, i: int) -> bool:
        """Free the newest running requests until ``i`` can grow by one token; False if ``i`` itself went."""
        while not self.manager.can_append(str(i)):
            victim = self.running.pop()
            self.manager.free(str(victim))
            self.used -= self.length(victim)
            self.waiting.appendleft(victim)
            self.totals.preemptions += 1
            if victim == i:
                return False
        return True

    def decode(self) -> None:
        for i in list(self.running):
            if i in self.running and self.preempt_for(i):
                self.manager.append(str(i), [0])
                self.generated[i] += 1
                self.used += 1
        held = (self.config.num_blocks - self.manager.num_free_blocks) * self.config.block_size
        self.totals.add(len(self.running), self.used, 0, held - self.used, 0)
        for i in [i for i in self.running if self.generated[i] == self.outputs[i]]:
            self.running.remove(i)
            self.manager.free(str(i))
            self.used -= self.length(i)


def simulate_paged(prompts: np.ndarray, outputs: np.ndarray, config: FragmentationConfig) -> _Totals:
    """FCFS over the real block manager (see :class:`_PagedRun`)."""
    run = _PagedRun(prompts, outputs, config)
    while run.waiting or run.running:
        run.admit()
        run.decode()
    return run.totals


def fragmentation_experiment(config: FragmentationConfig) -> pd.DataFrame:
    """One row per allocator: time-averaged used / reserved / internal / external tokens and waste %."""
    workload = config.workload()
    prompts = workload["prompt_len"].to_numpy()
    outputs = workload["output_len"].to_numpy()
    runs = (simulate_contiguous(prompts, outputs, config, exact=False),
            simulate_contiguous(prompts, outputs, config, exact=True),
            simulate_paged(prompts, outputs, config))
    return pd.DataFrame([t.row(name, config.capacity) for name, t in zip(ALLOCATORS, runs, strict=True)])


def waste_breakdown(summary: pd.DataFrame) -> pd.DataFrame:
    """Long form of the summary for a stacked bar: allocator, part, percent of held memory."""
    long = summary.melt(id_vars="allocator", value_vars=list(WASTE_COLUMNS), var_name="part", value_name="tokens")
    held = long.groupby("allocator", sort=False)["tokens"].transform("sum")
    long["percent"] = 100.0 * long["tokens"] / held.where(held > 0, 1)
    return long
