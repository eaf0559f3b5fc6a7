"""Seeded workloads whose prompts share prefixes: multi-turn chat and RAG over Zipf-popular documents.

These are the two cases LMCache targets (multi-round QA and RAG). A prompt is a sequence of *segments*
(a system prompt, a user turn, an answer, a document), each a run of tokens with a unique id, so two
prompts share a prefix exactly when they start with the same segments. Chunk keys are chained over the
prefix (LMCache's ``ChunkedTokenDatabase``, vLLM's block hash): a chunk is reusable only after the same
prefix. Only full chunks get a key; the tail is always recomputed (vLLM caches full blocks only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvcore.checks import positive_numbers

Segment = tuple[int, int]  # (segment id, tokens)
SYSTEM_SEGMENT = 0


@dataclass(slots=True)
class Request:
    """One prompt of the workload.

    index: position in arrival order. arrival_s: seconds. session: chat session (-1 for RAG). turn: turn
    number within the session (0-based). segments: the prompt. output: the answer's segment.
    next_index: the session's next request, if any (what a prefetch would warm up).
    """

    index: int
    arrival_s: float
    session: int
    turn: int
    segments: tuple[Segment, ...]
    output: Segment
    next_index: int | None = None

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt."""
        return sum(n for _, n in self.segments)

    @property
    def output_tokens(self) -> int:
        """Tokens the answer generates."""
        return self.output[1]


def chunk_keys(segments: Sequence[Segment], chunk_tokens: int) -> list[int]:
    """Keys of the full chunks of a token sequence, each chained on the previous key (prefix hash).

    A chunk's content is the list of (segment id, start, end) pieces it covers, so equal keys mean equal
    tokens after an equal prefix.
    """
    keys: list[int] = []
    prev, pieces, filled = 0, [], 0
    for seg_id, length in segments:
        pos = 0
        while pos < length:
            take = min(length - pos, chunk_tokens - filled)
            pieces.append((seg_id, pos, pos + take))
            pos += take
            filled += take
            if filled == chunk_tokens:
                prev = hash((prev, *pieces))
                keys.append(prev)
                pieces, filled = [], 0
    return keys


def _tokens(rng: np.random.Generator, mean: int, size: int | None = None) -> np.ndarray:
    """Lengths uniform in [mean/2, 3*mean/2], at least 1."""
    return np.maximum(1, rng.integers(mean // 2, mean + mean // 2 + 1, size=size))


@dataclass(slots=True)
class ChatWorkload:
    """Multi-turn chat: sessions reuse their earlier turns, all share one system prompt.

    num_requests: requests kept (first in arrival order). session_rate: new sessions per second (Poisson).
    mean_turns: turns per session (geometric, >= 1). system_tokens, user_tokens, output_tokens: mean
    lengths (uniform +-50%). think_time_s: mean seconds between a session's turns (exponential), counted
    from one turn's arrival to the next. seed: random seed.
    """

    num_requests: int = 2000
    session_rate: float = 1.0
    mean_turns: float = 4.0
    system_tokens: int = 1024
    user_tokens: int = 200
    output_tokens: int = 300
    think_time_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        positive_numbers(self, "num_requests", "session_rate", "think_time_s", "user_tokens", "output_tokens")
        if self.mean_turns < 1:
            raise ValueError(f"ChatWorkload.mean_turns must be >= 1, got {self.mean_turns}")
        if self.system_tokens < 0:
            raise ValueError(f"ChatWorkload.system_tokens must be >= 0, got {self.system_tokens}")

    def generate(self) -> list[Request]:
        """The requests in arrival order, with each session's next turn linked."""
        rng = np.random.default_rng(self.seed)
        n_sessions = max(1, math.ceil(self.num_requests / self.mean_turns * 1.5))
        starts = np.cumsum(rng.exponential(1 / self.session_rate, n_sessions))
        rows: list[tuple[float, int, int, tuple[Segment, ...], Segment]] = []
        next_id = SYSTEM_SEGMENT + 1
        system = ((SYSTEM_SEGMENT, self.system_tokens),) if self.system_tokens else ()
        for s, start in enumerate(starts):
            turns = int(rng.geometric(1 / self.mean_turns))
            history, t = system, float(start)
            for k in range(turns):
                user = (next_id, int(_tokens(rng, self.user_tokens)))
                answer = (next_id + 1, int(_tokens(rng, self.output_tokens)))
                next_id += 2
                rows.append((t, s, k, (*history, user), answer))
                history = (*history, user, answer)
                t += float(rng.exponential(self.think_time_s))
        rows.sort(key=lambda r: r[0])
        return _link_sessions([Request(i, *r) for i, r in enumerate(rows[: self.num_requests])])


def _link_sessions(requests: list[Request]) -> list[Request]:
    last: dict[int, Request] = {}
    for r in requests:
        if r.session in last:
            last[r.session].next_index = r.index
        last[r.session] = r
    return requests


@dataclass(slots=True)
class RagWorkload:
    """RAG: each request is a system prompt, retrieved documents and a question.

    Documents are drawn by Zipf popularity (rank k has weight k^-zipf_alpha) without repeats inside a
    request, in retrieval order; only a request whose first documents match an earlier one reuses them
    as a prefix (non-prefix reuse, CacheBlend, is not modelled). request_rate: requests per second
    (Poisson). num_docs: corpus size. docs_per_request: documents per prompt. doc_tokens, query_tokens,
    output_tokens: mean lengths (documents keep one length each). seed: random seed.
    """

    num_requests: int = 2000
    request_rate: float = 2.0
    num_docs: int = 1000
    zipf_alpha: float = 1.1
    docs_per_request: int = 2
    doc_tokens: int = 1024
    system_tokens: int = 256
    query_tokens: int = 64
    output_tokens: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        positive_numbers(self, "num_requests", "request_rate", "num_docs", "zipf_alpha", "docs_per_request",
                        "doc_tokens", "query_tokens", "output_tokens")
        if self.docs_per_request > self.num_docs:
            raise ValueError(f"docs_per_request ({self.docs_per_request}) must be <= num_docs ({self.num_docs})")
        if self.system_tokens < 0:
            raise ValueError(f"RagWorkload.system_tokens must be >= 0, got {self.system_tokens}")

    def generate(self) -> list[Request]:
        """The requests in arrival order."""
        rng = np.random.default_rng(self.seed)
        weights = np.arange(1, self.num_docs + 1, dtype=float) ** -self.zipf_alpha
        weights /= weights.sum()
        doc_len = _tokens(rng, self.doc_tokens, self.num_docs)
        arrivals = np.cumsum(rng.exponential(1 / self.request_rate, self.num_requests))
        system = ((SYSTEM_SEGMENT, self.system_tokens),) if self.system_tokens else ()
        first_unique = 1 + self.num_docs
        out = []
        for i, t in enumerate(arrivals):
            docs = rng.choice(self.num_docs, size=self.docs_per_request, replace=False, p=weights)
            prompt = (*system, *((1 + int(d), int(doc_len[d])) for d in docs),
                      (first_unique + 2 * i, int(_tokens(rng, self.query_tokens))))
            out.append(Request(i, float(t), -1, 0, prompt, (first_unique + 2 * i + 1,
                                                             int(_tokens(rng, self.output_tokens)))))
        return out
