"""A retrieval probe through any cache plan: the study's retrieval column.

The study runs each method as a :class:`~kvcore.models.plan.CachePlan` (an eviction plan held at its budget, a
quantized cache, merged layers) on a model (a GQA-converted copy, say), the way it generates. The probe feeds
each needle prompt's context through the plan in one forward (an eviction plan then evicts down to its budget,
as its generation does after the prompt), then the tail and a greedy answer through the same plan, and judges
whether the needle's value appears (G. Kamradt's needle-in-a-haystack test, 2023; RULER's numeric needles,
Hsieh et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvcore.models.loader import bundled_text
from kvcore.models.plan import CachePlan, run_step
from kvcore.models.runtime import max_positions, model_device
from kvcore.needle.answer import greedy_answers, retrieved
from kvcore.needle.needles import draw_needles
from kvcore.needle.prompt import NeedlePrompt, build_prompt, corpus_ids, prompt_template


def spread_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[NeedlePrompt]:
    """``count`` needle prompts of ``length`` haystack tokens, needle ``i`` at depth ``(i + 0.5) / count`` (spread
    evenly through the haystack), the question compressed with the context."""
    corpus = corpus_ids(tokenizer, bundled_text("validation"))
    template = prompt_template(tokenizer)
    return [build_prompt(tokenizer, template, corpus, draw, length, (draw.index + 0.5) / count)
            for draw in draw_needles(count, seed)]


@torch.inference_mode()
def plan_answers(model, tokenizer, plan: CachePlan, prompts: list[NeedlePrompt], max_new_tokens: int = 8,
                 on_prompt: Callable[[int], None] | None = None) -> list[tuple[str, bool]]:
    """Each prompt through ``plan`` (see the module doc): its answer and whether it holds the needle's value.

    on_prompt: called with the prompt's haystack tokens after each prompt (a progress count).
    """
    device = model_device(model)
    limit = max_positions(model)
    longest = max((p.context.shape[1] + p.tail.shape[1] for p in prompts), default=0) + max_new_tokens
    if limit and longest > limit:
        raise ValueError(f"a needle prompt and its answer take {longest:,} tokens, more than this model's {limit:,} "
                         "positions: use shorter needle prompts")
    found = []
    for prompt in prompts:
        cache = plan.new_cache(model)
        run_step(model, cache, prompt.context.to(device), plan)
        answer = greedy_answers(model, tokenizer, cache, prompt.tail, [prompt.value], max_new_tokens, plan)[0]
        found.append((answer, retrieved(answer, prompt.value)))
        if on_prompt is not None:
            on_prompt(prompt.length)
    return found
