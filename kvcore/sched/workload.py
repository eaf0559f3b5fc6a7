"""Synthetic serving workloads: arrivals, prompt/output lengths, shared prefixes, deterministic token ids.

Arrivals are Poisson (exponential gaps) or bursty (gamma gaps with a chosen coefficient of variation,
CV > 1 clusters requests into bursts; CV = 1 is Poisson), the two arrival models serving benchmarks use
(vLLM ``benchmark_serving --burstiness``). Lengths are fixed, uniform or lognormal (ShareGPT-like long
tails). Everything is drawn from one seeded ``numpy.random.Generator``, so a seed gives one workload.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from kvcore.sched.request import VOCAB_SIZE, Request

ARRIVALS = ("poisson", "bursty")
LENGTHS = ("fixed", "uniform", "lognormal")
MAX_REQUESTS = 100_000


@dataclass(slots=True, frozen=True)
class Workload:
    """Requests in arrival order plus what makes their token ids.

    prefix_tokens: length of the prompt part shared by requests with the same prefix_id. seed: token-id seed.
    prompts: explicit prompt token ids, one tuple per request (None: drawn from ``seed``; see :meth:`from_prompts`).
    """

    requests: tuple[Request, ...]
    prefix_tokens: int = 0
    seed: int = 0
    name: str = "workload"
    prompts: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def from_prompts(cls, prompt_ids: list[list[int]], output_tokens: list[int],
                     arrival_s: list[float] | None = None, name: str = "prompts") -> Workload:
        """A workload with explicit token ids: request ``i`` has prompt ``prompt_ids[i]``, runs to ``output_tokens[i]``
        tokens and arrives at ``arrival_s[i]`` (all at 0 when None). Arrivals must not decrease."""
        if len(output_tokens) != len(prompt_ids) or (arrival_s is not None and len(arrival_s) != len(prompt_ids)):
            raise ValueError(f"give one output length (and arrival) per prompt: {len(prompt_ids)} prompts, "
                             f"{len(output_tokens)} output lengths"
                             + ("" if arrival_s is None else f", {len(arrival_s)} arrivals"))
        arrivals = [0.0] * len(prompt_ids) if arrival_s is None else arrival_s
        requests = tuple(Request(i, float(a), len(p), int(o))
                         for i, (p, o, a) in enumerate(zip(prompt_ids, output_tokens, arrivals, strict=True)))
        return cls(requests, name=name, prompts=tuple(tuple(int(t) for t in p) for p in prompt_ids))

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("a workload needs at least one request")
        if self.prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be >= 0, got {self.prefix_tokens}")
        arrivals = [r.arrival_s for r in self.requests]
        if any(b < a for a, b in itertools.pairwise(arrivals)):
            raise ValueError("requests must be sorted by arrival_s")
        if any(r.index != i for i, r in enumerate(self.requests)):
            raise ValueError("request indices must be 0, 1, 2, ... in arrival order")
        if self.prompts is not None and [len(p) for p in self.prompts] != [r.prompt_tokens for r in self.requests]:
            raise ValueError("give one prompt of prompt_tokens ids per request")

    def prompt_ids(self, index: int) -> list[int]:
        """Synthetic but deterministic prompt token ids of request ``index``.

        A request with a prefix_id starts with that prefix's ``prefix_tokens`` ids (cut to its prompt
        length); the rest is unique to the request. Equal ids give equal block hashes, so prefix-cache
        hits are real hits in ``kvcore.paged``.
        """
        if self.prompts is not None:
            return list(self.prompts[index])
        req = self.requests[index]
        shared = min(self.prefix_tokens, req.prompt_tokens) if req.prefix_id is not None else 0
        own = np.random.default_rng([self.seed, 1, index]).integers(0, VOCAB_SIZE, req.prompt_tokens - shared)
        if not shared:
            return own.tolist()
        prefix = np.random.default_rng([self.seed, 2, req.prefix_id]).integers(0, VOCAB_SIZE, shared)
        return prefix.tolist() + own.tolist()

    @property
    def total_output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.requests)

    @property
    def total_prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)


@dataclass(slots=True)
class WorkloadConfig:
    """Settings of a synthetic workload.

    num_requests: requests to generate. arrival: 'poisson' or 'bursty'. rate: mean arrivals per second.
    burst_cv: coefficient of variation of inter-arrival gaps for 'bursty' (gamma shape 1 / CV^2).
    lengths: 'fixed', 'uniform' (mean x [1 - spread, 1 + spread]) or 'lognormal' (sigma = spread).
    prompt_mean / output_mean: mean lengths in tokens; max_prompt / max_output: clip, in tokens.
    shared_prefix_fraction: share of requests that start with one of ``num_prefixes`` shared prefixes of
    ``prefix_tokens`` tokens. seed: the one seed of everything random.
    """

    num_requests: int = 200
    arrival: str = "poisson"
    rate: float = 24.0
    burst_cv: float = 3.0
    lengths: str = "lognormal"
    prompt_mean: int = 512
    output_mean: int = 256
    spread: float = 0.8
    max_prompt: int = 4096
    max_output: int = 2048
    shared_prefix_fraction: float = 0.0
    prefix_tokens: int = 256
    num_prefixes: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_requests <= MAX_REQUESTS:
            raise ValueError(f"num_requests must be in 1..{MAX_REQUESTS}, got {self.num_requests}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if self.lengths not in LENGTHS:
            raise ValueError(f"lengths must be one of {LENGTHS}, got {self.lengths!r}")
        if not (self.rate > 0 and np.isfinite(self.rate)):
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if not 0.05 <= self.burst_cv <= 20:
            raise ValueError(f"burst_cv must be in [0.05, 20], got {self.burst_cv}")
        for name in ("prompt_mean", "output_mean", "max_prompt", "max_output", "num_prefixes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prompt_mean > self.max_prompt or self.output_mean > self.max_output:
            raise ValueError(f"mean lengths ({self.prompt_mean}, {self.output_mean}) must not exceed the maxima "
                             f"({self.max_prompt}, {self.max_output})")
        limit = 1.0 if self.lengths == "uniform" else 3.0
        if not 0 <= self.spread <= limit:
            raise ValueError(f"spread must be in [0, {limit}] for {self.lengths} lengths, got {self.spread}")
        if not 0 <= self.shared_prefix_fraction <= 1:
            raise ValueError(f"shared_prefix_fraction must be in [0, 1], got {self.shared_prefix_fraction}")
        if self.prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be >= 0, got {self.prefix_tokens}")


def make_workload(config: WorkloadConfig) -> Workload:
    """Draw a workload from ``config`` with ``numpy.random.default_rng(config.seed)``."""
    rng = np.random.default_rng(config.seed)
    n = config.num_requests
    arrivals = _arrivals(rng, config)
    prompts = _lengths(rng, config.lengths, config.prompt_mean, config.spread, config.max_prompt, n)
    outputs = _lengths(rng, config.lengths, config.output_mean, config.spread, config.max_output, n)
    shared = rng.random(n) < config.shared_prefix_fraction
    prefix_ids = rng.integers(0, config.num_prefixes, n)
    requests = tuple(
        Request(i, float(arrivals[i]), int(prompts[i]), int(outputs[i]), int(prefix_ids[i]) if shared[i] else None)
        for i in range(n))
    return Workload(requests, config.prefix_tokens, config.seed, name=f"{config.arrival}-{config.lengths}")


def _arrivals(rng: np.random.Generator, config: WorkloadConfig) -> np.ndarray:
    n, rate = config.num_requests, config.rate
    if config.arrival == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    else:
        shape = 1.0 / config.burst_cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    times = np.cumsum(gaps)
    return times - times[0]  # the first request arrives at t = 0


def _lengths(rng: np.random.Generator, kind: str, mean: int, spread: float, maximum: int, n: int) -> np.ndarray:
    if kind == "fixed":
        values = np.full(n, float(mean))
    elif kind == "uniform":
        low, high = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
        values = rng.integers(low, high + 1, n).astype(float)
    else:
        values = rng.lognormal(np.log(mean) - spread**2 / 2, spread, n)  # E[X] = mean before clipping
    return np.clip(np.rint(values), 1, maximum).astype(np.int64)
