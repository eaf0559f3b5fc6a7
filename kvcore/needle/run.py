"""Run a needle test: every method on every haystack, the cache compressed or evicted, the answer decoded greedily.

Prefill mode (kvpress): each prompt's context is read once with the full cache; every method's cache is made
from that one read (:mod:`kvcore.needle.compress`), then the tail (the end of the user's turn and the answer
prefix, and the question when it is not compressed) and the answer go through it. Decode mode (StreamingLLM,
H2O): each method streams the context one token per step through a cache held at the budget (a quantized
cache: each token reads the past as stored), then the tail and the answer, evicting as it goes; the full
cache reads the context at once (nothing is evicted, so it is the same cache).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from kvcore.device import torch_threads
from kvcore.eviction.hook import eviction_plan
from kvcore.models.capture import QueryCapture
from kvcore.models.loader import bundled_text
from kvcore.models.plan import FULL, CachePlan, run_step
from kvcore.models.runtime import max_positions, model_device
from kvcore.needle.answer import greedy_answers, retrieved
from kvcore.needle.compress import Prefill, choose, kept_share, padded_cache, quantized_cache
from kvcore.needle.config import NeedleConfig
from kvcore.needle.methods import NeedleMethod
from kvcore.needle.needles import draw_needles
from kvcore.needle.prompt import NeedlePrompt, build_prompt, corpus_ids, prompt_template
from kvcore.needle.tables import HAYSTACK, cell_table, summary_table
from kvcore.quant.hf_cache import quantized_plan

Progress = Callable[[int, int, str], None]
BATCH_BYTES = 512 * 2**20  # a batched cache (one row per method) holds about this much at most; more rows split


@dataclass(slots=True)
class NeedleResults:
    """What a needle test measured. runs: one row per method x budget x haystack (its answer). table: one row
    per method x budget x length x depth. summary: one row per method x budget over every haystack."""

    runs: pd.DataFrame
    table: pd.DataFrame
    summary: pd.DataFrame
    config: NeedleConfig


def _row(method: NeedleMethod, budget: Any, kept: int, answer: str, prompt: NeedlePrompt,
         choice: list[torch.Tensor] | None, held: int, full: int) -> dict[str, Any]:
    """One outcome. choice: per layer, the positions the method kept (None: every token)."""
    shares = (1.0, 1.0) if choice is None else (kept_share(choice, prompt.span), kept_share(choice, prompt.value_span))
    return {"method": method.name, "budget": budget, "label": method.label(), "kept_tokens": kept,
            "answer": answer.replace("\n", "\\n"), "retrieved": retrieved(answer, prompt.value),
            "needle_kept": shares[0], "value_kept": shares[1], "kv_bytes": held, "kv_bytes_full": full}


@torch.inference_mode()
def read_prefill(model, context: torch.Tensor, queries: bool) -> tuple[Prefill, Any]:
    """Read ``context`` ``[1, T]`` once with the full cache (capturing the queries when asked); the
    :class:`Prefill` and the full cache itself."""
    cache = FULL.new_cache(model)
    capture = QueryCapture(model) if queries else nullcontext()
    with capture:
        run_step(model, cache, context.to(model_device(model)))
    return Prefill([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                   list(capture.queries) if queries else None, cache.nbytes), cache


def _packed(sizes: list[int], token_bytes: float) -> list[list[int]]:
    """Rows in batches, largest first: a batch pads every row to its largest, and holds at most about
    :data:`BATCH_BYTES`."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * sizes[batches[-1][0]] * token_bytes <= BATCH_BYTES:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def prefill_rows(model, tokenizer, prompt: NeedlePrompt, config: NeedleConfig) -> list[dict[str, Any]]:
    """Every method on one prompt in prefill mode, from one read of its context (see the module doc)."""
    methods = config.resolved()
    T = prompt.context.shape[1]
    evicting = [(m, b, m.policy(config.seed)) for m in methods if m.budgeted for b in config.budgets]
    quantizers = [m for m in methods if m.kind == "quant"]
    prefill, _ = read_prefill(model, prompt.context, any(p.needs_attention for *_, p in evicting))
    kept = choose(prefill, [p for *_, p in evicting], [m.kept(b, T) for m, b, _ in evicting])
    rows = [(methods[0], None, None)] + [(m, b, choice) for (m, b, _), choice in zip(evicting, kept, strict=True)]
    sizes = [T if choice is None else choice[0].shape[-1] for *_, choice in rows]
    token_bytes = prefill.nbytes / T
    out: list[dict[str, Any]] = []
    for batch in _packed([T] * len(rows), token_bytes):  # every row padded to the prompt
        cache, readable = padded_cache(model, prefill, [rows[i][2] for i in batch])
        answers = greedy_answers(model, tokenizer, cache, prompt.tail, [prompt.value] * len(batch),
                                 config.max_new_tokens, readable=readable)
        for i, answer in zip(batch, answers, strict=True):
            method, budget, choice = rows[i]
            out.append(_row(method, budget, sizes[i], answer, prompt, choice, round(token_bytes * sizes[i]),
                            prefill.nbytes))
    for batch in _packed([2 * T] * len(quantizers), token_bytes):  # codes + a dequantized view
        cache, held = quantized_cache(model, prefill, [quantizers[i].quantizer() for i in batch])
        answers = greedy_answers(model, tokenizer, cache, prompt.tail, [prompt.value] * len(batch),
                                 config.max_new_tokens)
        for i, answer, nbytes in zip(batch, answers, held, strict=True):
            out.append(_row(quantizers[i], None, T, answer, prompt, None, nbytes, prefill.nbytes))
    return out


@torch.inference_mode()
def stream_context(model, context: torch.Tensor, plan: CachePlan, first: int):
    """Feed ``context`` ``[1, T]`` through ``plan``: its first ``first`` tokens in one forward, then one per step."""
    ids = context.to(model_device(model))
    cache = plan.new_cache(model)
    run_step(model, cache, ids[:, :first], plan)
    for t in range(first, ids.shape[1]):
        run_step(model, cache, ids[:, t:t + 1], plan)
    return cache


def decode_rows(model, tokenizer, prompt: NeedlePrompt, config: NeedleConfig) -> list[dict[str, Any]]:
    """Every method on one prompt in decode mode (see the module doc)."""
    methods = config.resolved()
    T = prompt.context.shape[1]
    _, full_cache = read_prefill(model, prompt.context, False)
    full_bytes = full_cache.nbytes
    answer = greedy_answers(model, tokenizer, full_cache, prompt.tail, [prompt.value], config.max_new_tokens)[0]
    out = [_row(methods[0], None, T, answer, prompt, None, full_bytes, full_bytes)]
    for method in methods[1:]:
        for budget in config.budgets if method.budgeted else (None,):
            if method.budgeted:
                k = method.kept(budget, T)
                plan, first = eviction_plan(method.policy(config.seed), k, "original"), k
            else:
                plan, first, k = quantized_plan(method.quantizer(), method.name), 1, T
            cache = stream_context(model, prompt.context, plan, first)
            held = cache.nbytes
            choice = [s.positions for s in plan.hook.states] if method.budgeted else None
            answer = greedy_answers(model, tokenizer, cache, prompt.tail, [prompt.value], config.max_new_tokens,
                                    plan)[0]
            out.append(_row(method, budget, k, answer, prompt, choice, held, full_bytes))
    return out


def _prompts(tokenizer, config: NeedleConfig, corpus_text: str | None) -> list[NeedlePrompt]:
    corpus = corpus_ids(tokenizer, bundled_text("validation") if corpus_text is None else corpus_text)
    template = prompt_template(tokenizer)
    longest = max(config.lengths)
    return [build_prompt(tokenizer, template, corpus, draw, length, depth, config.question, longest)
            for length in config.lengths for depth in config.depths
            for draw in draw_needles(config.needles, config.seed)]


def _check_positions(model, prompts: list[NeedlePrompt], config: NeedleConfig) -> None:
    limit = max_positions(model)
    longest = max(p.context.shape[1] + p.tail.shape[1] for p in prompts) + config.max_new_tokens
    if limit and longest > limit:
        raise ValueError(f"the longest prompt and answer take {longest:,} tokens, more than this model's {limit:,} "
                         "positions: use shorter lengths")


def _with_baseline(runs: pd.DataFrame, config: NeedleConfig) -> pd.DataFrame:
    """Add the full cache's outcome on the same haystack, and order rows by method, budget and haystack."""
    full = runs.loc[runs["method"] == "full", [*HAYSTACK, "retrieved"]].rename(columns={"retrieved": "retrieved_full"})
    runs = runs.merge(full, on=HAYSTACK, how="left")
    order = {m: i for i, m in enumerate(config.methods)}
    budgets = {(type(b), b): i for i, b in enumerate(config.budgets)}
    keys = runs.assign(_m=runs["method"].map(order),
                       _b=[-1 if b is None else budgets[(type(b), b)] for b in runs["budget"]])
    keys = keys.sort_values(["_m", "_b", *HAYSTACK], kind="stable").drop(columns=["_m", "_b"])
    return keys.reset_index(drop=True)


def run_needle(model, tokenizer, config: NeedleConfig | None = None, progress: Progress | None = None,
               corpus_text: str | None = None) -> NeedleResults:
    """Run the grid of ``config`` (default :class:`NeedleConfig`) on a causal LM and its tokenizer.

    progress: called as ``progress(done, total, label)`` after each haystack. corpus_text: the haystacks'
    source (default the bundled corpus's held-out documents).
    """
    config = config or NeedleConfig()
    prompts = _prompts(tokenizer, config, corpus_text)
    _check_positions(model, prompts, config)
    rows_of = prefill_rows if config.mode == "prefill" else decode_rows
    rows: list[dict[str, Any]] = []
    with torch_threads(config.threads):
        for i, prompt in enumerate(prompts):
            meta = {"length": prompt.length, "depth": prompt.depth, "needle": prompt.draw.index,
                    "needle_name": prompt.draw.needle.name, "value": prompt.value, "needle_at": prompt.needle_at,
                    "context_tokens": prompt.context.shape[1]}
            rows += [meta | row for row in rows_of(model, tokenizer, prompt, config)]
            if progress is not None:
                progress(i + 1, len(prompts), f"{prompt.length} tokens, needle at {prompt.depth:.0%}, "
                                              f"draw {prompt.draw.index + 1} of {config.needles}")
    frame = pd.DataFrame(rows)
    frame["budget"] = pd.Series([row["budget"] for row in rows], dtype=object)  # a budget or None, never NaN
    runs = _with_baseline(frame, config)
    return NeedleResults(runs, cell_table(runs), summary_table(runs, config.seed), config)
