"""What an eviction run measures at each step against the full-cache :class:`~kvcore.eviction.reference.Reference`.

* Attention mass retained, per layer: the share of the full-cache attention of query ``t`` (averaged over
  query heads and measured steps) that falls on tokens query ``t`` can still read.
* Attention-output error, per layer: ``||o - o_full|| / ||o_full||`` of the attention output (input of the
  output projection), averaged over measured steps; it includes drift from earlier layers and steps.
* SinkVis-style counters. A *lookup* is a (measured step, layer, query head, key) where the full cache
  gives the key at least ``hit_ratio`` times the uniform share ``1 / (t + 1)``; a *hit* is a lookup whose
  key the query can still read, a *miss* one whose key was evicted (or masked).
* Sinks retained: (sink token, layer, KV head) entries still readable at the last step.
* A visibility map: row = query step, column = token, value = share (x255) of (layer, KV head) pairs in
  which the query could read the token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvcore.eviction.reference import Reference


class AttentionMeter:
    """Accumulates the per-step measurements of one run against the reference."""

    def __init__(self, ref: Reference, hit_ratio: float) -> None:
        if not hit_ratio > 0:
            raise ValueError(f"hit_ratio must be > 0 (a multiple of the uniform attention share), got {hit_ratio}")
        L, _, n, _ = ref.attn.shape
        self.ref, self.hit_ratio = ref, hit_ratio
        self.mass, self.error = torch.zeros(L), torch.zeros(L)
        self.steps = self.lookups = self.hits = 0
        self.visible = np.zeros((n, n), dtype=np.uint8)
        for t in range(n):  # before measurement every query reads its whole prefix
            self.visible[t, :t + 1] = 255

    def step(self, t: int, vis: torch.Tensor, outputs: torch.Tensor) -> None:
        """Query ``t`` could read positions ``vis`` ``[L, Hkv, m]``; its attention outputs are ``[L, Hq*D]``."""
        L, Hkv, _ = vis.shape
        groups = self.ref.groups
        rows = self.ref.attn[:, :, t, :t + 1].reshape(L, Hkv, groups, t + 1)  # [L, Hkv, G, t+1]
        idx = vis[:, :, None, :].expand(-1, -1, groups, -1).cpu()  # [L, Hkv, G, m]
        self.mass += rows.gather(-1, idx).sum(-1).mean(dim=(1, 2)).cpu()
        needed = rows >= self.hit_ratio / (t + 1)  # [L, Hkv, G, t+1]
        self.lookups += int(needed.sum())
        self.hits += int(needed.gather(-1, idx).sum())
        want = self.ref.outputs[:, t]  # [L, Hq*D]
        self.error += ((outputs.cpu() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)).cpu()
        share = torch.zeros(t + 1).index_add_(0, vis.flatten().cpu(), torch.ones(vis.numel())) / (L * Hkv)
        self.visible[t, :t + 1] = (share * 255).round().to(torch.uint8).numpy()
        self.steps += 1

    def step_many(self, ts: Sequence[int], vis: torch.Tensor, outputs: torch.Tensor) -> None:
        """:meth:`step` for many queries at once, each reading as many positions: queries ``ts`` read ``vis``
        ``[S, L, Hkv, m]`` and made attention outputs ``[S, L, Hq*D]`` (the same sums, batched)."""
        S, L, Hkv, m = vis.shape
        if S == 0:
            return
        groups, T = self.ref.groups, self.ref.attn.shape[-1]
        t = torch.as_tensor(list(ts), dtype=torch.long)
        rows = self.ref.attn[:, :, t].permute(2, 0, 1, 3).reshape(S, L, Hkv, groups, T)  # [S, L, Hkv, G, T]
        idx = vis[:, :, :, None, :].expand(-1, -1, -1, groups, -1).cpu()  # [S, L, Hkv, G, m]
        self.mass += rows.gather(-1, idx).sum(-1).mean(dim=(2, 3)).sum(0).cpu()
        needed = rows >= (self.hit_ratio / (t + 1)).view(S, 1, 1, 1, 1)  # positions after t hold 0: never needed
        self.lookups += int(needed.sum())
        self.hits += int(needed.gather(-1, idx).sum())
        want = self.ref.outputs[:, t].transpose(0, 1)  # [S, L, Hq*D]
        self.error += ((outputs.cpu() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)).sum(0).cpu()
        counts = torch.zeros(S, T).scatter_add_(1, vis.reshape(S, -1).cpu(), torch.ones(S, L * Hkv * m))
        share = counts / (L * Hkv)  # [S, T]: positions after each query were never read
        self.visible[t.numpy()] = (share * 255).round().to(torch.uint8).numpy()
        self.steps += S

    def step_everything(self, ts: Sequence[int]) -> None:
        """:meth:`step` for queries ``ts`` that read every position up to themselves, as the full cache does: their
        attention outputs are the reference's own (no error), every lookup hits, every token is visible."""
        t = torch.as_tensor(list(ts), dtype=torch.long)
        if not len(t):
            return
        rows = self.ref.attn[:, :, t]  # [L, Hq, S, T]: zero after each query
        self.mass += rows.sum(-1).mean(dim=1).sum(-1).cpu()
        needed = int((rows >= (self.hit_ratio / (t + 1)).view(1, 1, -1, 1)).sum())
        self.lookups += needed
        self.hits += needed
        self.steps += len(t)

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer mean mass retained and output error (1 and 0 when no step was measured)."""
        if not self.steps:
            return torch.ones_like(self.mass), torch.zeros_like(self.error)
        return self.mass / self.steps, self.error / self.steps

    def sinks_retained(self, vis: torch.Tensor | None) -> tuple[int, int]:
        """(sink entries readable at the last step, sink entries in all) over layers and KV heads."""
        sinks = torch.tensor(self.ref.sinks, dtype=torch.long)
        total = len(sinks) * self.ref.num_layers * self.ref.num_kv_heads
        if vis is None or not len(sinks):
            return total, total
        return int(torch.isin(vis.cpu(), sinks).sum()), total
