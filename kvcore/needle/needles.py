"""The needles that ship with the lab, and seeded draws of needle, value and haystack.

A needle is a fact with a value the model cannot know in advance (a random five-digit number, RULER's
"magic number" needle: Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"), the question that asks for it, and the answer's first words (RULER's answer prefix),
so greedy decoding goes straight to the value and a few tokens decide the test. The haystack is running
text from the bundled corpus (Python's documentation, PSF license), as G. Kamradt's needle-in-a-haystack
test (2023) hides its needle in essays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VALUE_LOW, VALUE_HIGH = 10_000, 100_000  # values are five-digit numbers


@dataclass(slots=True, frozen=True)
class Needle:
    """A fact/question pair. fact: a sentence with ``{value}`` where the value goes. question: asks for it.
    answer_prefix: the answer's first words, which the model continues with the value."""

    name: str
    fact: str
    question: str
    answer_prefix: str

    def __post_init__(self) -> None:
        if self.fact.count("{value}") != 1:
            raise ValueError(f"needle {self.name!r}: the fact must hold '{{value}}' exactly once, got {self.fact!r}")
        if not self.question.strip() or not self.answer_prefix.strip():
            raise ValueError(f"needle {self.name!r} needs a question and an answer prefix")


NEEDLES: tuple[Needle, ...] = (
    Needle("vault", "The secret passcode for the vault is {value}.",
           "What is the secret passcode for the vault?", "The secret passcode for the vault is"),
    Needle("lighthouse", "The special magic number for the blue lighthouse is {value}.",
           "What is the special magic number for the blue lighthouse?",
           "The special magic number for the blue lighthouse is"),
    Needle("locker", "The combination of Alice's locker is {value}.",
           "What is the combination of Alice's locker?", "The combination of Alice's locker is"),
    Needle("server", "The access code for the staging server is {value}.",
           "What is the access code for the staging server?", "The access code for the staging server is"),
    Needle("train", "The ticket number for the night train to Vienna is {value}.",
           "What is the ticket number for the night train to Vienna?",
           "The ticket number for the night train to Vienna is"),
)


@dataclass(slots=True, frozen=True)
class Draw:
    """One draw: which needle, its value, and where its haystack starts in the corpus (a fraction of the room
    left after the longest haystack, so one draw gives every length the same beginning)."""

    index: int
    needle: Needle
    value: str
    start: float

    @property
    def fact(self) -> str:
        """The needle's sentence with its value."""
        return self.needle.fact.format(value=self.value)


def draw_needles(count: int, seed: int = 0) -> list[Draw]:
    """``count`` draws, seeded: needles cycle through :data:`NEEDLES` in a seeded order, each value and haystack
    start drawn at random from a generator of its own (the same seed, the same draws; draw ``i`` is the same
    whatever the count)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of needles must be an integer >= 1, got {count!r}")
    order = np.random.default_rng(seed).permutation(len(NEEDLES))
    draws = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        value, start = int(rng.integers(VALUE_LOW, VALUE_HIGH)), float(rng.random())
        draws.append(Draw(i, NEEDLES[int(order[i % len(NEEDLES)])], str(value), start))
    return draws
