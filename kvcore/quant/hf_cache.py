"""Transformers cache layers that store K/V with a :class:`QuantMethod` and hand attention the
dequantized tensors, so generation and streaming perplexity run on a quantized KV cache.

Plays the part of transformers' ``QuantizedLayer``/``QuantizedCache`` (``cache_utils.py``), with two
differences: the stored forms are this package's packed codes (exact ``nbytes``), and tokens age
out of the fp16 window as KIVI prescribes instead of being re-quantized together. As in both, the
tokens of the current forward pass attend to themselves in full precision; later passes read them
back from the store.

Several methods can share one batched forward pass: give one method per batch row, feed the same
tokens in every row, and each row's keys and values go through its own method (the model treats
rows independently), so one decode loop measures every method. :func:`quantized_plan` makes the
:class:`~kvcore.models.plan.CachePlan` that builds such layers inside a
:class:`~kvcore.models.cache.LabCache`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicLayer

from kvcore.models.cache import LabCache
from kvcore.models.plan import CachePlan
from kvcore.quant.methods import QuantMethod
from kvcore.quant.stream import QuantizedKV


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's cache: a :class:`QuantizedKV` store (or one per batch row) behind
    transformers' layer interface.

    Besides the stores it keeps a running dequantized view ``[B, H, capacity, D]`` updated from each
    append's changes, so a step costs the new tokens' work, not a re-read of the whole cache (the
    view is a compute buffer, not counted in ``nbytes``). ``seconds[i]``: wall time spent in store ``i``.
    """

    is_croppable = False

    def __init__(self, methods: Sequence[QuantMethod]) -> None:
        super().__init__()
        self.methods = tuple(methods)
        self.reset_stores()

    def reset_stores(self) -> None:
        """Empty stores, view and timers."""
        self.stores = [QuantizedKV(m) for m in self.methods]
        self.seconds = [0.0] * len(self.stores)
        self._view_k: torch.Tensor | None = None  # [B, H, capacity, D]
        self._view_v: torch.Tensor | None = None
        self._pending: tuple[int, int, torch.Tensor, torch.Tensor] | None = None

    def _reserve(self, like: torch.Tensor, tokens: int) -> None:
        """Grow the views (doubling) to hold ``tokens`` positions."""
        have = 0 if self._view_k is None else self._view_k.shape[2]
        if tokens <= have:
            return
        B, H, _, D = like.shape
        capacity = max(tokens, 2 * have, 64)
        views = []
        for old in (self._view_k, self._view_v):
            new = like.new_zeros(B, H, capacity, D)  # [B, H, capacity, D]
            if old is not None:
                new[:, :, :have] = old
            views.append(new)
        self._view_k, self._view_v = views

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values ``[B, H, t, D]``; return past (as stored) + new (exact) ``[B, H, T, D]``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        shared = len(self.stores) == 1
        if not shared and key_states.shape[0] != len(self.stores):
            raise ValueError(f"this cache holds one method per batch row: {len(self.stores)} methods, "
                             f"batch of {key_states.shape[0]}")
        start, stop = self.get_seq_length(), self.get_seq_length() + key_states.shape[2]
        self._reserve(key_states, stop)
        if self._pending is not None:  # what the last pass saw goes back to its stored form
            s, e, k_stored, v_stored = self._pending
            self._view_k[:, :, s:e], self._view_v[:, :, s:e] = k_stored, v_stored
        changes = []
        for i, store in enumerate(self.stores):
            began = time.perf_counter()
            rows = slice(None) if shared else slice(i, i + 1)
            k_changes, v_changes = store.append(key_states[rows], value_states[rows])
            changes += [(rows, self._view_k, *c) for c in k_changes] + [(rows, self._view_v, *c) for c in v_changes]
            self.seconds[i] += time.perf_counter() - began
        # As in KIVI and transformers' QuantizedLayer, this pass attends to the past as it was stored before
        # the append and to its own tokens exactly; tokens that aged now read back compressed from the next pass.
        low = min(at for _, _, at, _ in changes)
        seen_k, seen_v = self._view_k[:, :, low:start].clone(), self._view_v[:, :, low:start].clone()
        for rows, view, at, tokens in changes:
            view[rows, :, at:at + tokens.shape[2]] = tokens
        self._pending = (low, stop, self._view_k[:, :, low:stop].clone(), self._view_v[:, :, low:stop].clone())
        self._view_k[:, :, low:start], self._view_v[:, :, low:start] = seen_k, seen_v
        self._view_k[:, :, start:stop], self._view_v[:, :, start:stop] = key_states, value_states
        return self._view_k[:, :, :stop], self._view_v[:, :, :stop]

    def get_seq_length(self) -> int:
        return self.stores[0].num_tokens

    @property
    def nbytes(self) -> int:
        """Exact bytes held by this layer (every store)."""
        return sum(store.nbytes for store in self.stores)

    def reset(self) -> None:
        super().reset()
        self.reset_stores()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a quantized KV cache cannot be cropped: its aged tokens are stored compressed")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("beam search is not supported by the quantized KV cache; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError("cannot expand a quantized KV cache; pass num_return_sequences=1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("the quantized KV cache does not support selecting batch rows")


def quantized_plan(methods: QuantMethod | Sequence[QuantMethod], name: str | None = None) -> CachePlan:
    """A cache plan whose layers store K/V with ``methods``: one method for every batch row, or one per row."""
    methods = (methods,) if isinstance(methods, QuantMethod) else tuple(methods)
    if not methods:
        raise ValueError("give at least one method")
    label = name or "quant:" + "+".join(dict.fromkeys(m.name for m in methods))
    return CachePlan(label, layer_factory=lambda layer_idx: QuantizedKVLayer(methods))


def _layers(cache: LabCache) -> list[QuantizedKVLayer]:
    if not all(isinstance(layer, QuantizedKVLayer) for layer in cache.layers):
        raise ValueError("the cache was not built by a quantized plan (kvcore.quant.hf_cache.quantized_plan)")
    return list(cache.layers)


def nbytes_per_row(cache: LabCache) -> list[int]:
    """Exact bytes held for each store (one per batch row, or one shared), summed over layers."""
    layers = _layers(cache)
    return [sum(layer.stores[i].nbytes for layer in layers) for i in range(len(layers[0].stores))]


def fp16_nbytes_per_row(cache: LabCache) -> list[int]:
    """What each store's tokens would take in fp16."""
    layers = _layers(cache)
    return [sum(layer.stores[i].fp16_nbytes for layer in layers) for i in range(len(layers[0].stores))]


def seconds_per_row(cache: LabCache) -> list[float]:
    """Wall time spent storing and reading back each store's K/V (summed over layers)."""
    layers = _layers(cache)
    return [sum(layer.seconds[i] for layer in layers) for i in range(len(layers[0].stores))]
