"""An eviction sweep step by step: at one budget, which tokens each policy let each query read.

Step t is the query at position t (it predicts token t + 1). For each policy run at the budget the view
holds the row t of its visibility map (the share of layers and KV heads in which query t could read each
token), beside the full cache's attention of query t (layers and heads averaged) and the sinks and heavy
hitters the detector finds in the attention up to t (:func:`kvcore.models.steps.build_view`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from kvcore.eviction.evaluate import EvictionResults
from kvcore.models.attention import AttentionPatterns
from kvcore.models.steps import StepView, build_view


def eviction_steps(results: EvictionResults, budget: int, queries: Sequence[int],
                   thresholds: AttentionPatterns | None = None) -> StepView:
    """The sweep's runs at ``budget`` (tokens) at the query positions ``queries``.

    thresholds: the detector's (default: the reference's own).
    """
    if results.attention is None:
        raise ValueError("these results carry no attention maps (summarize them from a reference)")
    maps = torch.from_numpy(results.attention).float()  # [L, T, T]
    n = maps.shape[-1]
    queries = [int(q) for q in queries]
    if not queries or min(queries) < 0 or max(queries) >= n:
        raise ValueError(f"query positions must lie in 0..{n - 1}, got {queries[:5]}...")
    runs = {key.split("@")[0]: visible for key, visible in results.visible.items()
            if key.endswith(f"@{budget}") and not key.startswith("full@")}
    if not runs:
        raise ValueError(f"no policy ran at budget {budget}")
    tokens = results.tokens["token"].tolist() if "token" in results.tokens else \
        results.tokens["token_id"].astype(str).tolist()
    steps = pd.DataFrame({"step": queries, "query": queries, "query_token": [tokens[q] for q in queries]})
    attention = maps.mean(dim=0)[queries].numpy()  # [S, T]
    held = {name: visible[queries].astype("float64") / 255.0 for name, visible in runs.items()}
    return build_view(steps, attention, held, {}, maps, thresholds or results.thresholds, tokens)
