"""What a client asks of the engine and what it gets back, named as vLLM's offline API names them.

``SamplingParams`` (``vllm/sampling_params.py``), ``RequestOutput`` and ``CompletionOutput``
(``vllm/outputs.py``), and the run's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How one request is sampled.

    max_tokens: output tokens at most (>= 1). temperature: 0 = greedy (argmax), else sampling from
    softmax(logits / temperature). n: parallel samples of the prompt (its blocks are forked). seed: the
    request's sampling seed (None: the engine's request index). ignore_eos: run to ``max_tokens`` even past
    the model's end-of-sequence token.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    n: int = 1
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, int | float) and 0.0 <= self.temperature <= 10.0):
            raise ValueError(f"temperature must be in [0, 10] (0 = greedy), got {self.temperature!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1 (parallel samples), got {self.n!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be None or an integer, got {self.seed!r}")


@dataclass(slots=True)
class CompletionOutput:
    """One sample of a request: its index among the n, the generated ids, and why it stopped (length / stop)."""

    index: int
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass(slots=True)
class RequestOutput:
    """A request as the engine finished it: prompt ids, prompt tokens served from the prefix cache at its first
    admission, and its n completions."""

    request_id: str
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False


@dataclass(slots=True)
class EngineStats:
    """What a run did and cost.

    steps: engine steps. preemptions: requests preempted (recomputed later). prefix_cache_hit_tokens: tokens
    served from the prefix cache at every admission. model_tokens: tokens the model actually processed.
    peak_blocks_used: most blocks held at once. timeline: one row per step (the simulator's timeline
    columns, ``step_s`` measured on this machine: schedule + model + sampling).
    """

    steps: int = 0
    preemptions: int = 0
    prefix_cache_hit_tokens: int = 0
    model_tokens: int = 0
    peak_blocks_used: int = 0
    timeline: pd.DataFrame = field(default_factory=pd.DataFrame)
