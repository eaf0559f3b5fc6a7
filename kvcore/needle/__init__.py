"""Needle-in-a-haystack retrieval under every eviction and quantization method of the lab.

Perplexity on running text flatters recency; retrieval does not. This package hides a fact with a random value
in a haystack of the bundled corpus (G. Kamradt's needle-in-a-haystack test, 2023; RULER's numeric needles and
answer prefix, Hsieh et al. 2024), compresses the cache as kvpress does (once after the prompt) or evicts token
by token at a budget, decodes the answer greedily and judges whether the value appears, for each method
(:mod:`kvcore.needle.methods`) against the full cache on the same haystacks.

It sits beside :mod:`kvcore.plans` in the layers: it uses both :mod:`kvcore.eviction` and :mod:`kvcore.quant`,
and the study above it reports its retrieval column.

``needles``   the shipped fact/question pairs and seeded draws      ``prompt``   a haystack with its needle
``methods``   every method by name                                 ``config``   :class:`NeedleConfig`
``compress``  caches made from one shared prefill                  ``answer``   batched greedy answers
``run``       :func:`run_needle`                                   ``tables``   rates, intervals, verdicts
``lesson``    perplexity joined with retrieval, and what they say  ``cli``      ``python -m kvcore needle``
``probe``     needles through any cache plan (the study's column)
``perplexity`` the eviction sweep's perplexity at the same budgets
"""

from kvcore.needle.config import MODES, NeedleConfig
from kvcore.needle.lesson import disagreements, join_perplexity, lessons
from kvcore.needle.methods import DEFAULT_METHODS, NeedleMethod, method_named, needle_methods
from kvcore.needle.needles import NEEDLES, Draw, Needle, draw_needles
from kvcore.needle.perplexity import perplexity_table
from kvcore.needle.prompt import QUESTION_PLACES, NeedlePrompt, build_prompt, prompt_template
from kvcore.needle.run import NeedleResults, run_needle
from kvcore.needle.tables import wilson_interval

__all__ = [
    "DEFAULT_METHODS",
    "MODES",
    "NEEDLES",
    "QUESTION_PLACES",
    "Draw",
    "Needle",
    "NeedleConfig",
    "NeedleMethod",
    "NeedlePrompt",
    "NeedleResults",
    "build_prompt",
    "disagreements",
    "draw_needles",
    "join_perplexity",
    "lessons",
    "method_named",
    "needle_methods",
    "perplexity_table",
    "prompt_template",
    "run_needle",
    "wilson_interval",
]
