"""What every eviction policy shares: budgets, per-layer state, attention statistics, top-k + gather.

Follows kvpress's ``ScorerPress`` (NVIDIA, 2024): a policy only scores cached tokens (higher = keep);
this base class picks the ``budget`` best per KV head *once*, keeps the kept tokens in their original
order and gathers keys and values. The same scores drive both modes of the lab:

* prefill compression (kvpress): :meth:`EvictionPolicy.compress` prunes a prompt's cache once;
* decode-time eviction (StreamingLLM, H2O): the evaluation calls :meth:`EvictionPolicy.observe` with
  each new token's attention and :meth:`EvictionPolicy.select` to hold the cache at the budget;
  :class:`EvictionState` keeps a stateful policy's accumulators aligned with the kept tokens.

GQA/MQA: attention of the query heads that read one KV head is averaged over that group
(:func:`group_attention`) before any policy sees it, so scores are always ``[B, Hkv, T]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

Budget = int | float
# How a share of the tokens becomes a count: rounded (the lab), or kvpress 0.5.5's ``int(n * (1 - ratio))``
# with ratio = 1 - share, whose float error can drop a token (0.2 of 100 keeps 19).
BUDGET_RULES = ("round", "kvpress")


def resolve_budget(budget: Budget, length: int, rule: str = "round") -> int:
    """Tokens to keep out of ``length``: an ``int`` is a token count, a ``float`` in (0, 1] a share of ``length``.

    Never more than ``length``; a ratio keeps at least one token. rule: how a share is counted (``BUDGET_RULES``).
    Raises ValueError for anything else.
    """
    if rule not in BUDGET_RULES:
        raise ValueError(f"budget rule must be one of {BUDGET_RULES}, got {rule!r}")
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ValueError(f"budget must be a token count (int >= 1) or a ratio (float in (0, 1]), got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget must be >= 1 token, got {budget}")
        return min(budget, length)
    if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
        raise ValueError(f"a budget ratio must lie in (0, 1], got {budget}")
    kept = round(budget * length) if rule == "round" else int(length * (1 - (1 - budget)))
    return min(length, max(1, kept))


def group_attention(attn: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Average attention probabilities ``[B, Hq, Tq, T]`` over each KV head's query group -> ``[B, Hkv, Tq, T]``."""
    B, Hq, Tq, T = attn.shape
    if Hq % num_kv_heads:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({num_kv_heads})")
    return attn.float().view(B, num_kv_heads, Hq // num_kv_heads, Tq, T).mean(dim=2)  # [B, Hkv, Tq, T]


def causal_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Softmax(q k^T / sqrt(D)) with a causal mask: queries ``[B, Hq, Tq, D]`` are the last Tq of T positions.

    keys: ``[B, Hkv, T, D]`` (GQA: each KV head serves Hq / Hkv query heads). Returns ``[B, Hq, Tq, T]`` float32.
    """
    B, Hq, Tq, D = queries.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    if Tq > T:
        raise ValueError(f"more queries ({Tq}) than keys ({T}): queries must be the last Tq prompt positions")
    q = queries.float().view(B, Hkv, Hq // Hkv, Tq, D)  # [B, Hkv, G, Tq, D]
    logits = torch.einsum("bhgqd,bhkd->bhgqk", q, keys.float()) / math.sqrt(D)  # [B, Hkv, G, Tq, T]
    q_pos = torch.arange(T - Tq, T, device=keys.device)[:, None]
    future = torch.arange(T, device=keys.device)[None, :] > q_pos  # [Tq, T]
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1).view(B, Hq, Tq, T)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick tokens ``idx`` ``[B, Hkv, k]`` along the last axis of ``x`` ``[B, Hkv, ..., T]``.

    Works for any number of middle dimensions (a window of attention rows, say).
    """
    view = idx.view(*idx.shape[:2], *([1] * (x.dim() - 3)), idx.shape[-1])  # [B, Hkv, 1.., k]
    return x.gather(-1, view.expand(*x.shape[:-1], idx.shape[-1]))


def gather_kv(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick tokens ``idx`` ``[B, Hkv, k]`` of keys or values ``[B, Hkv, T, D]`` -> ``[B, Hkv, k, D]``."""
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


def pad_tokens(x: torch.Tensor | None, length: int, like: torch.Tensor) -> torch.Tensor:
    """Right-pad a statistic ``[B, Hkv, ..., T_old]`` with zeros to ``length`` tokens (new tokens start at 0).

    like: a tensor of the target shape ``[B, Hkv, ..., length]`` whose shape/dtype a missing ``x`` copies.
    """
    if x is None:
        return torch.zeros_like(like, dtype=torch.float32)
    return torch.nn.functional.pad(x, (0, length - x.shape[-1]))


@dataclass(slots=True)
class EvictionState:
    """What a policy knows about the tokens of one layer's cache, aligned with the cache's token axis.

    positions: ``[B, Hkv, T]`` original position (0 = first token of the text) of each cached token.
    step: tokens processed so far, i.e. the original position of the next token.
    layer: the layer's index (seeds the random policy, so layers draw independently).
    stats: policy accumulators, token axis last (``[B, Hkv, T]`` or ``[B, Hkv, w, T]``), gathered with
    the cache on every eviction so they stay aligned with the kept tokens.
    """

    positions: torch.Tensor
    step: int = 0
    layer: int = 0
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch: int, num_kv_heads: int, device: torch.device | str = "cpu", layer: int = 0) -> EvictionState:
        """A state for an empty cache."""
        return cls(torch.zeros(batch, num_kv_heads, 0, dtype=torch.long, device=device), 0, layer)

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return self.positions.shape[-1]

    def append(self, num_new: int) -> None:
        """Record ``num_new`` tokens appended at the end of the cache (statistics are padded by ``observe``)."""
        B, H, _ = self.positions.shape
        new = torch.arange(self.step, self.step + num_new, device=self.positions.device).expand(B, H, num_new)
        self.positions = torch.cat([self.positions, new], dim=-1)  # [B, Hkv, T + n]
        self.step += num_new

    def keep(self, idx: torch.Tensor) -> None:
        """Keep tokens ``idx`` ``[B, Hkv, k]`` (sorted): positions and every statistic follow the cache."""
        self.positions = self.positions.gather(-1, idx)
        self.stats = {name: gather_tokens(value, idx) for name, value in self.stats.items()}


class EvictionPolicy:
    """Base of every policy: subclasses are ``@dataclass(slots=True)`` whose fields are hyperparameters.

    A subclass implements :meth:`score_tokens` (higher = keep) and, when it reads attention,
    :meth:`observe`. Class attributes: ``name`` (registry key), ``paper`` (what it follows),
    ``needs_attention`` (scores read attention probabilities), ``keeps_all`` (never evicts: the full
    cache), ``stores_all`` (limits attention only, storage unchanged), ``positional`` (scores read token
    positions only, never keys, values or attention, and draw nothing at random: what it keeps at a step is the
    same in every layer and head, whatever the model computes).
    """

    __slots__ = ()
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = False
    keeps_all: ClassVar[bool] = False
    stores_all: ClassVar[bool] = False
    positional: ClassVar[bool] = False

    def score_tokens(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, Hkv, T]`` of the cached tokens (higher = keep); keys/values ``[B, Hkv, T, D]``."""
        raise NotImplementedError

    def observe(self, state: EvictionState, attn: torch.Tensor) -> None:
        """Fold in the attention of the newest ``Tq`` queries, ``attn`` ``[B, Hkv, Tq, T]`` (group-averaged).

        Called after ``state.append(Tq)``; the queries are at original positions ``step - Tq .. step - 1``
        and row ``i`` sees the first ``T - Tq + i + 1`` cached tokens. Default: attention is not used.
        """

    def min_budget(self) -> int:
        """The smallest budget (tokens) this policy can honour."""
        return 1

    def recent_window(self, budget: int) -> int:
        """How many of the newest tokens are always kept at this budget (0: none protected)."""
        return 0

    def hyperparameters(self) -> dict[str, Any]:
        """The dataclass fields and their values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def label(self) -> str:
        """``name(field=value, ...)`` for tables and legends; a field whose metadata says ``label_if_set`` (an
        option added to reproduce another system) shows only when it is not at its default."""
        args = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)  # type: ignore[arg-type]
                         if not (f.metadata.get("label_if_set") and getattr(self, f.name) == f.default))
        return f"{self.name}({args})" if args else self.name

    def prefill_state(self, keys: torch.Tensor, queries: torch.Tensor | None, layer: int = 0) -> EvictionState:
        """The state after a prompt: its T tokens appended and (if needed) its queries' attention observed.

        keys: ``[B, Hkv, T, D]``; queries: ``[B, Hq, Tq, D]``, the prompt's last Tq queries (may be None
        for policies that do not read attention).
        """
        B, Hkv, T, _ = keys.shape
        state = EvictionState.empty(B, Hkv, keys.device, layer)
        state.append(T)
        if self.needs_attention:
            if queries is None:
                raise ValueError(f"policy {self.name!r} reads attention: pass the prompt's queries")
            self.observe(state, group_attention(causal_attention(queries, keys), Hkv))
        return state

    def score(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        """Scores ``[B, Hkv, T]`` of a prompt's tokens (higher = keep), the public contract.

        keys, values: ``[B, Hkv, T, D]``; queries: ``[B, Hq, Tq, D]`` (the prompt's last Tq queries, RoPE
        applied like the keys; Hq a multiple of Hkv).
        """
        return self.score_tokens(self.prefill_state(keys, queries), keys, values)

    def select(self, state: EvictionState, keys: torch.Tensor, values: torch.Tensor, budget: Budget) -> torch.Tensor:
        """Indices ``[B, Hkv, k]`` of the tokens to keep (sorted, distinct), k = the resolved budget.

        The newest ``recent_window(k)`` tokens are always kept; the rest are the top scores. A budget at
        or above the cache length (or a ``keeps_all`` policy) keeps everything.
        """
        B, H, T, _ = keys.shape
        k = resolve_budget(budget, T)
        everything = torch.arange(T, device=keys.device).expand(B, H, T)
        if self.keeps_all or k >= T:
            return everything
        if k < self.min_budget():
            raise ValueError(f"{self.label()} needs a budget of at least {self.min_budget()} tokens, got {k}")
        scores = self.score_tokens(state, keys, values).float().clone()  # [B, Hkv, T]
        recent = min(self.recent_window(k), k)
        if recent:
            scores[..., T - recent:] = float("inf")
        return scores.topk(k, dim=-1).indices.sort(dim=-1).values

    def compress(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None,
                 budget: Budget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prune a prompt's cache to the budget once (kvpress's prefill compression).

        keys, values: ``[B, Hkv, T, D]``; queries: ``[B, Hq, Tq, D]``; budget: tokens or a ratio of T.
        Returns kept keys, values ``[B, Hkv, k, D]`` and ``kept_idx`` ``[B, Hkv, k]`` (original order).
        A ``stores_all`` policy only limits attention, so its storage, and what it returns, is unchanged.
        """
        state = self.prefill_state(keys, queries)
        if self.stores_all:
            B, H, T, _ = keys.shape
            return keys, values, torch.arange(T, device=keys.device).expand(B, H, T)
        idx = self.select(state, keys, values, budget)
        return gather_kv(keys, idx), gather_kv(values, idx), idx
