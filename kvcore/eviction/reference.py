"""The full-cache reference every eviction run is measured against: one forward over the text, everything kept.

The reference records per-token NLL, every layer's attention probabilities and attention outputs, the
full cache's bytes, and which tokens are attention sinks or heavy hitters. A *sink* is a token that, in
at least one layer, queries ``min_query`` or more positions later give (on average over them and the
heads) ``sink_ratio`` times the uniform share or more (:func:`far_attention_ratio`; thresholds from
:class:`kvcore.models.attention.AttentionPatterns`): only distant queries count, so a key attended by
its neighbours (local attention) is not mistaken for a sink (StreamingLLM, Xiao et al. 2023: sinks draw
attention from far-away queries whatever they say).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from kvcore.device import torch_threads
from kvcore.models.attention import AttentionPatterns, detect_patterns
from kvcore.models.capture import attention_outputs
from kvcore.models.plan import CachePlan, StepState, run_step
from kvcore.models.runtime import attention_implementation, num_kv_heads


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
    def num_layers(self) -> int:
        return self.attn.shape[0]

    @property
    def groups(self) -> int:
        """Query heads per KV head."""
        return self.attn.shape[1] // self.num_kv_heads

    @property
    def sinks(self) -> list[int]:
        """Positions flagged as attention sinks."""
        return self.patterns.index[self.patterns["sink"]].tolist()


def far_attention_ratio(attn: torch.Tensor, min_distance: int) -> torch.Tensor:
    """Per key j of a causal ``[T, T]`` map: mean of ``attn[t, j] / (1 / (t + 1))`` over queries t >= j + min_distance.

    1.0 = the uniform share; NaN where fewer than ``min_distance`` queries are that far (too few to judge).
    """
    T = attn.shape[0]
    q = torch.arange(T)[:, None]
    far = (q - torch.arange(T)[None, :]) >= min_distance  # [T, T]
    counts = far.sum(dim=0)  # [T]
    ratio = (attn.float() * (q + 1) * far).sum(dim=0) / counts.clamp_min(1)
    return ratio.masked_fill(counts < max(1, min_distance), float("nan"))


def _patterns(attn_all: torch.Tensor, patterns: AttentionPatterns) -> pd.DataFrame:
    """Heavy hitters of the layer- and head-averaged map; sinks by the far-query ratio of any layer."""
    per_layer = attn_all.mean(dim=1).cpu()  # [L, T-1, T-1]
    table = detect_patterns(per_layer.mean(dim=0), patterns).drop(columns=["received_vs_uniform", "sink"])
    far = torch.stack([far_attention_ratio(a, patterns.min_query) for a in per_layer])  # [L, T-1]
    table["far_vs_uniform_max_layer"] = far.nan_to_num(0.0).amax(dim=0).tolist()
    table["sink"] = table["far_vs_uniform_max_layer"] >= patterns.sink_ratio
    return table


@torch.inference_mode()
def reference_pass(model, ids: torch.Tensor, patterns: AttentionPatterns | None = None,
                   threads: int | None = 1) -> Reference:
    """Feed tokens 0..T-2 through the full cache in one forward (eager attention) and record everything.

    ids: ``[1, T]`` token ids. patterns: thresholds for sinks and heavy hitters. threads: CPU threads
    (None: leave as is).
    """
    steps: list[StepState] = []
    plan = CachePlan("full", hook=steps.append, needs_attentions=True)
    with attention_implementation(model, "eager"), attention_outputs(model) as outputs, torch_threads(threads):
        cache = plan.new_cache(model)
        start = time.perf_counter()
        logits = run_step(model, cache, ids[:, :-1], plan)  # [1, T-1, V]
        seconds = time.perf_counter() - start
    attn_all = torch.stack([a[0].float() for a in steps[0].attentions])  # [L, Hq, T-1, T-1]
    nll = F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none").cpu()
    return Reference(ids=ids, nll=nll, attn=attn_all, outputs=torch.stack([o[0] for o in outputs]),
                     num_kv_heads=num_kv_heads(model), kv_bytes=cache.nbytes, seconds=seconds,
                     patterns=_patterns(attn_all, patterns or AttentionPatterns()))
