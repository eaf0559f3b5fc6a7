"""A serving request: what the client sent (``Request``) and what the scheduler tracks (``RequestState``).

Vocabulary follows the vLLM v1 scheduler: a request has ``num_tokens`` (prompt plus the output tokens
sampled so far) and ``num_computed_tokens`` (tokens whose KV is in the cache). Each step grants it
``num_tokens - num_computed_tokens`` tokens or fewer; when it catches up, one output token is sampled
and ``num_tokens`` grows by one. Prefill, decode, chunked prefill and recompute after preemption are
all this one rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvcore.checks import positive_ints

# Output token ids start above the prompt vocabulary, so a generated block never collides with a prompt
# block by accident; the chained block hash still makes them unique per request.
VOCAB_SIZE = 32_000


@dataclass(slots=True, frozen=True)
class Request:
    """One request of a workload.

    index: position in the workload (0-based, arrival order). arrival_s: seconds after the start.
    prompt_tokens / output_tokens: lengths in tokens (output_tokens is the client's max_tokens; generation
    always runs to it). prefix_id: requests with the same id share their first ``prefix_tokens`` prompt
    token ids (a system prompt), so prefix caching can hit; None = no shared prefix.
    """

    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_id: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.arrival_s, int | float) and math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be a finite number of seconds >= 0, got {self.arrival_s!r}")
        positive_ints(self, "prompt_tokens", "output_tokens")
        if self.prefix_id is not None and (not isinstance(self.prefix_id, int) or self.prefix_id < 0):
            raise ValueError(f"prefix_id must be None or an integer >= 0, got {self.prefix_id!r}")

    @property
    def request_id(self) -> str:
        """The id the block manager knows the request by."""
        return f"r{self.index}"


@dataclass(slots=True, eq=False)
class RequestState:
    """Mutable scheduler state of one request (the simulator's hot loop reads these slots directly).

    Times are seconds of simulated time; ``*_step`` fields are step indices, turned into times when the
    step's duration is known. ``phase`` is one of waiting, prefill, decode, preempted (for the Gantt view).
    """

    req: Request
    rid: str
    prompt_ids: list[int]
    prompt_len: int
    output_len: int
    num_tokens: int
    num_computed_tokens: int = 0
    num_generated: int = 0
    num_preemptions: int = 0
    swapped: bool = False
    in_prefill: bool = True
    admitted: bool = False
    first_scheduled_s: float = math.nan
    first_token_s: float = math.nan
    finish_s: float = math.nan
    last_token_step: int = -1
    prefix_hit_tokens: int = 0
    readmit_hit_tokens: int = 0
    phase: str = "waiting"
    phase_start_s: float = 0.0

    @classmethod
    def new(cls, req: Request, prompt_ids: list[int]) -> RequestState:
        """A request that has not arrived yet: nothing computed, waiting from its arrival time."""
        if len(prompt_ids) != req.prompt_tokens:
            raise ValueError(f"request {req.index}: {len(prompt_ids)} prompt ids for {req.prompt_tokens} prompt tokens")
        return cls(req, req.request_id, prompt_ids, req.prompt_tokens, req.output_tokens, req.prompt_tokens,
                   phase_start_s=req.arrival_s)

    def token_ids(self, end: int) -> list[int]:
        """Token ids of positions ``0 .. end - 1`` (prompt, then the synthetic outputs sampled so far)."""
        p = self.prompt_len
        if end <= p:
            return self.prompt_ids[:end]
        return self.prompt_ids + [VOCAB_SIZE + i for i in range(end - p)]

