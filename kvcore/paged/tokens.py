"""Text to token ids for the paged-blocks stepper: whitespace words for now.

Kept behind :func:`tokenize` so a real tokenizer (the bundled model's) can replace it in one place.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

# Words the stepper "generates" in decode steps (a stand-in for sampling from a model).
GENERATED_WORDS = ("and", "then", "the", "cache", "grew", "one", "block", "at", "a", "time", "while",
                   "tokens", "kept", "coming", "in", "order", "so", "memory", "stayed", "paged")


def tokenize(text: str) -> list[str]:
    """Split text into token strings (whitespace-separated words)."""
    return text.split()


class Vocab:
    """Token string <-> id, ids given in order of first appearance (deterministic for a replay)."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._words: list[str] = []

    def encode(self, words: Sequence[str]) -> list[int]:
        ids = []
        for word in words:
            if word not in self._ids:
                self._ids[word] = len(self._words)
                self._words.append(word)
            ids.append(self._ids[word])
        return ids

    def decode(self, token_id: int) -> str:
        return self._words[token_id] if 0 <= token_id < len(self._words) else ""


def sample_word(request_id: str, position: int, seed: int = 0) -> str:
    """The word a request "samples" at a position: fixed per (request, position, seed), differs across forks."""
    return GENERATED_WORDS[zlib.crc32(f"{seed}:{request_id}:{position}".encode()) % len(GENERATED_WORDS)]
