"""Greedy answers through a cache, one batch row per method, judged by whether the needle's value appears."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcore.models.cache import LabCache
from kvcore.models.plan import FULL, CachePlan, run_step


def step_mask(readable: torch.Tensor, new: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask ``[B, 1, new, T + new]`` of ``new`` tokens fed after entries ``readable`` ``[B, T]``
    (False = padding): each reads the readable entries and the new tokens up to itself."""
    B, T = readable.shape
    allowed = torch.cat([readable[:, None, :].expand(B, new, T),
                         torch.ones(new, new, dtype=torch.bool, device=readable.device).tril().expand(B, -1, -1)],
                        dim=-1)  # [B, new, T + new]
    return torch.zeros(allowed.shape, dtype=dtype, device=readable.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def _step(model, cache: LabCache, ids: torch.Tensor, plan: CachePlan, readable: torch.Tensor | None):
    """One forward of ``ids`` ``[B, n]``; returns the last position's logits ``[B, V]`` and what is readable next."""
    if readable is None:
        return run_step(model, cache, ids, plan)[:, -1], None
    mask = step_mask(readable, ids.shape[1], cache.layers[0].keys.dtype)
    logits = run_step(model, cache, ids, plan, attention_mask=mask)[:, -1]
    return logits, torch.cat([readable, readable.new_ones(ids.shape)], dim=-1)


@torch.inference_mode()
def greedy_answers(model, tokenizer, cache: LabCache, tail: torch.Tensor, values: Sequence[str], max_new_tokens: int,
                   plan: CachePlan = FULL, readable: torch.Tensor | None = None) -> list[str]:
    """Feed ``tail`` ``[1, n]`` to every row of ``cache`` (one row per value), then decode greedily.

    A row stops once its text holds its value, at the end-of-sequence token, or after ``max_new_tokens``
    tokens; rows decode together until every one has stopped. plan: the plan each step runs (a decode-time
    eviction plan keeps evicting; the prefill-mode caches are fed as they are, as kvpress does).
    readable: ``[B, T]`` which cached entries each row may read (a padded cache); None: all of them.
    Returns each row's answer text (special tokens left out).
    """
    rows = len(values)
    device = cache.layers[0].keys.device
    logits, readable = _step(model, cache, tail.to(device).expand(rows, -1), plan, readable)  # [B, V]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    texts = [""] * rows
    done = [False] * rows
    eos = tokenizer.eos_token_id
    for step in range(max_new_tokens):
        picked = logits.argmax(dim=-1)  # [B]
        for row, token in enumerate(picked.tolist()):
            if done[row]:
                continue
            if token == eos:
                done[row] = True
                continue
            tokens[row].append(token)
            texts[row] = tokenizer.decode(tokens[row], skip_special_tokens=True)
            done[row] = values[row] in texts[row]
        if all(done) or step == max_new_tokens - 1:
            break
        logits, readable = _step(model, cache, picked[:, None], plan, readable)
    return texts


def retrieved(answer: str, value: str) -> bool:
    """Whether an answer holds the needle's value (the test's only judgment)."""
    return value in answer
