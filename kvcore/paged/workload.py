"""Generated request lengths for the paged-memory experiments: fixed, uniform or lognormal.

The default means follow the ShareGPT statistics reported in the vLLM paper (Kwon et al. 2023,
Fig. 11: about 161 input and 338 output tokens on average); lognormal gives their long tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

LENGTH_KINDS = ("fixed", "uniform", "lognormal")


@dataclass(slots=True, frozen=True)
class LengthDistribution:
    """A distribution of token counts.

    kind: 'fixed' (always ``mean``), 'uniform' (integers in ``mean * (1 +- spread)``) or 'lognormal'
    (mean ``mean``, log-space sigma ``spread``). mean: tokens, >= 1. spread: 0..1 for uniform, 0..3
    for lognormal; ignored for fixed.
    """

    kind: str = "lognormal"
    mean: float = 256.0
    spread: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"length distribution must be one of {', '.join(LENGTH_KINDS)}, got {self.kind!r}")
        if not (math.isfinite(self.mean) and self.mean >= 1):
            raise ValueError(f"mean length must be >= 1 token, got {self.mean}")
        limit = 1.0 if self.kind == "uniform" else 3.0
        if not 0 <= self.spread <= limit:
            raise ValueError(f"spread for {self.kind} must be in 0..{limit}, got {self.spread}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` lengths (int64, each >= 1)."""
        if self.kind == "fixed":
            values = np.full(n, self.mean)
        elif self.kind == "uniform":
            low, high = self.mean * (1 - self.spread), self.mean * (1 + self.spread)
            values = rng.uniform(low, high, n)
        else:
            # E[exp(N(mu, s^2))] = exp(mu + s^2 / 2): pick mu so the mean is ``mean``.
            values = rng.lognormal(math.log(self.mean) - self.spread**2 / 2, self.spread, n)
        return np.maximum(1, np.rint(values)).astype(np.int64)


def generate_workload(num_requests: int, prompt: LengthDistribution, output: LengthDistribution,
                      max_seq_len: int, seed: int = 0) -> pd.DataFrame:
    """Requests with prompt and output lengths (tokens), clipped so prompt + output <= max_seq_len.

    Columns: request, prompt_len, output_len. Same seed, same table.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2 (one prompt and one output token), got {max_seq_len}")
    rng = np.random.default_rng(seed)
    prompt_lens = np.minimum(prompt.sample(num_requests, rng), max_seq_len - 1)
    output_lens = np.minimum(output.sample(num_requests, rng), max_seq_len - prompt_lens)
    return pd.DataFrame({"request": np.arange(num_requests), "prompt_len": prompt_lens, "output_len": output_lens})
