"""A serving request: what the client sent (``Request``) and what the scheduler tracks (``RequestState``).

Vocabulary follows the vLLM v1 scheduler: a request has ``num_tokens`` (prompt plus the output tokens
sampled so far) and ``num_computed_tokens`` (tokens whose KV is in the cache). Each step grants it
``num_tokens - num_computed_tokens`` tokens or fewer; when it catches up, one output token is sampled
and ``num_tokens`` grows by one. Prefill, decode, chunked prefill and recompute after preemption are
all this one rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvcore.checks import positive_ints

# Output token ids of a simulation start above the prompt vocabulary, so a generated block never collides
# with a prompt block by accident; the chained block hash still makes them unique per request. The i-th
# output token of every request is VOCAB_SIZE + i (the rule vLLM's recorded schedules follow too).
VOCAB_SIZE = 32_000


@dataclass(slots=True, frozen=True)
class Request:
    """One request of a workload.

    index: position in the workload (0-based, arrival order). arrival_s: seconds after the start.
    prompt_tokens / output_tokens: lengths in tokens (output_tokens is the client's max_tokens; a
    simulated request always runs to it). prefix_id: requests with the same id share their first
    ``prefix_tokens`` prompt token ids (a system prompt), so prefix caching can hit; None = no shared prefix.
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
    """Mutable scheduler state of one request (the scheduler's hot loop reads these slots directly).

    output_ids: tokens sampled so far. num_placeholders: samples in flight whose ids are not known yet
    (asynchronous scheduling); num_in_flight: scheduled tokens whose step's output is not processed yet;
    num_stale: in-flight tokens of a request preempted meanwhile. stop_token_ids: sampled tokens that end
    the request (empty: it runs to ``output_len``). seats: running slots it holds (its parallel samples
    before they are forked). What happened when is the run's business (:class:`kvcore.sched.recorder.Recorder`).
    """

    req: Request
    rid: str
    prompt_ids: list[int]
    prompt_len: int
    output_len: int
    num_tokens: int
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_placeholders: int = 0
    num_in_flight: int = 0
    num_stale: int = 0
    num_preemptions: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seats: int = 1
    swapped: bool = False
    in_prefill: bool = True
    admitted: bool = False
    finished: bool = False
    prefix_hit_tokens: int = 0
    readmit_hit_tokens: int = 0

    @classmethod
    def new(cls, req: Request, prompt_ids: list[int], stop_token_ids: tuple[int, ...] = (), seats: int = 1,
            rid: str | None = None) -> RequestState:
        """A request that has not arrived yet: nothing computed, waiting from its arrival time."""
        if len(prompt_ids) != req.prompt_tokens:
            raise ValueError(f"request {req.index}: {len(prompt_ids)} prompt ids for {req.prompt_tokens} prompt tokens")
        return cls(req, rid or req.request_id, prompt_ids, req.prompt_tokens, req.output_tokens, req.prompt_tokens,
                   stop_token_ids=stop_token_ids, seats=seats)

    @property
    def num_generated(self) -> int:
        """Output tokens sampled so far."""
        return len(self.output_ids)

    def token_ids(self, end: int) -> list[int]:
        """Known token ids of positions ``0 .. end - 1`` (prompt, then the outputs sampled so far)."""
        p = self.prompt_len
        return self.prompt_ids[:end] if end <= p else self.prompt_ids + self.output_ids[:end - p]

    def token_ids_between(self, start: int, stop: int) -> list[int | None]:
        """Token ids of positions ``start .. stop - 1``; None for samples still in flight."""
        p = self.prompt_len
        ids = self.prompt_ids[start:stop] if start < p else []
        if stop > p:
            ids += self.output_ids[max(start, p) - p:stop - p]
        return ids + [None] * (stop - start - len(ids))

    def append_output(self, token_id: int) -> bool:
        """Record a sampled token; True when it ends the request (``output_len`` reached or a stop token)."""
        self.output_ids.append(token_id)
        self.num_tokens += 1
        return len(self.output_ids) >= self.output_len or token_id in self.stop_token_ids
