"""Run one eviction policy on a real causal LM and measure it against the full cache.

Two modes, both through transformers' Cache API (:class:`kvcore.models.cache.LabCache`):

* ``"decode"``: decode-time eviction, the method of StreamingLLM's ``eval_long_ppl.py`` (Xiao et al.
  2023) and of H2O (Zhang et al. 2023). The text is fed one token per step; after each forward the
  policy observes the step's attention and every layer is pruned back to the budget, so query ``t``
  reads the ``budget`` kept tokens plus itself. The first ``budget`` tokens go in one forward (nothing
  is evicted before the cache is full; attention-based accumulators start from that prefill's attention).
* ``"prefill"``: prompt compression once, like kvpress: the first ``prompt_tokens`` are fed at once, the
  policy keeps ``budget`` of them, and the rest of the text is scored against that compressed prompt.

Positions after eviction: ``"original"`` gives each new token its true position (works with every
model); ``"rerotate"`` re-rotates kept keys to compact positions 0..budget-1 and feeds new tokens at
the cache length, as StreamingLLM does (RoPE models only; others raise ValueError).

Measured against :class:`Reference` (the same tokens through the full cache, one forward):

* perplexity of the scored tokens;
* attention mass retained, per layer: the share of the full-cache attention of query ``t`` (averaged over
  query heads and measured steps) that falls on tokens query ``t`` can still read;
* attention-output error, per layer: ``||o - o_full|| / ||o_full||`` of the attention output (input of
  the output projection), averaged over measured steps; it includes drift from earlier layers and steps;
* SinkVis-style counters. A *lookup* is a (measured step, layer, query head, key) where the full cache
  gives the key at least ``hit_ratio`` times the uniform share ``1 / (t + 1)``; a *hit* is a lookup
  whose key the query can still read, a *miss* one whose key was evicted (or masked). *Evictions* count
  KV entries (token x layer x KV head) removed from storage. *Sinks retained* counts (sink token, layer,
  KV head) entries still readable at the last step; a *sink* is a token that, in at least one layer,
  queries ``min_query`` or more positions later give (on average over them and the heads)
  ``sink_ratio`` times the uniform share or more (:func:`far_attention_ratio`; thresholds from
  :class:`kvcore.models.attention.AttentionPatterns`);
* tokens/s of the forward passes plus the policy's work (metric bookkeeping excluded) and the KV bytes
  the cache's real tensors hold at the end.

Measured steps are the queries fed after the budget was reached (decode) or after the prompt (prefill).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from kvcore.eviction.base import Budget, EvictionPolicy, EvictionState, group_attention, resolve_budget
from kvcore.models.attention import AttentionPatterns, detect_patterns, eager_attention
from kvcore.models.cache import POSITION_MODES, LabCache, new_cache
from kvcore.models.capture import attention_modules

MODES = ("decode", "prefill")
StepHook = Callable[[int, LabCache], None]


@dataclass(slots=True)
class Reference:
    """The text through the full cache in one forward: what every policy is compared against.

    ids: ``[1, T]`` token ids; tokens 0..T-2 are fed, 1..T-1 are predicted. nll: ``[T - 1]`` nats.
    attn: ``[L, Hq, T-1, T-1]`` attention probabilities (row = query). outputs: ``[L, T-1, Hq*D]`` attention
    outputs before the output projection. kv_bytes: bytes of the full cache. patterns: one row per
    position: accumulated attention and heavy-hitter flag of the layer- and head-averaged attention
    (:func:`~kvcore.models.attention.detect_patterns`), the largest per-layer far-query ratio and the sink
    flag (:func:`far_attention_ratio`).
    """

    ids: torch.Tensor
    nll: torch.Tensor
    attn: torch.Tensor
    outputs: torch.Tensor
    num_kv_heads: int
    kv_bytes: int
    seconds: float
    patterns: pd.DataFrame

    @property
    def num_fed(self) -> int:
        """Tokens fed to the model (T - 1)."""
        return self.ids.shape[1] - 1

    @property
    def sinks(self) -> list[int]:
        """Positions flagged as attention sinks."""
        return self.patterns.index[self.patterns["sink"]].tolist()


@dataclass(slots=True)
class RunResult:
    """One policy at one budget on one text (see the module docstring for each measurement).

    budget: tokens kept (resolved). nll: ``[n]`` nats of the scored tokens (targets ``scored_from`` ..
    T-1). mass, output_error: ``[L]`` per-layer means over measured steps. visible: ``[T-1, T-1]`` uint8,
    row t = share (x255) of (layer, KV head) pairs in which query t could read each token.
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


def num_kv_heads(model) -> int:
    """KV heads per layer of a transformers model (query heads when the config does not say)."""
    cfg = model.config.get_text_config(decoder=True)
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def text_ids(model, tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """Token ids ``[1, T]`` of ``text`` (special tokens as the tokenizer adds them), cut to ``max_tokens``."""
    if max_tokens < 4:
        raise ValueError(f"max_tokens must be >= 4, got {max_tokens}")
    from kvcore.models.perplexity import as_ids

    return as_ids(model, tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens], min_tokens=4)


@contextmanager
def _capture_outputs(model) -> Iterator[list[torch.Tensor | None]]:
    """Record each layer's attention output (the output projection's input) ``[1, n, Hq*D]`` per forward."""
    projections = [getattr(m, "o_proj", None) or getattr(m, "c_proj", None) for m in attention_modules(model)]
    if any(p is None for p in projections):
        raise ValueError("cannot find the attention output projection (o_proj / c_proj) of this model")
    captured: list[torch.Tensor | None] = [None] * len(projections)

    def hook(i: int):
        def record(module, args):
            captured[i] = args[0].detach().float()
        return record

    handles = [p.register_forward_pre_hook(hook(i)) for i, p in enumerate(projections)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Use ``n`` CPU threads inside the block (one-token steps are too small to gain from more)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _forward(model, cache: LabCache, ids: torch.Tensor, attentions: bool, mask: torch.Tensor | None = None):
    """Feed ``ids`` ``[1, n]`` at the cache's next positions; return (logits ``[n, V]``, attentions or None)."""
    position_ids = cache.next_position_ids(ids.shape[1], ids.device)  # [1, n]
    out = model(input_ids=ids, position_ids=position_ids, cache=cache, use_cache=True,
                output_attentions=attentions, attention_mask=mask)
    return out.logits[0], (out.attentions if attentions else None)


@torch.inference_mode()
def reference_pass(model, ids: torch.Tensor, patterns: AttentionPatterns | None = None,
                   threads: int | None = 1) -> Reference:
    """Feed tokens 0..T-2 through the full cache in one forward (eager attention) and record everything.

    ids: ``[1, T]`` token ids. patterns: thresholds for sinks and heavy hitters. threads: CPU threads
    (None: leave as is).
    """
    fed = ids[:, :-1]  # [1, T-1]
    with eager_attention(model), _capture_outputs(model) as outputs, _threads(threads):
        cache = new_cache(model)
        start = time.perf_counter()
        logits, attn = _forward(model, cache, fed, attentions=True)
        seconds = time.perf_counter() - start
    attn_all = torch.stack([a[0].float() for a in attn])  # [L, Hq, T-1, T-1]
    patterns = patterns or AttentionPatterns()
    per_layer = attn_all.mean(dim=1).cpu()  # [L, T-1, T-1]
    table = detect_patterns(per_layer.mean(dim=0), patterns).drop(columns=["received_vs_uniform", "sink"])
    far = torch.stack([far_attention_ratio(a, patterns.min_query) for a in per_layer])  # [L, T-1]
    table["far_vs_uniform_max_layer"] = far.nan_to_num(0.0).amax(dim=0).tolist()
    table["sink"] = table["far_vs_uniform_max_layer"] >= patterns.sink_ratio
    return Reference(ids, F.cross_entropy(logits.float(), ids[0, 1:], reduction="none").cpu(), attn_all,
                     torch.stack([o[0] for o in outputs]), num_kv_heads(model), cache.nbytes(), seconds, table)


def far_attention_ratio(attn: torch.Tensor, min_distance: int) -> torch.Tensor:
    """Per key j of a causal ``[T, T]`` map: mean of ``attn[t, j] / (1 / (t + 1))`` over queries t >= j + min_distance.

    1.0 = the uniform share; NaN where fewer than ``min_distance`` queries are that far (too few to
    judge). Only distant queries count, so a key that
    is merely attended by its neighbours (local attention) is not mistaken for a sink (StreamingLLM's
    sinks draw attention from far-away queries whatever they say).
    """
    T = attn.shape[0]
    q = torch.arange(T)[:, None]
    far = (q - torch.arange(T)[None, :]) >= min_distance  # [T, T]
    counts = far.sum(dim=0)  # [T]
    ratio = (attn.float() * (q + 1) * far).sum(dim=0) / counts.clamp_min(1)
    return ratio.masked_fill(counts < max(1, min_distance), float("nan"))


class _Meter:
    """Accumulates the per-step measurements of one run against the reference."""

    def __init__(self, ref: Reference, hit_ratio: float) -> None:
        L, Hq, n, _ = ref.attn.shape
        self.ref, self.hit_ratio, self.groups = ref, hit_ratio, Hq // ref.num_kv_heads
        self.mass, self.error = torch.zeros(L), torch.zeros(L)
        self.steps = self.lookups = self.hits = 0
        self.visible = np.zeros((n, n), dtype=np.uint8)
        for t in range(n):  # before measurement every query reads its whole prefix
            self.visible[t, :t + 1] = 255

    def step(self, t: int, vis: torch.Tensor, outputs: torch.Tensor) -> None:
        """Query ``t`` could read positions ``vis`` ``[L, Hkv, m]``; its attention outputs are ``[L, Hq*D]``."""
        L, Hkv, _ = vis.shape
        rows = self.ref.attn[:, :, t, :t + 1].reshape(L, Hkv, self.groups, t + 1)  # [L, Hkv, G, t+1]
        idx = vis[:, :, None, :].expand(-1, -1, self.groups, -1)  # [L, Hkv, G, m]
        self.mass += rows.gather(-1, idx).sum(-1).mean(dim=(1, 2)).cpu()
        needed = rows >= self.hit_ratio / (t + 1)  # [L, Hkv, G, t+1]
        self.lookups += int(needed.sum())
        self.hits += int(needed.gather(-1, idx).sum())
        want = self.ref.outputs[:, t]  # [L, Hq*D]
        self.error += ((outputs - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)).cpu()
        share = torch.zeros(t + 1).index_add_(0, vis.flatten().cpu(), torch.ones(vis.numel())) / (L * Hkv)
        self.visible[t, :t + 1] = (share * 255).round().to(torch.uint8).numpy()
        self.steps += 1

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer mean mass retained and output error (1 and 0 when no step was measured)."""
        if not self.steps:
            return torch.ones_like(self.mass), torch.zeros_like(self.error)
        return self.mass / self.steps, self.error / self.steps

    def sinks_retained(self, vis: torch.Tensor | None) -> tuple[int, int]:
        """(sink entries readable at the last step, sink entries in all) over layers and KV heads."""
        sinks = torch.tensor(self.ref.sinks, dtype=torch.long)
        L, Hkv = self.ref.attn.shape[0], self.ref.num_kv_heads
        total = len(sinks) * L * Hkv
        if vis is None or not len(sinks):
            return total, total
        return int(torch.isin(vis.cpu(), sinks).sum()), total


def _window_mask(vis: torch.Tensor, length: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[1, Hq, 1, length]`` letting each query head read only KV-head positions ``vis`` ``[Hkv, m]``."""
    allowed = torch.zeros(vis.shape[0], length, dtype=torch.bool, device=vis.device)
    allowed.scatter_(1, vis, True)
    allowed[:, -1] = True  # the new token reads itself
    heads = allowed.repeat_interleave(groups, dim=0)  # [Hq, length]
    return torch.zeros(heads.shape, dtype=dtype, device=vis.device).masked_fill(
        ~heads, torch.finfo(dtype).min)[None, :, None, :]


def _check(policy: EvictionPolicy, positions: str, mode: str, hit_ratio: float) -> None:
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not hit_ratio > 0:
        raise ValueError(f"hit_ratio must be > 0 (a multiple of the uniform attention share), got {hit_ratio}")


def _readable(policy: EvictionPolicy, state: EvictionState, cache: LabCache, k: int) -> torch.Tensor:
    """Positions ``[Hkv, k]`` an attention-only policy lets the next query read (one mask serves every layer)."""
    layer = cache.layers[0]
    return state.positions[0].gather(-1, policy.select(state, layer.keys, layer.values, k)[0])


def _evict(policy: EvictionPolicy, states: list[EvictionState], cache: LabCache, k: int) -> int:
    """Prune every layer back to ``k`` entries (cache and policy state together); return entries removed."""
    removed = 0
    for layer, (state, stored) in enumerate(zip(states, cache.layers, strict=True)):
        idx = policy.select(state, stored.keys, stored.values, k)  # [1, Hkv, k]
        removed += (state.length - idx.shape[-1]) * idx.shape[1]
        cache.keep(layer, idx)
        state.keep(idx)
    return removed


def _observe(policy: EvictionPolicy, states: list[EvictionState], attn, n: int, Hkv: int) -> None:
    for layer, state in enumerate(states):
        state.append(n)
        if policy.needs_attention:
            policy.observe(state, group_attention(attn[layer], Hkv))


@torch.inference_mode()
def run_decode(model, ref: Reference, policy: EvictionPolicy, budget: Budget, positions: str = "original",
               hit_ratio: float = 1.0, threads: int | None = 1, on_step: StepHook | None = None) -> RunResult:
    """Decode-time eviction: feed the reference's text one token per step, holding the cache at ``budget``.

    budget: tokens (int) or a ratio (float) of the fed tokens. positions: ``"original"`` or
    ``"rerotate"``. hit_ratio: the lookup threshold, as a multiple of the uniform share. threads: CPU
    threads during the run (None: leave as is). on_step: called as ``on_step(t, cache)`` after step t's
    eviction (tests use it to check the cache size).
    """
    _check(policy, positions, "decode", hit_ratio)
    n_in, Hkv = ref.num_fed, ref.num_kv_heads
    groups = ref.attn.shape[1] // Hkv  # query heads per KV head
    k = n_in if policy.keeps_all else resolve_budget(budget, n_in)
    meter, evict = _Meter(ref, hit_ratio), not (policy.keeps_all or policy.stores_all)
    states = [EvictionState.empty(1, Hkv, ref.ids.device, layer) for layer in range(ref.attn.shape[0])]
    nlls, evictions, seconds, vis = [], 0, 0.0, None
    with eager_attention(model), _capture_outputs(model) as outputs, _threads(threads):
        cache = new_cache(model, positions=positions)
        start = time.perf_counter()
        logits, attn = _forward(model, cache, ref.ids[:, :k], policy.needs_attention)
        _observe(policy, states, attn, k, Hkv)
        seconds += time.perf_counter() - start
        nlls.append(F.cross_entropy(logits.float(), ref.ids[0, 1:k + 1], reduction="none"))
        for t in range(k, n_in):
            start = time.perf_counter()
            sel = _readable(policy, states[0], cache, k) if policy.stores_all else None  # [Hkv, k]
            mask = None if sel is None else _window_mask(sel, t + 1, groups, cache.layers[0].keys.dtype)
            logits, attn = _forward(model, cache, ref.ids[:, t:t + 1], policy.needs_attention, mask)
            _observe(policy, states, attn, 1, Hkv)
            vis = torch.stack([s.positions[0] for s in states])  # [L, Hkv, k+1]: what query t read
            if evict:
                evictions += _evict(policy, states, cache, k)
            seconds += time.perf_counter() - start
            if sel is not None:
                vis = torch.cat([sel, torch.full((Hkv, 1), t, device=sel.device)], dim=1).expand(len(states), -1, -1)
            meter.step(t, vis, torch.stack([o[0, -1] for o in outputs]))
            nlls.append(F.cross_entropy(logits.float(), ref.ids[0, t + 1:t + 2], reduction="none"))
            if on_step is not None:
                on_step(t, cache)
        held = cache.nbytes()
    mass, error = meter.means()
    kept, total = meter.sinks_retained(vis)
    return RunResult(policy.name, policy.label(), k, positions, "decode", torch.cat(nlls).cpu(), 1, mass, error,
                     meter.lookups, meter.hits, evictions, kept, total, seconds, held, meter.visible)


@torch.inference_mode()
def run_prefill(model, ref: Reference, policy: EvictionPolicy, budget: Budget, positions: str = "original",
                prompt_tokens: int | None = None, hit_ratio: float = 1.0, threads: int | None = 1) -> RunResult:
    """Prompt compression once (kvpress): keep ``budget`` of the first ``prompt_tokens``, score the rest.

    budget: tokens (int) or a ratio (float) of the prompt. prompt_tokens: default half the fed tokens.
    The continuation is fed in one forward on top of the compressed prompt (it is not evicted).
    threads: CPU threads during the run (None: leave as is).
    """
    _check(policy, positions, "prefill", hit_ratio)
    n_in, Hkv = ref.num_fed, ref.num_kv_heads
    n_p = n_in // 2 if prompt_tokens is None else prompt_tokens
    if not 1 <= n_p < n_in:
        raise ValueError(f"prompt_tokens must be in [1, {n_in - 1}] for this text, got {n_p}")
    k = resolve_budget(budget, n_p)
    meter, L = _Meter(ref, hit_ratio), ref.attn.shape[0]
    states = [EvictionState.empty(1, Hkv, ref.ids.device, layer) for layer in range(L)]
    with eager_attention(model), _capture_outputs(model) as outputs, _threads(threads):
        cache = new_cache(model, positions=positions)
        start = time.perf_counter()
        _, attn = _forward(model, cache, ref.ids[:, :n_p], policy.needs_attention)
        _observe(policy, states, attn, n_p, Hkv)
        kept = torch.stack([policy.select(s, cl.keys, cl.values, k)[0]
                            for s, cl in zip(states, cache.layers, strict=True)])  # [L, Hkv, k]
        evicting = not (policy.keeps_all or policy.stores_all) and kept.shape[-1] < n_p
        if evicting:
            for layer in range(L):
                cache.keep(layer, kept[layer][None])
        mask = _prefill_mask(kept[0], n_p, n_in, ref.attn.shape[1] // Hkv,
                             cache.layers[0].keys.dtype) if policy.stores_all else None
        logits, _ = _forward(model, cache, ref.ids[:, n_p:n_in], False, mask)
        seconds = time.perf_counter() - start
        cont = torch.stack([o[0] for o in outputs])  # [L, n_in - n_p, Hq*D]
        held = cache.nbytes()
    for i, t in enumerate(range(n_p, n_in)):
        vis = torch.cat([kept, torch.arange(n_p, t + 1, device=kept.device).expand(L, Hkv, -1)], dim=-1)
        meter.step(t, vis, cont[:, i])
    mass, error = meter.means()
    sinks_kept, total = meter.sinks_retained(kept)
    evictions = (n_p - kept.shape[-1]) * L * Hkv if evicting else 0
    nll = F.cross_entropy(logits.float(), ref.ids[0, n_p + 1:n_in + 1], reduction="none").cpu()
    return RunResult(policy.name, policy.label(), k, positions, "prefill", nll, n_p + 1, mass, error,
                     meter.lookups, meter.hits, evictions, sinks_kept, total, seconds, held, meter.visible)


def _prefill_mask(kept: torch.Tensor, n_p: int, n_in: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[1, Hq, n_in - n_p, n_in]``: prompt positions ``kept`` ``[Hkv, k]`` plus causal continuation."""
    Tc = n_in - n_p
    allowed = torch.zeros(kept.shape[0], Tc, n_in, dtype=torch.bool, device=kept.device)
    allowed[:, :, :n_p].scatter_(2, kept[:, None, :].expand(-1, Tc, -1), True)
    allowed[:, :, n_p:] = torch.ones(Tc, Tc, dtype=torch.bool, device=kept.device).tril()
    heads = allowed.repeat_interleave(groups, dim=0)  # [Hq, Tc, n_in]
    return torch.zeros(heads.shape, dtype=dtype, device=kept.device).masked_fill(~heads, torch.finfo(dtype).min)[None]


def run_policy(model, ref: Reference, policy: EvictionPolicy, budget: Budget, positions: str = "original",
               mode: str = "decode", prompt_tokens: int | None = None, hit_ratio: float = 1.0,
               threads: int | None = 1) -> RunResult:
    """:func:`run_decode` or :func:`run_prefill` by ``mode``."""
    if mode == "prefill":
        return run_prefill(model, ref, policy, budget, positions, prompt_tokens, hit_ratio, threads)
    if mode != "decode":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return run_decode(model, ref, policy, budget, positions, hit_ratio, threads)
