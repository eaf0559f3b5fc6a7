"""Prefill/decode disaggregation vs colocated serving, on the same workload and the same number of GPUs.

Follows DistServe (Zhong et al., OSDI 2024) and vLLM's / SGLang's disaggregated prefill: prefill workers
run only prompts, ship each request's KV (``kv_bytes(prompt)`` over a link: bytes / bandwidth + latency,
one transfer at a time per prefill worker) to a decode worker that only decodes. Colocated engines run
both on each GPU and, like vLLM without chunked prefill, schedule waiting prefills first, so a prefill
stalls every running decode (the interference DistServe removes). Step times come from
:class:`~kvcore.sched.cost.CostModel`; batches are capped by a token budget, a sequence cap and the KV
capacity of the GPU (a request reserves prompt + output tokens when admitted, no preemption).

As in DistServe, the first token comes from the prefill step, so TTFT ends there; the KV transfer and the
wait for a decode slot delay the second token and show up in TPOT. This is a compact event-driven model
of its own (step by step per GPU), not the full scheduler of :mod:`kvcore.sched`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from kvcore.checks import positive_numbers
from kvcore.sched.cost import CostModel, prefill_pairs
from kvcore.shapes import kv_bytes


class ServedRequest(Protocol):
    """What the PD simulation reads from a request (``ServeRequest`` or ``kvcore.sched`` workload requests)."""

    @property
    def index(self) -> int: ...
    @property
    def arrival_s(self) -> float: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...


@dataclass(slots=True)
class ServeRequest:
    """A request of the serving workload: arrival (s), prompt and output lengths (tokens)."""

    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(slots=True)
class ServingWorkload:
    """Poisson arrivals with uniform (+-50%) prompt and output lengths.

    num_requests: requests. rate: requests per second. prompt_tokens, output_tokens: mean lengths.
    seed: random seed.
    """

    num_requests: int = 300
    rate: float = 6.0
    prompt_tokens: int = 2048
    output_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        positive_numbers(self, "num_requests", "rate", "prompt_tokens", "output_tokens")

    def generate(self) -> list[ServeRequest]:
        """The requests in arrival order."""
        rng = np.random.default_rng(self.seed)
        arrivals = np.cumsum(rng.exponential(1 / self.rate, self.num_requests))

        def lengths(mean: int) -> np.ndarray:
            return np.maximum(1, rng.integers(mean // 2, mean + mean // 2 + 1, self.num_requests))

        prompts, outputs = lengths(self.prompt_tokens), lengths(self.output_tokens)
        return [ServeRequest(i, float(a), int(p), int(o))
                for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs, strict=True))]


@dataclass(slots=True)
class PDConfig:
    """Both setups' settings.

    num_gpus: GPUs in each setup. prefill_gpus: of those, how many only prefill when disaggregated (the
    rest decode). link_bandwidth: bytes/s of the KV link (inf allowed). link_latency_s: seconds per
    transfer. max_batched_tokens: prefill token budget per step (vLLM's max_num_batched_tokens).
    max_num_seqs: sequences per batch. reserve_fraction: HBM kept for activations. ttft_slo_s,
    tpot_slo_s: the latency targets whose joint attainment is reported (DistServe's goodput).
    """

    num_gpus: int = 2
    prefill_gpus: int = 1
    link_bandwidth: float = 50e9
    link_latency_s: float = 1e-4
    max_batched_tokens: int = 8192
    max_num_seqs: int = 256
    reserve_fraction: float = 0.1
    ttft_slo_s: float = 0.5
    tpot_slo_s: float = 0.05

    def __post_init__(self) -> None:
        if self.num_gpus < 2:
            raise ValueError(f"num_gpus must be >= 2 (at least one prefill and one decode GPU), got {self.num_gpus}")
        if not 1 <= self.prefill_gpus < self.num_gpus:
            raise ValueError(f"prefill_gpus must be in [1, num_gpus - 1 = {self.num_gpus - 1}], "
                             f"got {self.prefill_gpus}")
        if not (self.link_bandwidth > 0 and not math.isnan(self.link_bandwidth)):
            raise ValueError(f"link_bandwidth must be > 0 bytes/s (inf allowed), got {self.link_bandwidth}")
        if not (math.isfinite(self.link_latency_s) and self.link_latency_s >= 0):
            raise ValueError(f"link_latency_s must be a finite number >= 0, got {self.link_latency_s}")
        if self.max_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_batched_tokens and max_num_seqs must be >= 1")
        if not (self.ttft_slo_s > 0 and self.tpot_slo_s > 0):
            raise ValueError("ttft_slo_s and tpot_slo_s must be > 0 seconds")

    def transfer_time(self, cost: CostModel, prompt_tokens: int) -> float:
        """Seconds to ship a prompt's KV: kv_bytes(prompt) / link_bandwidth + link_latency_s."""
        return kv_bytes(cost.shape, prompt_tokens, bits=cost.kv_bits) / self.link_bandwidth + self.link_latency_s


@dataclass(slots=True)
class _Seq:
    req: ServedRequest
    ready_s: float  # when it can be scheduled
    ctx: int = 0  # tokens in its KV
    left: int = 0  # tokens still to generate
    first_s: float = math.nan
    last_s: float = math.nan
    max_gap: float = 0.0
    finish_s: float = math.nan


def _run_gpu(seqs: Sequence[_Seq], cost: CostModel, cfg: PDConfig, prefill: bool, decode: bool) -> None:
    """Step one GPU through its sequences (sorted by ready_s), filling in token times."""
    capacity = cost.kv_capacity_tokens(cfg.reserve_fraction)
    pending, waiting, running = deque(seqs), deque(), []
    t, used = 0.0, 0
    while pending or waiting or running:
        while pending and pending[0].ready_s <= t:
            waiting.append(pending.popleft())
        batch, tokens = [], 0
        while waiting and len(running) + len(batch) < cfg.max_num_seqs:
            s = waiting[0]
            need = s.req.prompt_tokens + s.req.output_tokens
            new = s.req.prompt_tokens if prefill else 0
            if need > capacity:
                raise ValueError(f"request {s.req.index} needs {need} KV tokens but {cost.gpu.name} holds "
                                 f"{capacity} for {cost.shape.name}; shorten the prompts or outputs")
            if used + need > capacity or (batch and tokens + new > cfg.max_batched_tokens):
                break
            batch.append(waiting.popleft())
            tokens += new
            used += need if decode else 0
        if prefill and batch:
            t += cost.step_time(tokens, sum(prefill_pairs(s.req.prompt_tokens, 0) for s in batch), 0)
            for s in batch:
                s.first_s = s.last_s = t
                s.ctx, s.left = s.req.prompt_tokens + 1, s.req.output_tokens - 1
                if decode and s.left > 0:
                    running.append(s)
                else:
                    used -= s.req.prompt_tokens + s.req.output_tokens if decode else 0
                    s.finish_s = t
        elif running or batch:
            running += batch
            ctx = sum(s.ctx for s in running)
            t += cost.step_time(len(running), ctx, ctx)
            for s in running:
                s.ctx, s.left, s.max_gap, s.last_s = s.ctx + 1, s.left - 1, max(s.max_gap, t - s.last_s), t
                if s.left == 0:
                    s.finish_s = t
                    used -= s.req.prompt_tokens + s.req.output_tokens
            running = [s for s in running if s.left > 0]
        elif pending:
            t = pending[0].ready_s


def _colocated(reqs: Sequence[ServedRequest], cost: CostModel, cfg: PDConfig) -> list[_Seq]:
    seqs = [_Seq(r, r.arrival_s) for r in reqs]
    for g in range(cfg.num_gpus):
        _run_gpu(seqs[g::cfg.num_gpus], cost, cfg, prefill=True, decode=True)
    return seqs


def _disaggregated(reqs: Sequence[ServedRequest], cost: CostModel, cfg: PDConfig) -> tuple[list[_Seq], list[float]]:
    seqs = [_Seq(r, r.arrival_s) for r in reqs]
    for g in range(cfg.prefill_gpus):
        _run_gpu(seqs[g::cfg.prefill_gpus], cost, cfg, prefill=True, decode=False)
    transfer = [0.0] * len(seqs)
    for g in range(cfg.prefill_gpus):  # one link per prefill GPU, transfers in prefill-finish order
        link_free = 0.0
        for s in sorted(seqs[g::cfg.prefill_gpus], key=lambda s: s.first_s):
            start = max(s.first_s, link_free)
            link_free = start + cfg.transfer_time(cost, s.req.prompt_tokens)
            transfer[s.req.index] = link_free - s.first_s
    decoders = [_Seq(s.req, s.first_s + transfer[s.req.index]) for s in seqs if s.req.output_tokens > 1]
    for d in decoders:
        d.ctx, d.left = d.req.prompt_tokens + 1, d.req.output_tokens - 1
    n_dec = cfg.num_gpus - cfg.prefill_gpus
    decoders.sort(key=lambda d: d.ready_s)
    for g in range(n_dec):
        part = decoders[g::n_dec]
        for d in part:
            d.last_s = seqs[d.req.index].first_s
        _run_gpu(part, cost, cfg, prefill=False, decode=True)
    for d in decoders:
        s = seqs[d.req.index]
        s.finish_s, s.max_gap = d.finish_s, d.max_gap
    return seqs, transfer


def _rows(setup: str, seqs: Sequence[_Seq], transfer: Sequence[float] | None) -> list[dict]:
    rows = []
    for s in seqs:
        out = s.req.output_tokens
        rows.append({"setup": setup, "request": s.req.index, "arrival_s": s.req.arrival_s,
                     "prompt_tokens": s.req.prompt_tokens, "output_tokens": out,
                     "ttft_s": s.first_s - s.req.arrival_s,
                     "tpot_s": (s.finish_s - s.first_s) / (out - 1) if out > 1 else 0.0,
                     "max_itl_s": s.max_gap, "kv_transfer_s": transfer[s.req.index] if transfer else 0.0,
                     "finish_s": s.finish_s})
    return rows


def compare_pd(requests: Sequence[ServedRequest], cost: CostModel, config: PDConfig | None = None) -> pd.DataFrame:
    """Per-request TTFT, TPOT, largest inter-token gap and KV transfer time, colocated vs disaggregated.

    The same requests run on ``num_gpus`` colocated engines (round robin) and on ``prefill_gpus`` prefill +
    the rest decode GPUs. Any request with index, arrival_s, prompt_tokens and output_tokens works, so a
    ``kvcore.sched`` workload's requests can be passed too. Returns a long DataFrame with a ``setup`` column.
    """
    cfg = config or PDConfig()
    if not requests:
        raise ValueError("the workload has no requests")
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    if [r.index for r in reqs] != list(range(len(reqs))):
        raise ValueError("request indices must be 0..n-1 in arrival order")
    n_dec = cfg.num_gpus - cfg.prefill_gpus
    colo = _rows(f"colocated ({cfg.num_gpus} GPUs)", _colocated(reqs, cost, cfg), None)
    seqs, transfer = _disaggregated(reqs, cost, cfg)
    return pd.DataFrame(colo + _rows(f"disaggregated ({cfg.prefill_gpus}P + {n_dec}D)", seqs, transfer))


def pd_summary(per_request: pd.DataFrame, config: PDConfig | None = None) -> pd.DataFrame:
    """p50/p90 TTFT and TPOT (ms), p90 largest inter-token gap, throughput and SLO attainment per setup."""
    cfg = config or PDConfig()
    rows = []
    for setup, g in per_request.groupby("setup", sort=False):
        ok = (g["ttft_s"] <= cfg.ttft_slo_s) & (g["tpot_s"] <= cfg.tpot_slo_s)
        span = g["finish_s"].max() - g["arrival_s"].min()
        rows.append({"setup": setup,
                     "ttft_p50_ms": g["ttft_s"].quantile(0.5) * 1e3, "ttft_p90_ms": g["ttft_s"].quantile(0.9) * 1e3,
                     "tpot_p50_ms": g["tpot_s"].quantile(0.5) * 1e3, "tpot_p90_ms": g["tpot_s"].quantile(0.9) * 1e3,
                     "max_itl_p90_ms": g["max_itl_s"].quantile(0.9) * 1e3,
                     "kv_transfer_p50_ms": g["kv_transfer_s"].quantile(0.5) * 1e3,
                     "output_tok_per_s": g["output_tokens"].sum() / span if span > 0 else math.nan,
                     "slo_attainment": ok.mean()})
    return pd.DataFrame(rows)
