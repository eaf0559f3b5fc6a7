"""A needle-in-a-haystack prompt: a haystack of ``length`` tokens with the needle at ``depth``, then the question.

Follows G. Kamradt's needle-in-a-haystack test (2023): the needle goes at a depth of the context, moved back
to the end of the sentence before it, and the model is asked for it; the answer starts with RULER's answer
prefix (Hsieh et al. 2024). An instruct model gets its own chat template (the haystack and the question in
one user turn, then the assistant's turn); a model without one gets plain text ("Question: ... Answer: ...").

The prompt comes in two parts, as kvpress feeds it: ``context`` (compressed in prefill mode) and ``tail``
(fed after compression, never compressed). Where the question goes is a setting: ``"compressed"`` puts it
at the end of the context, so a policy that scores tokens by the attention of the last queries (SnapKV, Li
et al. 2024) sees it, as in SnapKV's own evaluation and kvpress's ``compress_questions``; ``"after"`` feeds
it after compression, as kvpress's pipeline does by default (question-agnostic compression). The tail
always holds the end of the user's turn and the answer prefix, so the first answer token is computed
through the compressed cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcore.needle.needles import Draw

QUESTION_PLACES = ("compressed", "after")
SNAP_TOKENS = 64  # how far back the needle may move to start after a sentence or a line
_HAY, _QUESTION = "\x00HAYSTACK\x00", "\x00QUESTION\x00"


@dataclass(slots=True, frozen=True)
class Template:
    """How a tokenizer's prompt is laid out around the haystack and the question.

    head: ids before the haystack (the chat template's system and user headers, or ``<bos>``).
    before_question: text between the haystack and the question. after_question: text between the question
    and the answer prefix (the end of the user's turn and the assistant's header). chat: from a chat template.
    """

    head: tuple[int, ...]
    before_question: str
    after_question: str
    chat: bool


def prompt_template(tokenizer) -> Template:
    """The tokenizer's chat template split around the haystack and the question, or plain text when it has none."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _HAY + "\n\n" + _QUESTION}],
                                                 tokenize=False, add_generation_prompt=True)
        if rendered.count(_HAY) == 1 and rendered.count(_QUESTION) == 1:
            head, rest = rendered.split(_HAY)
            between, after = rest.split(_QUESTION)
            return Template(tuple(tokenizer(head, add_special_tokens=False)["input_ids"]), between, after, True)
    head = tokenizer("", add_special_tokens=True)["input_ids"]  # <bos> where the tokenizer adds one
    return Template(tuple(head), "\n\nQuestion: ", "\nAnswer:", False)


@dataclass(slots=True)
class NeedlePrompt:
    """One prompt. context: ids ``[1, T]``; tail: ids ``[1, n]`` fed after compression. span: the needle's
    token positions ``[start, stop)`` in ``context``; value_span: those of its value. length: haystack tokens,
    needle included. depth: the depth asked for; needle_at: where the needle starts in the haystack (tokens)."""

    context: torch.Tensor
    tail: torch.Tensor
    span: tuple[int, int]
    draw: Draw
    length: int
    depth: float
    needle_at: int
    value_span: tuple[int, int] = (0, 0)

    @property
    def value(self) -> str:
        """What a correct answer contains."""
        return self.draw.value


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def snap_back(tokenizer, ids: Sequence[int], at: int) -> int:
    """The insertion point at or before ``at`` that follows a token ending a sentence or a line (``.`` or a
    newline), looking back at most :data:`SNAP_TOKENS` tokens; ``at`` itself when none is found."""
    for i in range(at, max(0, at - SNAP_TOKENS) - 1, -1):
        if i == 0:
            return 0
        piece = tokenizer.decode([ids[i - 1]])
        if piece.endswith((".", "\n")):
            return i
    return at


def build_prompt(tokenizer, template: Template, corpus: Sequence[int], draw: Draw, length: int, depth: float,
                 question: str = "compressed", longest: int | None = None) -> NeedlePrompt:
    """The prompt for ``draw`` with a haystack of ``length`` tokens and its needle at ``depth`` (0 = first token).

    corpus: the haystack's source, token ids. longest: the longest haystack of the grid (default ``length``):
    the haystack starts at ``draw.start`` of the room that one leaves, so every length reads the same text.
    question: ``"compressed"`` (in the context) or ``"after"`` (in the tail).
    """
    if question not in QUESTION_PLACES:
        raise ValueError(f"question must be one of {QUESTION_PLACES}, got {question!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1] (a share of the haystack), got {depth!r}")
    before, after = draw.needle.fact.split("{value}")
    lead, value = _ids(tokenizer, "\n" + before.rstrip()), _ids(tokenizer, " " + draw.value)
    fact = lead + value + _ids(tokenizer, after + "\n")
    filler_len = length - len(fact)
    longest = max(length, longest or length)
    if filler_len < 1:
        raise ValueError(f"a haystack of {length} tokens cannot hold the {len(fact)}-token needle; use a longer one")
    if longest - len(fact) > len(corpus):
        raise ValueError(f"the corpus holds {len(corpus):,} tokens, fewer than a {longest:,}-token haystack needs")
    start = int(draw.start * (len(corpus) - (longest - len(fact))))
    filler = list(corpus[start:start + filler_len])
    at = snap_back(tokenizer, filler, round(depth * filler_len))
    haystack = filler[:at] + fact + filler[at:]
    asked = _ids(tokenizer, template.before_question + draw.needle.question)
    answer = _ids(tokenizer, template.after_question + " " + draw.needle.answer_prefix) if not template.chat else \
        _ids(tokenizer, template.after_question + draw.needle.answer_prefix)
    head = list(template.head)
    context = head + haystack + (asked if question == "compressed" else [])
    tail = ([] if question == "compressed" else asked) + answer
    span = (len(head) + at, len(head) + at + len(fact))
    value_span = (span[0] + len(lead), span[0] + len(lead) + len(value))
    return NeedlePrompt(torch.tensor([context]), torch.tensor([tail]), span, draw, length, depth, at, value_span)


def corpus_ids(tokenizer, text: str) -> list[int]:
    """The haystack corpus as token ids (no special tokens)."""
    return _ids(tokenizer, text)
