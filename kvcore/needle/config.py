"""The settings of a needle test: which methods at which budgets, which haystacks, how the cache is compressed."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from kvcore.eviction import Budget, resolve_budget
from kvcore.needle.methods import DEFAULT_METHODS, NeedleMethod, method_named
from kvcore.needle.prompt import QUESTION_PLACES

MODES = ("prefill", "decode")
MAX_LENGTH = 32_768
MAX_NEEDLES = 64
MAX_NEW_TOKENS = 64


@dataclass(slots=True, frozen=True)
class NeedleConfig:
    """One needle test (a grid: methods x budgets x lengths x depths, ``needles`` draws per cell).

    methods: names of :func:`~kvcore.needle.methods.needle_methods` (``full`` is always run: the baseline).
    budgets: tokens kept (int >= 1) or a share of the context (float in (0, 1]), for eviction and kvpress
    methods. lengths: haystack tokens, needle included (the prompt adds the template and the question).
    depths: where the needle goes, a share of the haystack (0 = its first token, 1 = its end). needles:
    draws (needle, value, haystack) per length and depth, the same draws in every cell. mode: ``"prefill"``
    (compress the context once after it is read, as kvpress does) or ``"decode"`` (the context streamed one
    token at a time through a cache held at the budget, as StreamingLLM and H2O do). question:
    ``"compressed"`` (part of the compressed context) or ``"after"`` (fed after compression); prefill mode
    only. max_new_tokens: the answer's length limit (it stops early once the value appears). seed: the draws
    and the random policy. threads: CPU threads while it runs (None: as they are).
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    budgets: tuple[Budget, ...] = (0.25,)
    lengths: tuple[int, ...] = (256, 512)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    needles: int = 2
    mode: str = "prefill"
    question: str = "compressed"
    max_new_tokens: int = 8
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        names = [method_named(m).name for m in self.methods]  # raises on an unknown name
        object.__setattr__(self, "methods", tuple(dict.fromkeys(["full", *names])))
        # 1 (one token) and 1.0 (everything) are equal keys of a dict: keep both
        object.__setattr__(self, "budgets", tuple({(type(b), b): b for b in self.budgets}.values()))
        object.__setattr__(self, "lengths", tuple(dict.fromkeys(self.lengths)))
        object.__setattr__(self, "depths", tuple(dict.fromkeys(self.depths)))
        if any(method_named(m).budgeted for m in self.methods) and not self.budgets:
            raise ValueError("eviction and kvpress methods need at least one budget")
        for budget in self.budgets:
            resolve_budget(budget, 1 << 30)  # raises on a bad budget, naming what is allowed
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, numbers.Integral)
                                   or not 32 <= n <= MAX_LENGTH for n in self.lengths):
            raise ValueError(f"lengths must be integers in 32..{MAX_LENGTH:,} (haystack tokens), got {self.lengths}")
        if not self.depths or any(isinstance(d, bool) or not isinstance(d, numbers.Real) or not math.isfinite(d)
                                  or not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be shares of the haystack in [0, 1], got {self.depths}")
        for name, value, high in (("needles", self.needles, MAX_NEEDLES),
                                  ("max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer in 1..{high}, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.question not in QUESTION_PLACES:
            raise ValueError(f"question must be one of {QUESTION_PLACES}, got {self.question!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be None (as they are) or an integer >= 1, got {self.threads!r}")

    def resolved(self) -> list[NeedleMethod]:
        """The methods, ``full`` first."""
        return [method_named(m) for m in self.methods]

    @property
    def haystacks(self) -> int:
        """Prompts the grid reads: lengths x depths x needles."""
        return len(self.lengths) * len(self.depths) * self.needles

    @property
    def prompt_tokens(self) -> int:
        """Haystack tokens the grid reads in all (each prompt adds its template and question)."""
        return sum(self.lengths) * len(self.depths) * self.needles
