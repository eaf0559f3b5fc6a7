"""The paged-blocks stepper: a replayable list of actions over a small :class:`PagedKVCache`.

Actions (joined by '.' in the URL, so a shared link replays the same pool):
``P<i>`` prefill prompt i as a new request; ``D`` one decode step for every running request;
``C<n>`` fork request r<n> (parallel sampling); ``X<n>`` finish (free) request r<n>.
Requests are named r0, r1, ... in the order they are created.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcore.paged.cache import PagedKVCache
from kvcore.paged.tokens import Vocab, sample_word, tokenize

# Prefill prompt 0, then prompt 1 (its first block is a prefix-cache hit), two decode steps, fork r0
# (parallel sampling shares its blocks; the next write copies the shared partial block), one more step.
EXAMPLE = "P0.P1.D.D.C0.D"
DEFAULT_PROMPTS = (
    "the quick brown fox jumps over the lazy dog by the river",
    "the quick brown fox jumps over a sleepy cat",
    "once upon a time a cache kept every token",
    "once upon a time a cache kept every token it saw",
)
MAX_PROMPTS = 4
MAX_ACTIONS = 300
_ACTION = re.compile(r"P[0-3]|D|[CX]\d{1,3}")


@dataclass(slots=True)
class StepperConfig:
    """The stepper's pool and prompts.

    prompts: 1 to 4 non-empty texts. num_blocks: blocks in the pool (1..64). block_size: tokens per
    block (1..16). enable_prefix_caching: vLLM automatic prefix caching on or off.
    """

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    num_blocks: int = 16
    block_size: int = 4
    enable_prefix_caching: bool = True
    num_layers: int = 1
    num_kv_heads: int = 1
    head_dim: int = 4

    def __post_init__(self) -> None:
        if not 1 <= len(self.prompts) <= MAX_PROMPTS or not all(tokenize(p) for p in self.prompts):
            raise ValueError(f"give 1 to {MAX_PROMPTS} non-empty prompts, got {len(self.prompts)}")
        if not 1 <= self.num_blocks <= 64:
            raise ValueError(f"num_blocks must be in 1..64, got {self.num_blocks}")
        if not 1 <= self.block_size <= 16:
            raise ValueError(f"block_size must be in 1..16, got {self.block_size}")


@dataclass(slots=True)
class StepperState:
    """The pool after replaying the actions, plus what each action did."""

    cache: PagedKVCache
    vocab: Vocab
    prompt_of: dict[str, int] = field(default_factory=dict)
    parent_of: dict[str, str] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    event_action: list[int] = field(default_factory=list)  # action number (1-based) of each manager event
    next_request: int = 0

    @property
    def running(self) -> list[str]:
        return self.cache.manager.request_ids()


def parse_actions(raw: str) -> list[str]:
    """'P0.D.C0' -> ['P0', 'D', 'C0']; ValueError naming the first bad action."""
    actions = [a for a in raw.split(".") if a]
    if len(actions) > MAX_ACTIONS:
        raise ValueError(f"at most {MAX_ACTIONS} actions, got {len(actions)}")
    for i, action in enumerate(actions, 1):
        if not _ACTION.fullmatch(action):
            raise ValueError(f"action {i} {action!r} is not one of P0-P3, D, C<n>, X<n>")
    return actions


def format_actions(actions: Sequence[str]) -> str:
    return ".".join(actions)


def _prefill(state: StepperState, config: StepperConfig, index: int) -> str:
    if index >= len(config.prompts):
        raise ValueError(f"prompt {index} does not exist; there are {len(config.prompts)} prompts")
    rid = f"r{state.next_request}"
    table = state.cache.prefill(rid, state.vocab.encode(tokenize(config.prompts[index])))
    if table is None:
        return f"prefill of prompt {index} refused: not enough free blocks ({state.cache.manager.num_free_blocks})"
    state.next_request += 1
    state.prompt_of[rid] = index
    hit = state.cache.manager.num_cached_tokens(rid)
    return f"{rid}: prefill of prompt {index}, blocks {table}, {hit} tokens from the prefix cache"


def _decode(state: StepperState) -> str:
    done, stalled = [], []
    for rid in state.running:
        position = state.cache.manager.num_tokens(rid)
        word = sample_word(rid, position)
        if state.cache.decode(rid, state.vocab.encode([word])) is None:
            stalled.append(rid)
        else:
            done.append(f"{rid}+{word!r}")
    out = "decode: " + (", ".join(done) or "no running requests")
    return out + (f"; out of blocks, waiting: {', '.join(stalled)}" if stalled else "")


def _request(state: StepperState, number: str, action: str) -> str:
    rid = f"r{number}"
    if not state.cache.manager.has_request(rid):
        raise ValueError(f"{action}: request {rid} is not running (running: {', '.join(state.running) or 'none'})")
    return rid


def apply_action(state: StepperState, config: StepperConfig, action: str) -> None:
    """Apply one action to the state; ValueError if it names a prompt or request that does not exist."""
    kind, arg = action[0], action[1:]
    if kind == "P":
        message = _prefill(state, config, int(arg))
    elif kind == "D":
        message = _decode(state)
    elif kind == "C":
        parent, child = _request(state, arg, action), f"r{state.next_request}"
        state.cache.fork(parent, child)
        state.next_request += 1
        state.parent_of[child] = parent
        state.prompt_of[child] = state.prompt_of[parent]
        message = f"{child}: fork of {parent}, sharing {len(state.cache.manager.block_table(child))} blocks"
    else:
        rid = _request(state, arg, action)
        state.cache.free(rid)
        message = f"{rid}: finished, blocks freed (tail of the free queue, in reverse)"
    state.messages.append(message)


def replay(config: StepperConfig, actions: Sequence[str]) -> StepperState:
    """Build the pool from scratch and apply every action in order (same actions, same pool)."""
    cache = PagedKVCache(config.num_blocks, config.block_size, config.num_layers, config.num_kv_heads,
                         config.head_dim, config.enable_prefix_caching)
    state = StepperState(cache, Vocab())
    for number, action in enumerate(actions, 1):
        apply_action(state, config, action)
        state.event_action.extend([number] * (len(cache.manager.events) - len(state.event_action)))
    return state


def load_actions(raw: str, config: StepperConfig) -> list[str]:
    """Parse and check that the actions replay on this config; ValueError otherwise (for URL state)."""
    actions = parse_actions(raw)
    replay(config, actions)
    return actions
