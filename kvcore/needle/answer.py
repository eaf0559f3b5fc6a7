"""Greedy answers through a cache, one batch row per method, judged by whether the needle's value appears."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcore.models.cache import LabCache
from kvcore.models.plan import FULL, CachePlan, run_step


@torch.inference_mode()
def greedy_answers(model, tokenizer, cache: LabCache, tail: torch.Tensor, values: Sequence[str], max_new_tokens: int,
                   plan: CachePlan = FULL) -> list[str]:
    """Feed ``tail`` ``[1, n]`` to every row of ``cache`` (one row per value), then decode greedily.

    A row stops once its text holds its value, at the end-of-sequence token, or after ``max_new_tokens``
    tokens; rows decode together until every one has stopped. plan: the plan each step runs (a decode-time
    eviction plan keeps evicting; the prefill-mode caches are fed as they are, as kvpress does).
    Returns each row's answer text (special tokens left out).
    """
    rows = len(values)
    device = cache.layers[0].keys.device
    logits = run_step(model, cache, tail.to(device).expand(rows, -1), plan)[:, -1]  # [B, V]
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
        logits = run_step(model, cache, picked[:, None], plan)[:, -1]
    return texts


def retrieved(answer: str, value: str) -> bool:
    """Whether an answer holds the needle's value (the test's only judgment)."""
    return value in answer
