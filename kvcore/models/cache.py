"""A transformers ``DynamicCache`` that eviction and quantization can edit between decoding steps.

Built on transformers 5.x's Cache API: a :class:`LabCache` is a ``DynamicCache`` (so ``model(...,
cache=...)`` and ``model.generate(..., cache=...)`` accept it) whose layers are
:class:`LabLayer` objects, or any subclass a quantizer provides through ``layer_factory``. On top it
adds:

* ``keep(layer_idx, keep_idx)``: keep only chosen token entries of one layer (eviction, kvpress style);
* per-entry positions, so after eviction the next token is either placed at its *original* position
  (``positions="original"``, works with every model) or every kept key is *re-rotated* to compact
  positions 0..T_keep-1 (``positions="rerotate"``, StreamingLLM, RoPE models only, see
  :mod:`kvcore.models.rope`);
* ``nbytes``: bytes the cache holds now, asked of each layer (a quantized layer counts codes + scales).

Callers feeding tokens pass ``position_ids=cache.next_position_ids(n)``: that is what keeps the
positions right after entries were dropped. All layers must hold the same number of entries when the
next forward runs (transformers sizes the attention mask from layer 0); each layer may keep different
tokens, and each KV head may keep different tokens (``keep_idx`` ``[B, Hkv, T_keep]``).

Writing a custom layer (e.g. a quantized one): subclass :class:`LabLayer`, override ``update`` (store
codes, return the dequantized full ``keys, values`` ``[B, Hkv, T, D]``), ``keep``, ``rotate_keys`` (or
raise) and the ``nbytes`` property; pass ``layer_factory=lambda layer_idx: MyLayer(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from kvcore.models.rope import rope_inv_freq, rotate
from kvcore.models.runtime import text_config
from kvcore.tensors import tensor_bytes

POSITION_MODES = ("original", "rerotate")
LayerFactory = Callable[[int], CacheLayerMixin]


class LabLayer(DynamicLayer):
    """A ``DynamicLayer`` (keys/values ``[B, Hkv, T, D]``) that can keep chosen entries and re-rotate its keys."""

    def keep(self, keep_idx: torch.Tensor) -> None:
        """Keep entries ``keep_idx`` ``[B, Hkv, T_keep]`` (sorted, distinct) along the token axis."""
        if not self.is_initialized or self.keys.numel() == 0:
            raise ValueError("cannot keep entries of an empty cache layer")
        gather = keep_idx[..., None].expand(-1, -1, -1, self.keys.shape[-1])  # [B, Hkv, T_keep, D]
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, keep_idx[..., None].expand(-1, -1, -1, self.values.shape[-1]))

    def rotate_keys(self, delta: torch.Tensor, inv_freq: torch.Tensor) -> None:
        """Rotate every key by ``delta`` ``[B, Hkv, T]`` positions (RoPE re-rotation)."""
        self.keys = rotate(self.keys, delta, inv_freq)

    @property
    def nbytes(self) -> int:
        """Bytes held: keys + values at their storage dtype."""
        return tensor_bytes(self.keys, self.values) if self.is_initialized else 0


def _default_factory(layer_idx: int) -> CacheLayerMixin:
    return LabLayer()


class LabCache(DynamicCache):
    """``DynamicCache`` with ``keep``, original-or-compact positions and byte accounting (see module doc).

    num_layers: decoder layers of the model (``len(model.model.layers)``).
    layer_factory: builds layer ``i``'s storage; default :class:`LabLayer` (full precision).
    positions: ``"original"`` or ``"rerotate"``; ``inv_freq`` ``[D/2]`` is required for ``"rerotate"``
    (get it with :func:`kvcore.models.rope.rope_inv_freq`).
    """

    def __init__(self, num_layers: int, layer_factory: LayerFactory | None = None, positions: str = "original",
                 inv_freq: torch.Tensor | None = None) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if positions == "rerotate" and inv_freq is None:
            raise ValueError("positions='rerotate' needs the model's RoPE inv_freq (kvcore.models.rope.rope_inv_freq)")
        factory = layer_factory or _default_factory
        Cache.__init__(self, layers=[factory(i) for i in range(num_layers)])
        self.position_mode = positions
        self.inv_freq = inv_freq
        self.positions: list[torch.Tensor | None] = [None] * num_layers  # each [B, Hkv, T] long
        self.num_seen = [0] * num_layers  # tokens ever appended to each layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append ``[B, Hkv, n, D]`` keys/values to a layer and record their positions; return the layer's K, V."""
        B, H, n, _ = key_states.shape
        start = self.num_seen[layer_idx] if self.position_mode == "original" else self.get_seq_length(layer_idx)
        new = torch.arange(start, start + n, device=key_states.device).expand(B, H, n)  # [B, Hkv, n]
        old = self.positions[layer_idx]
        self.positions[layer_idx] = new.clone() if old is None else torch.cat([old, new], dim=-1)
        self.num_seen[layer_idx] += n
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def next_position_ids(self, num_new: int, device: torch.device | None = None) -> torch.Tensor:
        """Position ids ``[1, num_new]`` to pass with the next ``num_new`` tokens."""
        start = self.num_seen[0] if self.position_mode == "original" else self.get_seq_length(0)
        return torch.arange(start, start + num_new, device=device).unsqueeze(0)

    def keep(self, layer_idx: int, keep_idx: torch.Tensor) -> None:
        """Keep only the entries ``keep_idx`` of layer ``layer_idx``.

        keep_idx: indices into the layer's current entries, ``[T_keep]`` (same for every head) or
        ``[B, Hkv, T_keep]`` (per head, same count everywhere); sorted here, duplicates rejected.
        With ``positions="rerotate"`` the kept keys are re-rotated to positions 0..T_keep-1.
        """
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx must be in 0..{len(self.layers) - 1}, got {layer_idx}")
        layer = self.layers[layer_idx]
        if not hasattr(layer, "keep"):
            raise ValueError(f"cache layer {type(layer).__name__} cannot drop entries; build the cache with "
                             "LabLayer or a subclass (layer_factory)")
        pos = self.positions[layer_idx]
        if pos is None:
            raise ValueError(f"layer {layer_idx} is empty; nothing to keep")
        idx = normalize_keep_index(keep_idx, pos.shape)
        layer.keep(idx)
        kept = pos.gather(-1, idx)  # [B, Hkv, T_keep]
        if self.position_mode == "rerotate":
            compact = torch.arange(idx.shape[-1], device=kept.device).expand_as(kept)
            layer.rotate_keys(compact - kept, self.inv_freq)
            kept = compact.clone()
        self.positions[layer_idx] = kept

    def keep_all(self, keep_idx: Sequence[torch.Tensor]) -> None:
        """``keep`` on every layer, one index tensor per layer."""
        if len(keep_idx) != len(self.layers):
            raise ValueError(f"need one index tensor per layer ({len(self.layers)}), got {len(keep_idx)}")
        for layer_idx, idx in enumerate(keep_idx):
            self.keep(layer_idx, idx)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds now, summed over layers (each layer counts its own storage)."""
        total = 0
        for layer in self.layers:
            if hasattr(layer, "nbytes"):
                total += layer.nbytes
            elif getattr(layer, "is_initialized", False):
                total += tensor_bytes(layer.keys, layer.values)
        return total

    def num_tokens(self, layer_idx: int = 0) -> int:
        """Entries held by one layer (after eviction, fewer than the tokens seen)."""
        return self.get_seq_length(layer_idx)


def normalize_keep_index(keep_idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``keep_idx`` ``[T_keep]`` or ``[B, Hkv, T_keep]`` as a sorted long ``[B, Hkv, T_keep]`` for a layer of ``shape``.

    shape: ``[B, Hkv, T]`` of the layer's positions. Raises ValueError on out-of-range or repeated indices.
    """
    B, H, T = shape
    idx = torch.as_tensor(keep_idx, dtype=torch.long, device=None)
    if idx.dim() == 1:
        idx = idx.view(1, 1, -1).expand(B, H, -1)  # [B, Hkv, T_keep]
    if idx.dim() != 3 or idx.shape[0] != B or idx.shape[1] != H:
        raise ValueError(f"keep_idx must be [T_keep] or [B={B}, Hkv={H}, T_keep], got {list(keep_idx.shape)}")
    if idx.shape[-1] == 0:
        raise ValueError("keep_idx keeps no entry; keep at least one token")
    if int(idx.min()) < 0 or int(idx.max()) >= T:
        raise ValueError(f"keep_idx must lie in [0, {T}), got values {int(idx.min())}..{int(idx.max())}")
    idx = idx.sort(dim=-1).values
    if idx.shape[-1] > 1 and bool((idx[..., 1:] == idx[..., :-1]).any()):
        raise ValueError("keep_idx repeats an entry; each kept index must be distinct")
    return idx.contiguous()


def new_cache(model, layer_factory: LayerFactory | None = None, positions: str = "original") -> LabCache:
    """A :class:`LabCache` sized for ``model`` (re-rotation frequencies looked up when ``positions="rerotate"``)."""
    inv_freq = rope_inv_freq(model) if positions == "rerotate" else None
    return LabCache(text_config(model).num_hidden_layers, layer_factory, positions, inv_freq)
