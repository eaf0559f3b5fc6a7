"""The full-cache reference every eviction run is measured against: one forward over the text, everything kept.

The reference records per-token NLL, every layer's attention probabilities and attention outputs, the
full cache's bytes, every key's L2 norm, and which tokens are attention sinks or heavy hitters, by the
one detector the Live model page uses too (:func:`kvcore.models.attention.detect_patterns`): a *sink* is
a token that, in at least one layer, queries ``min_distance`` or more positions later give (on average
over them and the heads) ``sink_ratio`` times the uniform share or more, judged only when at least
``min_queries`` queries are that far (StreamingLLM, Xiao et al. 2023: sinks draw attention from far-away
queries whatever they say).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F

from kvcore.device import torch_threads
from kvcore.models.attention import AttentionPatterns, detect_patterns, far_attention_ratio
from kvcore.models.capture import attention_outputs
from kvcore.models.plan import CachePlan, StepState, run_step
from kvcore.models.runtime import attention_implementation, num_kv_heads


@dataclass(slots=True)
class Reference:
    """The text through the full cache in one forward: what every policy is compared against.

    ids: ``[1, T]`` token ids; tokens 0..T-2 are fed, 1..T-1 are predicted. nll: ``[T - 1]`` nats.
    attn: ``[L, Hq, T-1, T-1]`` attention probabilities (row = query). outputs: ``[L, T-1, Hq*D]`` attention
    outputs before the output projection. kv_bytes: bytes of the full cache. key_norms: ``[L, Hkv, T-1]``
    L2 norm of every cached key (after RoPE, what Knorm ranks). thresholds: the detector's settings.
    patterns: one row per position, :func:`~kvcore.models.attention.detect_patterns` of the head-averaged
    map of every layer (sinks: the largest far-query ratio over layers; heavy hitters: accumulated
    attention averaged over layers).
    """

    ids: torch.Tensor
    nll: torch.Tensor
    attn: torch.Tensor
    outputs: torch.Tensor
    num_kv_heads: int
    kv_bytes: int
    seconds: float
    patterns: pd.DataFrame
    key_norms: torch.Tensor | None = None
    thresholds: AttentionPatterns = field(default_factory=AttentionPatterns)

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


def _patterns(attn_all: torch.Tensor, patterns: AttentionPatterns) -> pd.DataFrame:
    """The one detector over the head-averaged map of every layer ``[L, T-1, T-1]``."""
    return detect_patterns(attn_all.mean(dim=1).cpu(), patterns)


def received_vs_uniform(ref: Reference) -> torch.Tensor:
    """Attention each key receives from every later query, over the uniform share, per layer and KV head:
    ``[L, Hkv, T-1]`` (query heads of one KV head averaged; NaN for the last key, which no later query reads)."""
    L, Hq, T, _ = ref.attn.shape
    grouped = ref.attn.reshape(L, ref.num_kv_heads, Hq // ref.num_kv_heads, T, T).mean(dim=2)  # [L, Hkv, T, T]
    return far_attention_ratio(grouped, 1)


@torch.inference_mode()
def reference_pass(model, ids: torch.Tensor, patterns: AttentionPatterns | None = None,
                   threads: int | None = 1) -> Reference:
    """Feed tokens 0..T-2 through the full cache in one forward (eager attention) and record everything.

    ids: ``[1, T]`` token ids. patterns: thresholds for sinks and heavy hitters. threads: CPU threads
    (None: leave as is).
    """
    thresholds = patterns or AttentionPatterns()
    steps: list[StepState] = []
    plan = CachePlan("full", hook=steps.append, needs_attentions=True)
    with attention_implementation(model, "eager"), attention_outputs(model) as outputs, torch_threads(threads):
        cache = plan.new_cache(model)
        start = time.perf_counter()
        logits = run_step(model, cache, ids[:, :-1], plan)  # [1, T-1, V]
        seconds = time.perf_counter() - start
    attn_all = torch.stack([a[0].float() for a in steps[0].attentions])  # [L, Hq, T-1, T-1]
    key_norms = torch.stack([layer.keys[0].float().norm(dim=-1).cpu() for layer in cache.layers])  # [L, Hkv, T-1]
    nll = F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none").cpu()
    return Reference(ids=ids, nll=nll, attn=attn_all, outputs=torch.stack([o[0] for o in outputs]),
                     num_kv_heads=num_kv_heads(model), kv_bytes=cache.nbytes, seconds=seconds,
                     patterns=_patterns(attn_all, thresholds), key_norms=key_norms, thresholds=thresholds)
