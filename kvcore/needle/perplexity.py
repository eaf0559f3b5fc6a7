"""The perplexity that stands beside retrieval: the eviction sweep's measurement at the needle test's budgets.

Prefill mode measures what :func:`kvcore.eviction.runner.run_prefill` measures (the first half of a text
compressed once to the budget, the second half scored through it, as kvpress evaluates), for every method from
one read of the prompt (:mod:`kvcore.needle.compress`: each policy keeps what its own plan keeps), the
continuations scored in batches; the quantizers are scored the same way. Decode mode runs the eviction sweep's
own runner (:func:`~kvcore.eviction.runner.run_policy`, the text streamed token by token at the budget).
Columns follow the eviction sweep's table (:func:`kvcore.eviction.evaluate.result_row`): ``ppl`` with its
interval, ``ppl_vs_full`` (paired, same tokens) with its interval, ``vs_full`` and ``scored_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from kvcore.device import torch_threads
from kvcore.eviction import FullCache
from kvcore.eviction.claims import run_noise
from kvcore.eviction.evaluate import result_row, sample_text
from kvcore.eviction.reference import reference_pass
from kvcore.eviction.runner import run_policy
from kvcore.models.plan import run_step
from kvcore.models.runtime import text_ids
from kvcore.needle.answer import step_mask
from kvcore.needle.compress import choose, padded_cache, quantized_cache
from kvcore.needle.config import NeedleConfig
from kvcore.needle.run import read_prefill

Progress = Callable[[int, int, str], None]


def _row(method, budget, nll: torch.Tensor, full: torch.Tensor) -> dict[str, Any]:
    return {"method": method.name, "budget": budget, "label": method.label(), "scored_tokens": len(nll),
            "ppl": math.exp(float(nll.double().mean())), **run_noise(nll, full, method.kind == "full")}


def _table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table["budget"] = pd.Series([row["budget"] for row in rows], dtype=object)  # a budget or None, never NaN
    return table


@torch.inference_mode()
def prefill_perplexity(model, ids: torch.Tensor, config: NeedleConfig) -> pd.DataFrame:
    """Every method of ``config`` at each budget: the first half of ``ids`` ``[1, N]`` compressed once (``N - 1``
    tokens fed, as the eviction sweep feeds them), the rest scored; one row per method and budget."""
    fed = ids.shape[1] - 1
    prompt_len = fed // 2
    methods = config.resolved()
    evicting = [(m, b, m.policy(config.seed)) for m in methods if m.budgeted for b in config.budgets]
    prefill, _ = read_prefill(model, ids[:, :prompt_len], any(p.needs_attention for *_, p in evicting))
    kept = choose(prefill, [p for *_, p in evicting], [m.kept(b, prompt_len) for m, b, _ in evicting])
    rest, targets = ids[:, prompt_len:fed], ids[0, prompt_len + 1:fed + 1]
    rows = [(methods[0], None, None)] + [(m, b, choice) for (m, b, _), choice in zip(evicting, kept, strict=True)]
    nlls = []
    for method, budget, choice in rows:  # one row at a time: a continuation's forward is compute-bound
        cache, readable = padded_cache(model, prefill, [choice])
        mask = step_mask(readable, rest.shape[1], cache.layers[0].keys.dtype)
        logits = run_step(model, cache, rest, attention_mask=mask)[0]  # [n, V]
        nlls.append((method, budget, F.cross_entropy(logits.float(), targets, reduction="none").cpu()))
    for method in (m for m in methods if m.kind == "quant"):
        cache, _ = quantized_cache(model, prefill, [method.quantizer()])
        logits = run_step(model, cache, rest)[0]
        nlls.append((method, None, F.cross_entropy(logits.float(), targets, reduction="none").cpu()))
    full = nlls[0][2]
    return _table([_row(method, budget, nll, full) for method, budget, nll in nlls])


def decode_perplexity(model, ids: torch.Tensor, config: NeedleConfig, progress: Progress | None = None
                      ) -> pd.DataFrame:
    """The eviction sweep's decode-mode rows (its runner, token by token) for the full cache and each eviction
    and kvpress method of ``config`` at each budget."""
    ref = reference_pass(model, ids, threads=config.threads)
    methods = config.resolved()
    specs = [(methods[0], None)] + [(m, b) for m in methods if m.budgeted for b in config.budgets]
    rows = []
    for i, (method, budget) in enumerate(specs):
        policy = method.policy(config.seed) or FullCache()
        run = run_policy(model, ref, policy, 1.0 if budget is None else budget, mode="decode",
                         threads=config.threads, budget_rule="kvpress" if method.kind == "kvpress" else "round")
        rows.append({"method": method.name, "budget": budget} | result_row(ref, run))
        if progress is not None:
            progress(i + 1, len(specs), f"perplexity: {method.name}" + ("" if budget is None else f" @ {budget}"))
    return _table(rows)


def perplexity_table(model, tokenizer, config: NeedleConfig, tokens: int = 256, text: str | None = None,
                     progress: Progress | None = None) -> pd.DataFrame:
    """The perplexity of every method of ``config`` at its budgets and in its mode, on ``tokens`` tokens of
    ``text`` (default the bundled held-out sample); ``method`` and ``budget`` name the needle table's rows (see
    the module doc). A share budget keeps the same share of the compressed half as of a needle's context."""
    ids = text_ids(model, tokenizer, sample_text() if text is None else text, tokens)
    if config.mode == "decode":
        return decode_perplexity(model, ids, config, progress)
    with torch_threads(config.threads):
        table = prefill_perplexity(model, ids, config)
    if progress is not None:
        progress(1, 1, "perplexity")
    return table
