"""Decode-time eviction evaluated in one forward pass, layer by layer: the token-by-token run's numbers, sooner.

:func:`~kvcore.eviction.runner.run_decode` feeds a text one token per step and, after each step, lets the
policy evict every layer back to the budget (StreamingLLM, Xiao et al. 2023; H2O, Zhang et al. 2023). What a
layer keeps depends only on that layer's own keys, values and attention, and those depend on the layers
below. So the same run can be replayed inside a single forward over the whole text: a registered attention
function receives each layer's queries, keys and values for every token at once (the layers below already
replayed), and steps through the tokens with the policy, doing exactly what the cache and the hook do
after each real step (append, eager attention over what is held, observe, evict, re-rotate), but without
the rest of the model for every token. Everything outside attention (projections, MLPs, norms, logits)
runs once over the whole text instead of once per token: a sweep on the bundled model runs several times
faster. ``tests/test_eviction_layerwise.py`` checks that every policy, both position modes and both
budget kinds give the token-by-token run's numbers.

A positional policy (StreamingLLM, a sliding window) in original positions keeps the same tokens in every layer
whatever the model computes, so its schedule is worked out on positions alone first and every layer attends once
through a mask (the mask-based evaluation of attention-only policies, applied to evicting ones).

The full cache is read off the reference (:func:`full_from_reference`), as :func:`run_decode` decodes it for a
sweep (``full_prefill=1``: every query after the first measured). Not replayed: an attention-only policy's mask
(it reads layer 0's choice in every layer) and Knorm (:data:`ROUNDING_DECIDES`), which still run through
:func:`run_decode`, and step timings, which :func:`time_decode_steps` measures on real steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from kvcore.device import torch_threads
from kvcore.eviction.base import Budget, EvictionPolicy, EvictionState, gather_kv, group_attention, resolve_budget
from kvcore.eviction.hook import EvictionHook, eviction_plan
from kvcore.eviction.masks import additive_mask, decode_mask
from kvcore.eviction.metrics import AttentionMeter
from kvcore.eviction.reference import Reference
from kvcore.eviction.runner import RunResult, _check, _nll, _result
from kvcore.models.capture import attention_outputs
from kvcore.models.plan import run_step
from kvcore.models.rope import rope_inv_freq, rotate
from kvcore.models.runtime import attention_implementation, num_kv_heads
from kvcore.tensors import tensor_bytes

IMPLEMENTATION = "kvlab_layerwise_eviction"
_ACTIVE = threading.local()  # the replay of the forward running in this thread


# Policies whose choice rests on near-ties that rounding decides: Knorm ranks key norms, and a token's keys at
# two positions differ only by a rotation (equal norms up to rounding), so one forward over the whole text
# and one per token can keep different tokens. They run token by token.
ROUNDING_DECIDES = frozenset({"knorm"})


def replays(policy: EvictionPolicy, mode: str = "decode") -> bool:
    """Whether :func:`run_decode_layerwise` replays ``policy``'s decode run exactly: the full cache (as decoded
    after its first token) and every evicting policy whose choices rounding does not decide."""
    return mode == "decode" and not policy.stores_all and policy.name not in ROUNDING_DECIDES


@dataclass(slots=True)
class LayerReplay:
    """One layer's cache through the run: what it holds, the policy's state, and what each step read.

    keys / values: ``[1, Hkv, m, D]`` held entries in cache order; slots: their cache positions when
    re-rotating (``[1, Hkv, m]``). read: per measured step, the original positions the query read
    ``[Hkv, m + 1]``. evicted: entries removed so far.
    """

    state: EvictionState
    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor | None = None
    read: list[torch.Tensor] = field(default_factory=list)
    evicted: int = 0


@dataclass(slots=True)
class Replay:
    """The run being replayed: policy, budget, where decoding starts, positions, and every layer's replay.

    schedule: for a positional policy in original positions, what it keeps is known before the forward
    (:func:`positional_schedule`), so each layer attends through one mask instead of stepping.
    """

    policy: EvictionPolicy
    budget: int
    first: int  # tokens of the first forward (the rest are decode steps)
    inv_freq: torch.Tensor | None  # set when kept keys are re-rotated (StreamingLLM positions)
    layers: dict[int, LayerReplay] = field(default_factory=dict)
    schedule: PositionalSchedule | None = None
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # query groups -> additive mask [1, Hq, N, N]

    def evict(self, layer: LayerReplay) -> None:
        """What :meth:`EvictionHook.evict` and :meth:`LabCache.keep` do to one layer."""
        idx = self.policy.select(layer.state, layer.keys, layer.values, self.budget)  # [1, Hkv, k]
        layer.evicted += (layer.state.length - idx.shape[-1]) * idx.shape[1] * idx.shape[0]
        layer.keys, layer.values = gather_kv(layer.keys, idx), gather_kv(layer.values, idx)
        if layer.slots is not None:
            kept = layer.slots.gather(-1, idx)  # [1, Hkv, k]
            compact = torch.arange(idx.shape[-1], device=kept.device).expand_as(kept)
            layer.keys = rotate(layer.keys, compact - kept, self.inv_freq)
            layer.slots = compact.clone()
        layer.state.keep(idx)

    def observe(self, layer: LayerReplay, num_new: int, probs: torch.Tensor) -> None:
        """What :meth:`EvictionHook.observe` does to one layer after a forward of ``num_new`` tokens."""
        layer.state.append(num_new)
        if self.policy.needs_attention:
            self.policy.observe(layer.state, group_attention(probs, layer.state.positions.shape[1]))
        if layer.state.length > self.budget:
            self.evict(layer)


@dataclass(slots=True)
class PositionalSchedule:
    """What a positional policy lets every decode query read, the same in every layer and KV head.

    reads: per decode step, the positions ``[Hkv, budget + 1]`` its query reads (the kept ones and itself).
    kept: positions ``[1, Hkv, budget]`` held after the last step. evicted: entries removed per layer.
    """

    reads: list[torch.Tensor]
    kept: torch.Tensor
    evicted: int


def positional_schedule(policy: EvictionPolicy, budget: int, num_tokens: int, num_kv_heads: int) -> PositionalSchedule:
    """Run the hook's bookkeeping on positions alone (no keys, values or attention: a positional policy reads none)
    for ``num_tokens`` tokens fed one per step after the first ``budget``."""
    if not policy.positional:
        raise ValueError(f"{policy.label()} reads more than positions; it is replayed step by step")
    state = EvictionState.empty(1, num_kv_heads)
    state.append(budget)
    reads, evicted = [], 0
    for t in range(budget, num_tokens):
        reads.append(torch.cat([state.positions[0], torch.full((num_kv_heads, 1), t)], dim=-1))
        state.append(1)
        if state.length > budget:
            blank = torch.zeros(1, num_kv_heads, state.length, 1)  # what select reads of keys: their count
            idx = policy.select(state, blank, blank, budget)
            evicted += (state.length - idx.shape[-1]) * num_kv_heads
            state.keep(idx)
    return PositionalSchedule(reads, state.positions, evicted)


def _scheduled_mask(run: Replay, n: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask ``[1, Hq, n, n]`` of a scheduled run: causal up to the budget, then each query's reads."""
    if groups not in run.masks:
        reads = torch.stack(run.schedule.reads)  # [S, Hkv, k + 1]
        Hkv = reads.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool).tril().expand(Hkv, n, n).clone()  # [Hkv, n, n]
        decode = torch.zeros(Hkv, len(reads), n, dtype=torch.bool)
        decode.scatter_(2, reads.transpose(0, 1), True)
        allowed[:, run.first:] = decode
        run.masks[groups] = additive_mask(allowed, groups, dtype)
    return run.masks[groups]


def _replay_scheduled(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                      run: Replay) -> torch.Tensor:
    """One layer of a scheduled run: eager attention through the run's mask; the layer's cache as the hook leaves it."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # [1, Hq, N, D]
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling + _scheduled_mask(run, query.shape[2], groups,
                                                                                 query.dtype)
    out = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), v)  # [1, Hq, N, D]
    kept = run.schedule.kept
    state = EvictionState(kept.clone(), query.shape[2], module.layer_idx)
    run.layers[module.layer_idx] = LayerReplay(state, gather_kv(key, kept), gather_kv(value, kept), None,
                                               run.schedule.reads, run.schedule.evicted)
    return out


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, groups: int, scaling: float,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention: queries ``[1, Hq, n, D]`` over ``[1, Hkv, m, D]`` -> (out, probs)."""
    k = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys  # [1, Hq, m, D]
    v = values.repeat_interleave(groups, dim=1) if groups > 1 else values
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling  # [1, Hq, n, m]
    if causal:
        n, m = scores.shape[-2:]
        future = torch.ones(n, m, dtype=torch.bool, device=scores.device).triu(m - n + 1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, v), probs  # [1, Hq, n, D], [1, Hq, n, m]


def _replay_layer(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                  scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """The registered attention function: one layer of the active :class:`Replay` over every token."""
    run: Replay = _ACTIVE.replay
    _, Hq, N, D = query.shape
    groups = Hq // key.shape[1]
    scaling = D ** -0.5 if scaling is None else scaling
    if run.schedule is not None:
        return _replay_scheduled(module, query, key, value, scaling, run).transpose(1, 2).contiguous(), None
    k0 = run.first
    out = torch.empty_like(query)  # [1, Hq, N, D]
    out[:, :, :k0], probs = _attend(query[:, :, :k0], key[:, :, :k0], value[:, :, :k0], groups, scaling, True)
    Hkv, device = key.shape[1], key.device
    slots = None if run.inv_freq is None else torch.arange(k0, device=device).expand(1, Hkv, k0)
    layer = LayerReplay(EvictionState.empty(1, Hkv, device, module.layer_idx), key[:, :, :k0], value[:, :, :k0],
                        slots)
    run.observe(layer, k0, probs)
    for t in range(k0, N):  # one decode step: the cache appends token t, its query reads, the hook evicts
        layer.read.append(torch.cat([layer.state.positions[0], torch.full((Hkv, 1), t, device=device)], dim=-1))
        layer.keys = torch.cat([layer.keys, key[:, :, t:t + 1]], dim=2)
        layer.values = torch.cat([layer.values, value[:, :, t:t + 1]], dim=2)
        if layer.slots is not None:
            layer.slots = torch.cat([layer.slots, torch.full((1, Hkv, 1), layer.slots.shape[-1], device=device)], -1)
        out[:, :, t:t + 1], probs = _attend(query[:, :, t:t + 1], layer.keys, layer.values, groups, scaling, False)
        run.observe(layer, 1, probs)
    run.layers[module.layer_idx] = layer
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, _replay_layer)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


@contextmanager
def replaying(model, replay: Replay) -> Iterator[Replay]:
    """Run ``model``'s forwards in this block through ``replay`` (this thread only)."""
    _ACTIVE.replay = replay
    try:
        with attention_implementation(model, IMPLEMENTATION):
            yield replay
    finally:
        _ACTIVE.replay = None


@torch.inference_mode()
def run_decode_layerwise(model, ref: Reference, policy: EvictionPolicy, budget: Budget, positions: str = "original",
                         hit_ratio: float = 1.0, threads: int | None = 1, budget_rule: str = "round") -> RunResult:
    """:func:`~kvcore.eviction.runner.run_decode`'s result for an evicting policy, from one forward pass.

    Same arguments and the same measurements (perplexity, attention mass and output error per layer,
    counters, visibility map, evictions, bytes held) except ``step_ms``, which stays empty: no decode step
    runs here (:func:`time_decode_steps` times real ones). The full cache gives ``run_decode(...,
    full_prefill=1)``'s. Raises ValueError for a policy it cannot replay (:func:`replays`).
    """
    _check(positions, "decode")
    if not replays(policy):
        raise ValueError(f"{policy.label()} is not replayed layer by layer; use run_decode")
    if policy.keeps_all:
        return full_from_reference(ref, policy, positions, hit_ratio)
    n_in, ids = ref.num_fed, ref.ids
    k = n_in if policy.keeps_all else resolve_budget(budget, n_in, budget_rule)
    first = 1 if policy.keeps_all else k
    inv_freq = rope_inv_freq(model) if positions == "rerotate" else None
    replay = Replay(policy, k, first, inv_freq)
    if policy.positional and positions == "original" and k < n_in:
        replay.schedule = positional_schedule(policy, k, n_in, ref.num_kv_heads)
    position_ids = torch.arange(n_in, device=ids.device)
    if positions == "rerotate":  # each new token comes at the cache length, which stays at the budget
        position_ids = position_ids.clamp(max=k)
    with attention_outputs(model) as outputs, torch_threads(threads), replaying(model, replay):
        start = time.perf_counter()
        logits = model(input_ids=ids[:, :n_in], position_ids=position_ids[None], use_cache=False).logits
        seconds = time.perf_counter() - start
    meter = AttentionMeter(ref, hit_ratio)
    layers = [replay.layers[i] for i in range(len(replay.layers))]
    reads = [torch.stack([layer.read[i] for layer in layers]) for i in range(n_in - first)]  # each [L, Hkv, m]
    made = torch.stack(outputs)[:, 0].transpose(0, 1)  # [T, L, Hq*D]: every query's attention outputs
    start = first
    while start < n_in:  # runs of queries that read as many entries, measured at once (all but the full cache's)
        width, stop = reads[start - first].shape[-1], start + 1
        while stop < n_in and reads[stop - first].shape[-1] == width:
            stop += 1
        meter.step_many(range(start, stop), torch.stack(reads[start - first:stop - first]), made[start:stop])
        start = stop
    read = reads[-1] if reads else None
    held = sum(tensor_bytes(layer.keys, layer.values) for layer in layers)
    return _result(policy, k, positions, "decode", meter, read, nll=_nll(logits, ids[0, 1:n_in + 1]).cpu(),
                   scored_from=1, evictions=sum(layer.evicted for layer in layers), seconds=seconds,
                   kv_bytes_held=held)


def full_from_reference(ref: Reference, policy: EvictionPolicy, positions: str = "original",
                        hit_ratio: float = 1.0) -> RunResult:
    """The full cache's decode run read off the reference, with no forward: every query after the first reads every
    earlier token, so its perplexity, attention outputs and bytes are the reference's own (what
    ``run_decode(..., full_prefill=1)`` measures, up to float rounding)."""
    n_in = ref.num_fed
    meter = AttentionMeter(ref, hit_ratio)
    meter.step_everything(range(1, n_in))
    every = torch.arange(n_in).expand(ref.num_layers, ref.num_kv_heads, n_in)  # [L, Hkv, T]: the last query's read
    return _result(policy, n_in, positions, "decode", meter, every, nll=ref.nll.clone(), scored_from=1, evictions=0,
                   seconds=0.0, kv_bytes_held=ref.kv_bytes)


@torch.inference_mode()
def time_decode_steps(model, ids: torch.Tensor, policy: EvictionPolicy, budget: Budget, positions: str = "original",
                      steps: int = 16, threads: int | None = 1, budget_rule: str = "round") -> np.ndarray:
    """Wall time (ms) of ``steps + 1`` real one-token decode steps, the policy evicting after each (the first is a
    warm-up the tables leave out).

    An evicting policy is timed from the step its cache first reaches the budget: one forward of the first
    ``budget`` tokens, then the steps, each a forward over the held entries plus the policy's own work, as every
    step of its decode run from there on (a step costs the same wherever in the text it falls: the cache holds the
    budget). The full cache and an attention-only window, whose caches hold every token, are timed on the text's
    last steps, after one forward of the text before them. ids: ``[1, T]`` the text's tokens, as the reference
    fed them (no reference pass is needed: a step's time depends on the tokens and the cache, not on its outputs).
    """
    _check(positions, "decode")
    n_in = ids.shape[1] - 1
    groups = model.config.num_attention_heads // num_kv_heads(model)
    timed = max(1, min(steps + 1, n_in - 1))
    k = n_in if policy.keeps_all else resolve_budget(budget, n_in, budget_rule)
    holds_all = policy.keeps_all or policy.stores_all
    start = k if not holds_all and k + timed <= n_in else n_in - timed
    plan = eviction_plan(policy, k, positions)
    hook: EvictionHook = plan.hook
    step_ms = []
    with attention_implementation(model, "eager"), torch_threads(threads):
        cache = plan.new_cache(model)
        run_step(model, cache, ids[:, :start], plan)
        for t in range(start, start + timed):
            begin = time.perf_counter()
            masked = hook.readable(cache) if policy.stores_all else None
            mask = None if masked is None else decode_mask(masked, t + 1, groups, cache.layers[0].keys.dtype)
            run_step(model, cache, ids[:, t:t + 1], plan, attention_mask=mask)
            step_ms.append((time.perf_counter() - begin) * 1e3)
    return np.asarray(step_ms)
