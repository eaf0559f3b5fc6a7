"""Run one eviction policy on a real causal LM and measure it against the full-cache reference.

Two modes, both through transformers' Cache API (:class:`kvcore.models.cache.LabCache`) and the one
eviction loop (:class:`~kvcore.eviction.hook.EvictionHook`):

* ``"decode"``: decode-time eviction, the method of StreamingLLM's ``eval_long_ppl.py`` (Xiao et al.
  2023) and of H2O (Zhang et al. 2023). The text is fed one token per step; after each forward the
  hook lets the policy observe the step's attention and prunes every layer back to the budget, so query
  ``t`` reads the ``budget`` kept tokens plus itself. The first ``budget`` tokens go in one forward
  (nothing is evicted before the cache is full; attention-based accumulators start from that prefill).
* ``"prefill"``: prompt compression once, like kvpress: the first ``prompt_tokens`` are fed at once, the
  hook keeps ``budget`` of them, and the rest of the text is scored against that compressed prompt.

Positions after eviction: ``"original"`` gives each new token its true position (works with every
model); ``"rerotate"`` re-rotates kept keys to compact positions 0..budget-1 and feeds new tokens at
the cache length, as StreamingLLM does (RoPE models only; others raise ValueError).

What is measured (:mod:`kvcore.eviction.metrics`): perplexity of the scored tokens, attention mass
retained and output error per layer, hit/miss counters, sinks retained, a visibility map; *evictions*
count KV entries (token x layer x KV head) removed from storage; the wall time of every one-token decode
step (forward plus the policy's work, metric bookkeeping excluded) and the KV bytes the cache's real
tensors hold at the end. Measured steps are the queries fed after the budget was reached (decode) or
after the prompt (prefill). Given ``full_prefill``, the full cache decodes token by token too after its
first tokens, so its per-step time is the same quantity as every policy's (the sweep does this).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from kvcore.device import torch_threads
from kvcore.eviction.base import Budget, EvictionPolicy, resolve_budget
from kvcore.eviction.hook import EvictionHook, eviction_plan
from kvcore.eviction.masks import decode_mask, prefill_mask
from kvcore.eviction.metrics import AttentionMeter
from kvcore.eviction.reference import Reference
from kvcore.models.cache import POSITION_MODES, LabCache
from kvcore.models.capture import attention_outputs
from kvcore.models.plan import FULL, run_step
from kvcore.models.runtime import attention_implementation
from kvcore.noise import load_average

MODES = ("decode", "prefill")
StepHook = Callable[[int, LabCache], None]


@dataclass(slots=True)
class RunResult:
    """One policy at one budget on one text (see the module docstring for each measurement).

    budget: tokens kept (resolved). nll: ``[n]`` nats of the scored tokens (targets ``scored_from`` ..
    T-1). mass, output_error: ``[L]`` per-layer means over measured steps. visible: ``[T-1, T-1]`` uint8,
    row t = share (x255) of (layer, KV head) pairs in which query t could read each token. step_ms: wall
    time (ms) of each one-token decode step (decode mode; empty in prefill mode). load_1min: the machine's
    1-minute load average when the run ended (what else was running).
    """

    policy: str
    label: str
    budget: int
    positions: str
    mode: str
    nll: torch.Tensor
    scored_from: int
    mass: torch.Tensor
    output_error: torch.Tensor
    lookups: int
    hits: int
    evictions: int
    sinks_retained: int
    sinks_total: int
    seconds: float
    kv_bytes_held: int
    visible: np.ndarray
    step_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    load_1min: float = float("nan")


def _check(positions: str, mode: str) -> None:
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _result(policy: EvictionPolicy, budget: int, positions: str, mode: str, meter: AttentionMeter,
            last_read: torch.Tensor | None, **measured) -> RunResult:
    """A :class:`RunResult` from the meter's per-layer means and counters plus the run's own measurements."""
    mass, error = meter.means()
    kept, total = meter.sinks_retained(last_read)
    return RunResult(policy=policy.name, label=policy.label(), budget=budget, positions=positions, mode=mode,
                     mass=mass, output_error=error, lookups=meter.lookups, hits=meter.hits, sinks_retained=kept,
                     sinks_total=total, visible=meter.visible, load_1min=load_average(), **measured)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[0].float(), targets, reduction="none")


@torch.inference_mode()
def run_decode(model, ref: Reference, policy: EvictionPolicy, budget: Budget, positions: str = "original",
               hit_ratio: float = 1.0, threads: int | None = 1, on_step: StepHook | None = None,
               budget_rule: str = "round", full_prefill: int | None = None) -> RunResult:
    """Decode-time eviction: feed the reference's text one token per step, holding the cache at ``budget``.

    budget: tokens (int) or a ratio (float) of the fed tokens. positions: ``"original"`` or
    ``"rerotate"``. hit_ratio: the lookup threshold, as a multiple of the uniform share. threads: CPU
    threads during the run (None: leave as is). on_step: called as ``on_step(t, cache)`` after step t's
    eviction (tests use it to check the cache size). budget_rule: how a share becomes a count (``BUDGET_RULES``).
    full_prefill: for a policy that keeps everything, the tokens of its first forward (None: the whole text
    in one forward); the rest are decoded one per step, timed like every other policy's steps.
    """
    _check(positions, "decode")
    n_in, ids = ref.num_fed, ref.ids
    k = n_in if policy.keeps_all else resolve_budget(budget, n_in, budget_rule)
    meter = AttentionMeter(ref, hit_ratio)
    plan = eviction_plan(policy, k, positions)
    hook: EvictionHook = plan.hook
    if policy.keeps_all and full_prefill is not None:  # decode one by one, as each policy does past its budget
        if not 1 <= full_prefill <= n_in:
            raise ValueError(f"full_prefill must be in 1..{n_in}, got {full_prefill}")
        k = full_prefill
    nlls, seconds, read, step_ms = [], 0.0, None, []
    with attention_implementation(model, "eager"), attention_outputs(model) as outputs, torch_threads(threads):
        cache = plan.new_cache(model)
        start = time.perf_counter()
        logits = run_step(model, cache, ids[:, :k], plan)
        seconds += time.perf_counter() - start
        nlls.append(_nll(logits, ids[0, 1:k + 1]))
        for t in range(k, n_in):
            stored = torch.stack([s.positions[0] for s in hook.states])  # [L, Hkv, m]: the cache query t reads
            start = time.perf_counter()
            masked = hook.readable(cache) if policy.stores_all else None  # [Hkv, k]
            mask = None if masked is None else decode_mask(masked, t + 1, ref.groups, cache.layers[0].keys.dtype)
            logits = run_step(model, cache, ids[:, t:t + 1], plan, attention_mask=mask)
            step_ms.append((time.perf_counter() - start) * 1e3)
            seconds += step_ms[-1] / 1e3
            read = stored if masked is None else masked.expand(ref.num_layers, -1, -1)
            read = torch.cat([read, torch.full((*read.shape[:2], 1), t, device=read.device)], dim=-1)
            meter.step(t, read, torch.stack([o[0, -1] for o in outputs]))
            nlls.append(_nll(logits, ids[0, t + 1:t + 2]))
            if on_step is not None:
                on_step(t, cache)
        held = cache.nbytes
    return _result(policy, hook.budget, positions, "decode", meter, read, nll=torch.cat(nlls).cpu(), scored_from=1,
                   evictions=hook.evicted, seconds=seconds, kv_bytes_held=held, step_ms=np.asarray(step_ms))


@torch.inference_mode()
def run_prefill(model, ref: Reference, policy: EvictionPolicy, budget: Budget, positions: str = "original",
                prompt_tokens: int | None = None, hit_ratio: float = 1.0, threads: int | None = 1,
                budget_rule: str = "round") -> RunResult:
    """Prompt compression once (kvpress): keep ``budget`` of the first ``prompt_tokens``, score the rest.

    budget: tokens (int) or a ratio (float) of the prompt. prompt_tokens: default half the fed tokens.
    The continuation is fed in one forward on top of the compressed prompt (it is not evicted).
    threads: CPU threads during the run (None: leave as is). budget_rule: how a share becomes a count.
    """
    _check(positions, "prefill")
    n_in, ids = ref.num_fed, ref.ids
    n_p = n_in // 2 if prompt_tokens is None else prompt_tokens
    if not 1 <= n_p < n_in:
        raise ValueError(f"prompt_tokens must be in [1, {n_in - 1}] for this text, got {n_p}")
    k = resolve_budget(budget, n_p, budget_rule)
    meter = AttentionMeter(ref, hit_ratio)
    plan = eviction_plan(policy, k, positions)
    hook: EvictionHook = plan.hook
    with attention_implementation(model, "eager"), attention_outputs(model) as outputs, torch_threads(threads):
        cache = plan.new_cache(model)
        start = time.perf_counter()
        run_step(model, cache, ids[:, :n_p], plan)  # the hook evicts the prompt down to k once
        kept = torch.stack([s.positions[0] for s in hook.states] if hook.evicted else
                           [idx[0] for idx in hook.choose(cache)])  # [L, Hkv, k]: original positions kept
        mask = (prefill_mask(kept[0], n_p, n_in, ref.groups, cache.layers[0].keys.dtype)
                if policy.stores_all else None)
        logits = run_step(model, cache, ids[:, n_p:n_in], FULL, attention_mask=mask)
        seconds = time.perf_counter() - start
        continuation = torch.stack([o[0] for o in outputs])  # [L, n_in - n_p, Hq*D]
        held = cache.nbytes
    for i, t in enumerate(range(n_p, n_in)):
        read = torch.cat([kept, torch.arange(n_p, t + 1, device=kept.device).expand(*kept.shape[:2], -1)], dim=-1)
        meter.step(t, read, continuation[:, i])
    return _result(policy, k, positions, "prefill", meter, kept, nll=_nll(logits, ids[0, n_p + 1:n_in + 1]).cpu(),
                   scored_from=n_p + 1, evictions=hook.evicted, seconds=seconds, kv_bytes_held=held)


def run_policy(model, ref: Reference, policy: EvictionPolicy, budget: Budget, positions: str = "original",
               mode: str = "decode", prompt_tokens: int | None = None, hit_ratio: float = 1.0,
               threads: int | None = 1, budget_rule: str = "round") -> RunResult:
    """:func:`run_decode` or :func:`run_prefill` by ``mode``."""
    _check(positions, mode)
    if mode == "prefill":
        return run_prefill(model, ref, policy, budget, positions, prompt_tokens, hit_ratio, threads, budget_rule)
    return run_decode(model, ref, policy, budget, positions, hit_ratio, threads, budget_rule=budget_rule)
