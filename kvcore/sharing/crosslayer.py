"""Cross-layer KV sharing at inference time: adjacent layers share one stored K/V (CLA) or a merged one (MiniCache).

From ``start_layer`` up, the layers are taken in pairs ``(l, l+1)``, ``(l+2, l+3)``... and each pair keeps
one cache entry per token and KV head instead of two. Three modes, all built on transformers' cache API
(a :class:`~kvcore.models.cache.LabCache` whose pair layers are the classes below, so the model code is
untouched):

``share`` (Cross-Layer Attention, Brandon et al. 2024, applied to a model not trained for it): the upper
layer stores nothing and attends over the lower layer's keys and values, for every token including the
current one; its own K/V projections are computed and thrown away. Stored per pair: the lower layer's K, V.

``merge-linear``: one K and one V per pair, ``(1 - t) * lower + t * upper``; both layers read it for past
tokens. ``merge-slerp`` (MiniCache, Liu et al. 2024, section 3): each token's vectors are split into
magnitude and direction; the directions are merged by spherical interpolation with weight ``t`` and the
two magnitudes are kept, so layer ``i`` reads ``|x_i| * slerp(x_lo/|x_lo|, x_up/|x_up|, t)``. Stored per
pair: one direction ``[B, Hkv, T, D]`` plus two magnitudes ``[B, Hkv, T, 1]``, for K and for V. MiniCache's
retention of the least similar tokens is not done here.

In the merge modes a token is merged once both layers of its pair have computed it, so every layer sees
its own exact K/V for the tokens of the current forward and the merged ones for all earlier tokens (the
prompt is merged after prefill, as in MiniCache). Perplexity therefore decodes token by token. In
``share`` mode nothing is merged after the fact, so one forward over the whole text gives the same result.
RoPE rotates both layers' keys of one position by the same angle, so merging rotated keys equals merging
them before rotation (for ``merge-linear``; ``merge-slerp`` only uses norms and angles, which rotation keeps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from kvcore.models.cache import LabLayer
from kvcore.models.perplexity import stream_text
from kvcore.models.plan import CachePlan
from kvcore.models.runtime import text_config
from kvcore.models.training import batch_at
from kvcore.noise import paired_means
from kvcore.tensors import tensor_bytes

MODES = ("share", "merge-linear", "merge-slerp")


@dataclass(slots=True)
class CrossLayerSettings:
    """Which layers pair up and how.

    mode: one of ``MODES`` (see module doc). start_layer: first layer of the first pair; layers below it
    keep their own cache; ``start_layer`` = the number of layers means no sharing. t: interpolation weight
    of the upper layer in the merge modes, in [0, 1] (0 = the lower layer's vectors, MiniCache uses 0.6).
    """

    mode: str = "share"
    start_layer: int = 2
    t: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise ValueError(f"start_layer must be an integer >= 0, got {self.start_layer!r}")
        if not (isinstance(self.t, int | float) and 0.0 <= self.t <= 1.0):
            raise ValueError(f"t must be in [0, 1], got {self.t!r}")

    def pairs(self, num_layers: int) -> list[tuple[int, int]]:
        """Layer pairs ``(lower, upper)`` that share; an odd last layer keeps its own cache."""
        if self.start_layer > num_layers:
            raise ValueError(f"start_layer must be in [0, {num_layers}] for a {num_layers}-layer model, "
                             f"got {self.start_layer}")
        return [(lo, lo + 1) for lo in range(self.start_layer, num_layers - 1, 2)]


class _NoKeep:
    def keep(self, keep_idx: torch.Tensor) -> None:
        raise ValueError("cross-layer shared cache layers cannot drop entries (no eviction on top of sharing)")


class SharedLayer(_NoKeep, DynamicLayer):
    """The upper layer of a ``share`` pair: stores nothing, returns the lower layer's keys and values."""

    def __init__(self, source: LabLayer) -> None:
        super().__init__()
        self.source = source

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.source.keys, self.source.values  # [B, Hkv, T, D]: the lower layer already appended this step

    def get_seq_length(self) -> int:
        return self.source.get_seq_length()

    @property
    def nbytes(self) -> int:
        return 0


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of unit vectors ``a``, ``b`` ``[..., D]`` (linear, renormalized, when parallel)."""
    cos = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)  # [..., 1]
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = sin.abs() > eps
    w_a = torch.where(safe, torch.sin((1 - t) * omega) / sin.clamp_min(eps), torch.full_like(sin, 1 - t))
    w_b = torch.where(safe, torch.sin(t * omega) / sin.clamp_min(eps), torch.full_like(sin, t))
    return F.normalize(w_a * a + w_b * b, dim=-1)


class PairStore:
    """What a merged pair stores: K and V, each as one merged tensor (+ two magnitudes for ``merge-slerp``).

    ``k`` / ``v``: ``[B, Hkv, T, D]`` merged vectors (linear) or unit directions (slerp); ``k_mag`` /
    ``v_mag``: ``[2, B, Hkv, T, 1]`` norms of the lower and upper layer's vectors (slerp only).
    """

    def __init__(self, mode: str, t: float) -> None:
        self.mode, self.t = mode, t
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.k_mag: torch.Tensor | None = None
        self.v_mag: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the lower layer's exact K, V of this step

    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def read(self, which: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Past K, V as layer ``which`` (0 = lower, 1 = upper) reads them: ``[B, Hkv, T, D]`` each."""
        if self.k is None:
            return None, None
        if self.mode == "merge-linear":
            return self.k, self.v
        return self.k * self.k_mag[which], self.v * self.v_mag[which]

    def _merge(self, lo: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mode == "merge-linear":
            return (1 - self.t) * lo + self.t * up, None
        mag = torch.stack([lo.norm(dim=-1, keepdim=True), up.norm(dim=-1, keepdim=True)])  # [2, B, Hkv, n, 1]
        return slerp(F.normalize(lo, dim=-1), F.normalize(up, dim=-1), self.t), mag

    def append(self, k_up: torch.Tensor, v_up: torch.Tensor) -> None:
        """Merge the pending lower-layer entries with the upper layer's ``[B, Hkv, n, D]`` and store them."""
        if self.pending is None:
            raise RuntimeError("the upper layer of a merged pair ran before its lower layer")
        (k_lo, v_lo), self.pending = self.pending, None
        k, k_mag = self._merge(k_lo, k_up)
        v, v_mag = self._merge(v_lo, v_up)

        def cat(old: torch.Tensor | None, new: torch.Tensor | None, dim: int) -> torch.Tensor | None:
            return new if old is None or new is None else torch.cat([old, new], dim=dim)

        self.k, self.v = cat(self.k, k, -2), cat(self.v, v, -2)
        self.k_mag, self.v_mag = cat(self.k_mag, k_mag, -2), cat(self.v_mag, v_mag, -2)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v, self.k_mag, self.v_mag)


class MergedLayer(_NoKeep, DynamicLayer):
    """One layer of a merged pair: past entries read from the :class:`PairStore`, the current ones exact.

    The lower layer (``which=0``) parks its new K/V in the store; the upper one (``which=1``) merges
    them with its own and appends the result. Bytes are counted once, on the lower layer.
    """

    def __init__(self, store: PairStore, which: int) -> None:
        super().__init__()
        self.store, self.which = store, which

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k, past_v = self.store.read(self.which)  # read before this step's tokens are merged in
        if self.which == 0:
            self.store.pending = (key_states, value_states)
        else:
            self.store.append(key_states, value_states)
        if past_k is None:
            return key_states, value_states
        return torch.cat([past_k, key_states], dim=-2), torch.cat([past_v, value_states], dim=-2)  # [B, Hkv, T, D]

    def get_seq_length(self) -> int:
        return self.store.length()

    @property
    def nbytes(self) -> int:
        return self.store.nbytes if self.which == 0 else 0


class CrossLayerFactory:
    """``layer_idx -> cache layer`` for a :class:`~kvcore.models.cache.LabCache` with layer pairs (see module doc).

    A cache builds its layers in order 0..L-1, so a pair's lower layer exists when its upper layer is built.
    """

    def __init__(self, settings: CrossLayerSettings, num_layers: int) -> None:
        self.settings = settings
        self.roles: dict[int, tuple[int, int]] = {}  # layer -> (pair index, 0 lower / 1 upper)
        for i, (lo, up) in enumerate(settings.pairs(num_layers)):
            self.roles[lo], self.roles[up] = (i, 0), (i, 1)
        self._lower: dict[int, LabLayer | PairStore] = {}

    def __call__(self, layer_idx: int):
        if layer_idx not in self.roles:
            return LabLayer()
        pair, which = self.roles[layer_idx]
        if self.settings.mode == "share":
            if which == 0:
                self._lower[pair] = LabLayer()
                return self._lower[pair]
            return SharedLayer(self._lower[pair])
        if which == 0:
            self._lower[pair] = PairStore(self.settings.mode, self.settings.t)
        return MergedLayer(self._lower[pair], which)


def _num_layers(model) -> int:
    return text_config(model).num_hidden_layers


def cross_layer_plan(model, settings: CrossLayerSettings) -> CachePlan:
    """A :class:`~kvcore.models.plan.CachePlan` whose caches share K/V across layer pairs of ``model``."""
    label = f"{settings.mode} from layer {settings.start_layer}"
    return CachePlan(label, layer_factory=CrossLayerFactory(settings, _num_layers(model)))


def layer_roles(settings: CrossLayerSettings, num_layers: int) -> pd.DataFrame:
    """What each layer stores and reads under ``settings``: ``layer, stores, reads``."""
    rows = [{"layer": i, "stores": "its own K, V", "reads": "its own K, V"} for i in range(num_layers)]
    for lo, up in settings.pairs(num_layers):
        if settings.mode == "share":
            rows[up] = {"layer": up, "stores": "nothing", "reads": f"layer {lo}'s K, V (all tokens)"}
        else:
            what = "one merged K, V" if settings.mode == "merge-linear" else "merged K, V directions + 2 magnitudes"
            rows[lo] = {"layer": lo, "stores": f"{what} for layers {lo}+{up}",
                        "reads": "merged past, its own current tokens"}
            rows[up] = {"layer": up, "stores": f"(counted on layer {lo})",
                        "reads": "merged past, its own current tokens"}
    return pd.DataFrame(rows)


def stream_nll(model, ids: torch.Tensor, plan: CachePlan, one_shot: bool = False) -> tuple[torch.Tensor, int]:
    """NLL (nats) of tokens 1..T-1 of each row of ``ids`` ``[B, T]``, and the bytes the cache holds at the end.

    one_shot: score all tokens in one forward (exact for plans that never merge after the fact: the
    full cache and ``share``); otherwise feed the first token, then one token per step through the cache.
    """
    streamed = stream_text(model, ids, plan, prefill=ids.shape[1] - 1 if one_shot else 1)
    return streamed.nll, streamed.cache.nbytes  # [B, T-1]


@dataclass(slots=True)
class CrossLayerResult:
    """``table``: one row per configuration (the unshared model first): pairs, bytes, perplexity with its interval
    and its ratio to the full cache with the ratio's interval (``vs_full``: worse / better beyond the noise)."""

    table: pd.DataFrame


def crosslayer_experiment(model, ids: torch.Tensor, configs: list[CrossLayerSettings], seed: int = 0
                          ) -> CrossLayerResult:
    """Perplexity and measured KV bytes of ``model`` on ``ids`` ``[B, T]`` for the full cache and each config.

    Rows: ``mode, start_layer, t`` (the merge weight; empty for the full cache and ``share``, which use none),
    ``pairs, stored_layers, kv_bytes_per_token`` (measured from the cache tensors at the end), ``kv_vs_full``,
    ``perplexity`` with ``perplexity_low/high``, ``ppl_vs_full`` with ``ppl_vs_full_low/high`` and ``vs_full``.
    Intervals: 95%, a paired block bootstrap over the scored tokens (:func:`kvcore.noise.paired_means`, every
    configuration resampled on the same blocks; ``seed`` seeds it). ``share`` and the full cache are scored in one
    forward, the merge modes token by token (see module doc).
    """
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be [B, T] with T >= 2, got {list(ids.shape)}")
    L = _num_layers(model)
    rows, nlls = [], []
    full = CrossLayerSettings(start_layer=L)
    for s in [full, *configs]:
        nll, nbytes = stream_nll(model, ids, cross_layer_plan(model, s), one_shot=s.mode == "share")
        pairs = s.pairs(L)
        merged = bool(pairs) and s.mode != "share"
        rows.append({"mode": "none" if not pairs else s.mode, "start_layer": s.start_layer,
                     "t": s.t if merged else math.nan, "pairs": len(pairs), "stored_layers": L - len(pairs),
                     "kv_bytes_per_token": nbytes / nll.numel()})
        nlls.append(nll)
    table = pd.DataFrame(rows)
    table["kv_vs_full"] = table["kv_bytes_per_token"] / table["kv_bytes_per_token"].iloc[0]
    means, diffs = paired_means(nlls, base=0, seed=seed)
    ppl, ratio = [m.map(math.exp) for m in means], [d.map(math.exp) for d in diffs]
    table["perplexity"], table["perplexity_low"], table["perplexity_high"] = zip(
        *((p.estimate, p.low, p.high) for p in ppl), strict=True)
    table["ppl_vs_full"], table["ppl_vs_full_low"], table["ppl_vs_full_high"] = zip(
        *((r.estimate, r.low, r.high) for r in ratio), strict=True)
    table["vs_full"] = ["baseline" if i == 0 else r.versus(1.0, below="better", above="worse")
                        for i, r in enumerate(ratio)]
    return CrossLayerResult(table)


def crosslayer_sweep(model, ids: torch.Tensor, mode: str, t: float = 0.5) -> CrossLayerResult:
    """:func:`crosslayer_experiment` for one mode at every first shared layer (0 .. layers - 2)."""
    return crosslayer_experiment(model, ids, [CrossLayerSettings(mode, s, t) for s in range(_num_layers(model) - 1)])


def text_windows(stream: torch.Tensor, bos: int, windows: int, length: int) -> torch.Tensor:
    """The first ``windows`` consecutive windows of ``stream`` ``[N]``, each ``<bos>`` + ``length - 1`` tokens.

    Returns ``[W, L]`` token ids (``W = windows``, ``L = length``).
    """
    if windows < 1 or length < 2:
        raise ValueError(f"need windows >= 1 and length >= 2, got {windows} and {length}")
    if windows * length > len(stream):
        raise ValueError(f"{windows} windows of {length} tokens need {windows * length} tokens; the text has "
                         f"{len(stream)}")
    return batch_at(stream, [i * length for i in range(windows)], length, bos)[0]  # [W, L]
