"""Serving workloads of real text: prompts cut from the bundled model's held-out documents.

Lengths are drawn from one seeded generator: prompt lengths log-uniform between their bounds (many short
prompts, a tail of long ones, as chat traces have), output lengths uniform. A share of the requests can
start with one shared prefix (a system prompt), so prefix caching has something to hit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvcore.checks import positive_ints
from kvcore.models.loader import bundled_text


@dataclass(slots=True, frozen=True)
class ServeWorkload:
    """How many requests, how long their prompts and outputs are (tokens), and what they share.

    shared_prefix_tokens: length of the prefix that ``shared_fraction`` of the requests start with, after
    ``<bos>`` and before their own text (their drawn length). All requests arrive at once.
    """

    num_requests: int = 64
    prompt_min: int = 5
    prompt_max: int = 400
    output_min: int = 8
    output_max: int = 64
    shared_prefix_tokens: int = 0
    shared_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        positive_ints(self, "num_requests", "prompt_min", "prompt_max", "output_min", "output_max")
        if self.prompt_min > self.prompt_max or self.output_min > self.output_max:
            raise ValueError(f"length ranges need min <= max: prompts {self.prompt_min}..{self.prompt_max}, "
                             f"outputs {self.output_min}..{self.output_max}")
        if not 0.0 <= self.shared_fraction <= 1.0:
            raise ValueError(f"shared_fraction must be in [0, 1], got {self.shared_fraction}")
        if self.shared_prefix_tokens < 0:
            raise ValueError(f"shared_prefix_tokens must be >= 0, got {self.shared_prefix_tokens}")

    @property
    def longest_prompt(self) -> int:
        """Tokens in the longest prompt the workload can draw: a shared prefix comes before the drawn length."""
        return self.prompt_max + (self.shared_prefix_tokens if self.shared_fraction > 0 else 0)

    def build(self, tokenizer, text: str | None = None) -> tuple[list[list[int]], list[int]]:
        """``(prompts, output lengths)``: token-id prompts (``<bos>`` first) cut from ``text`` (default: the
        bundled held-out documents) at seeded offsets."""
        rng = np.random.default_rng(self.seed)
        body = tokenizer(bundled_text() if text is None else text, add_special_tokens=False)["input_ids"]
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        if len(body) < 2 * self.prompt_max:
            raise ValueError(f"the text holds {len(body)} tokens; prompts of up to {self.prompt_max} need more")
        logs = rng.uniform(math.log(self.prompt_min), math.log(self.prompt_max), self.num_requests)
        lengths = np.clip(np.rint(np.exp(logs)), self.prompt_min, self.prompt_max).astype(int)
        outputs = rng.integers(self.output_min, self.output_max + 1, self.num_requests).tolist()
        starts = rng.integers(0, len(body) - self.prompt_max, self.num_requests)
        shared = rng.random(self.num_requests) < self.shared_fraction
        prefix = body[len(body) - self.shared_prefix_tokens:] if self.shared_prefix_tokens else []
        prompts = [bos + (prefix if has_prefix else []) + body[start:start + n - len(bos)]
                   for n, start, has_prefix in zip(lengths.tolist(), starts.tolist(), shared.tolist(), strict=True)]
        return prompts, [int(o) for o in outputs]
