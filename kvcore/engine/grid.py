"""A designed grid of engine steps timed on this machine: what :func:`kvcore.engine.calibrate_engine` fits.

As Vidur (Agrawal et al., MLSys 2024) profiles a serving engine's operators over a designed set of inputs
instead of whatever one run happened to contain, the grid covers decode batches from 1 sequence to the
largest at short to long contexts, prefill chunks of a few to hundreds of tokens with and without a cached
prefix, and mixed steps (decodes beside a prefill chunk). Each grid step is fed straight to the engine's
model runner (the K/V values in the pools do not change the work), timed ``repeats`` times in rounds of a
fresh random order, so a load that comes and goes is spread over every step. What the engine does around
the runner (scheduling, blocks, sampling, and what a real run pays that a repeated grid step does not) is
measured on one real engine run of random prompts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kvcore.device import torch_threads
from kvcore.engine.engine import LLMEngine
from kvcore.engine.params import SamplingParams
from kvcore.engine.runner import ModelRunner, SequenceChunk
from kvcore.sched.cost import prefill_pairs

FEATURES = ("new_tokens", "sequences", "prefill_seqs", "attn_pairs", "kv_tokens_read", "small_tokens", "eager_steps")
SMALL_ROWS = 8  # a step's first rows: GEMMs over a few rows cost more per row (the fit may also give this term 0)
PREFILLS = (8, 32, 128, 256, 512)
LIKE_STEPS_S, LIKE_STEPS_MAX = 8e-3, 10  # like steps before a timed one: for this long, at least one, at most 10
GRID_WORK = 4e10  # parameters x tokens of the largest prefill chunk timed (512 tokens of a 78M-parameter model)
Progress = Callable[[float, str], None]


@dataclass(slots=True, frozen=True)
class GridStep:
    """One step of the grid: ``(cached tokens, new tokens)`` per sequence; kind: decode, prefill or mixed."""

    kind: str
    chunks: tuple[tuple[int, int], ...]

    def features(self) -> dict[str, int]:
        """The step's work in the simulator's terms (a sequence feeding one token after a context decodes)."""
        prefill = [(c, n) for c, n in self.chunks if not (n == 1 and c > 0)]
        new = sum(n for _, n in self.chunks)
        return {"new_tokens": new, "sequences": len(self.chunks), "prefill_seqs": len(prefill),
                "attn_pairs": sum(prefill_pairs(n, c) for c, n in self.chunks),
                "kv_tokens_read": sum(c for c, _ in self.chunks), "small_tokens": min(new, SMALL_ROWS),
                "eager_steps": int(bool(prefill))}


def largest_chunks(num_params: int, prefills: Sequence[int] = PREFILLS) -> tuple[int, ...]:
    """The prefill chunk sizes worth timing for a model of ``num_params``: up to :data:`GRID_WORK` (a bigger
    model's largest chunks take seconds; the fit's per-token term carries to them)."""
    return tuple(n for n in prefills if n * num_params <= GRID_WORK) or tuple(prefills[:1])


def design(max_seqs: int = 32, contexts: Sequence[int] = (16, 128, 512, 1024),
           prefills: Sequence[int] = PREFILLS, max_kv_tokens: int = 16384) -> list[GridStep]:
    """The grid: decode batches of 1, 2, 4... ``max_seqs`` at each context (at most ``max_kv_tokens`` read),
    one prefill chunk of each size from scratch and after 256 or 1,024 cached tokens, 2, 4 and 8 chunks in one
    step, and decodes beside a chunk."""
    steps = []
    batch = 1
    while batch <= max_seqs:
        steps += [GridStep("decode", ((c, 1),) * batch) for c in contexts if batch * c <= max_kv_tokens]
        batch *= 2
    steps += [GridStep("prefill", ((cached, n),)) for n in prefills for cached in (0, 256, 1024)]
    for chunks in (2, 4, 8):  # several prompts prefilled in one step (whole prompts, or the first chunks)
        steps += [GridStep("prefill", ((0, n),) * chunks) for n in prefills[1:3] if chunks <= max_seqs]
    for seqs in {min(4, max_seqs), max_seqs}:
        steps += [GridStep("mixed", ((256, 1),) * (seqs - 1) + ((0, n),)) for n in prefills[1::2]]
    return steps


def time_grid(model, steps: Sequence[GridStep], block_size: int = 16, repeats: int = 3, threads: int | None = None,
              pool_bytes: float = 256e6, seed: int = 0, progress: Progress | None = None,
              turn: Callable[[], AbstractContextManager] = nullcontext) -> pd.DataFrame:
    """Each grid step's seconds on the model runner: median, quartiles and repeats; one row per step with its
    :data:`FEATURES`. In each of ``repeats`` rounds every step runs again after like steps (the same step, for at
    least :data:`LIKE_STEPS_S` and at most :data:`LIKE_STEPS_MAX` times) and that run is timed: in a real run a
    step follows many of nearly the same shape (the same sequences, one token on), so the caches hold what the last
    step left, and for a small model all of its weights and K/V stay in the CPU's last-level cache between such
    steps, where a step after an unlike one reads them from memory. A bundled-model decode step of one sequence
    took 1.2-1.7 ms right after a 512-token prefill and came down to 0.6 ms over 8-10 like steps. The pools take
    at most ``pool_bytes`` (sequences beyond share blocks). turn: entered around each step (an app takes its
    shared model's lock there, so that other users of the model go between steps, never during one)."""
    per_block = block_bytes(model, block_size)
    runner = ModelRunner(model, max(16, int(pool_bytes // per_block)), block_size)
    rng, vocab = random.Random(seed), runner.parts.embed.num_embeddings
    times: list[list[float]] = [[] for _ in steps]
    with torch_threads(threads):
        for r in range(repeats):
            order = list(range(len(steps)))
            rng.shuffle(order)
            for done, i in enumerate(order):
                chunks = _chunks(steps[i], runner, block_size, vocab, rng)
                with turn():
                    _like_steps(runner, chunks)  # (in round 1, also the warm-up)
                    start = time.perf_counter()
                    runner.execute(chunks)
                    times[i].append(time.perf_counter() - start)
                if progress is not None:
                    progress((r * len(steps) + done + 1) / (repeats * len(steps)),
                             f"timing a grid of {len(steps)} engine steps (round {r + 1} of {repeats})")
    rows = []
    for step, ts in zip(steps, times, strict=True):
        q1, median, q3 = np.percentile(ts, [25, 50, 75])
        rows.append({"kind": step.kind, **step.features(), "seconds": median, "q1": q1, "q3": q3,
                     "repeats": len(ts)})
    return pd.DataFrame(rows)


def _like_steps(runner: ModelRunner, chunks: list[SequenceChunk]) -> None:
    """The step once, then again until :data:`LIKE_STEPS_S` have passed or it ran :data:`LIKE_STEPS_MAX` times."""
    start = time.perf_counter()
    for _ in range(LIKE_STEPS_MAX):
        runner.execute(chunks)
        if time.perf_counter() - start >= LIKE_STEPS_S:
            return


def block_bytes(model, block_size: int) -> float:
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2.0 * cfg.num_hidden_layers * heads * head_dim * block_size * next(model.parameters()).element_size()


def _chunks(step: GridStep, runner: ModelRunner, block_size: int, vocab: int, rng: random.Random
            ) -> list[SequenceChunk]:
    """The step's sequences with random tokens and block tables walking the pool (block 0, the null block,
    never used; a grid bigger than the pool wraps around)."""
    usable, cursor, chunks = runner.num_blocks - 1, rng.randrange(runner.num_blocks - 1), []
    for i, (cached, new) in enumerate(step.chunks):
        blocks = -(-(cached + new) // block_size)
        table = [1 + (cursor + j) % usable for j in range(blocks)]
        cursor += blocks
        chunks.append(SequenceChunk(f"g{i}", [rng.randrange(vocab) for _ in range(new)], cached, table))
    return chunks


def time_engine_run(model, block_size: int = 16, max_seqs: int = 32, threads: int | None = None,
                    requests: int = 96, seed: int = 0, between_steps: Callable[[], None] | None = None
                    ) -> pd.DataFrame:
    """A real engine run of ``requests`` random prompts (8-256 tokens, 4-48 outputs; fewer and shorter for a
    big model, whose steps take longer) as its timeline: one row per step with :data:`FEATURES` and
    ``seconds``. What a step costs beyond its model work (scheduling, blocks, sampling, Python's garbage
    collector, caches that other steps left cold) shows here and nowhere in the grid. between_steps: called after
    every step, off the run's clock (an app's background thread pauses there while a page runs)."""
    params = sum(p.numel() for p in model.parameters())
    scale = min(1.0, GRID_WORK / (512 * params))  # the bundled model: 1; SmolLM2: about a third
    requests, longest = max(8, int(requests * scale)), max(32, int(256 * scale))
    engine = LLMEngine(model, num_blocks=requests * (longest + 48) // block_size + requests + 1,
                       block_size=block_size, max_num_seqs=max_seqs, max_num_batched_tokens=max(512, max_seqs),
                       threads=threads)
    rng = np.random.default_rng(seed)
    vocab = engine.vocab_size
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(8, longest + 1, requests)]
    params_each = [SamplingParams(max_tokens=int(n), ignore_eos=True) for n in rng.integers(4, 49, requests)]
    engine.generate(prompts, params_each, on_step=None if between_steps is None else lambda _: between_steps())
    steps = engine.stats.timeline
    return pd.DataFrame({"new_tokens": steps["batch_tokens"], "sequences": steps["sequences"],
                         "prefill_seqs": steps["prefill_seqs"], "attn_pairs": steps["attn_pairs"],
                         "kv_tokens_read": steps["kv_tokens_read"],
                         "small_tokens": steps["batch_tokens"].clip(upper=SMALL_ROWS),
                         "eager_steps": (steps["prefill_seqs"] > 0).astype(int), "seconds": steps["step_s"]})
