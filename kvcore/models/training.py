"""Reusable pieces for training small causal LMs on the lab's corpus: data, model, schedule, loop, evaluation.

The recipe is the bundled model's (``scripts/train_bundled_model.py``): documents joined into one token
stream with ``<eos>`` after each; every training sequence starts with ``<bos>`` (a fixed first token lets
attention sinks form, StreamingLLM, Xiao et al. 2023); AdamW (betas 0.9/0.95, weight decay on matrices
only) with linear warm-up then cosine decay (the GPT-3 / Chinchilla recipe); gradient clipping at 1.0;
validation reported in bits per byte, which does not depend on the tokenizer.

Batches are drawn from an explicit seed; seed torch before :meth:`ModelSpec.build` for a fixed
initialization. Then the same call gives the same losses (tests check it).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcore.checks import positive_ints


def token_stream(tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """All documents' tokens, each followed by ``<eos>``, as one long ``[N]`` long tensor (no ``<bos>``)."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def text_bytes(docs: Sequence[str]) -> int:
    """UTF-8 bytes of the documents (the denominator of bits per byte)."""
    return sum(len(d.encode("utf-8")) for d in docs)


def batch_at(stream: torch.Tensor, starts: torch.Tensor | Sequence[int], context: int,
             bos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``<bos> s[i] .. s[i+C-2]`` and targets ``s[i] .. s[i+C-1]`` for each start i: ``[B, C]`` each.

    stream: ``[N]`` token ids. starts: B offsets with ``start + context <= N``. context: C, tokens per
    sequence with the ``<bos>`` included.
    """
    rows = torch.stack([stream[s:s + context] for s in torch.as_tensor(starts).tolist()])  # [B, C]
    inputs = torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows[:, :-1]], dim=1)  # [B, C]
    return inputs, rows


def random_starts(rng: random.Random, stream_len: int, context: int, batch: int) -> torch.Tensor:
    """``batch`` uniform random offsets for :func:`batch_at` drawn from ``rng`` (``[B]`` long)."""
    if stream_len <= context:
        raise ValueError(f"the token stream ({stream_len} tokens) must be longer than the context ({context})")
    return torch.tensor([rng.randrange(stream_len - context) for _ in range(batch)], dtype=torch.long)


@dataclass(slots=True)
class Schedule:
    """Linear warm-up over ``warmup`` steps to ``peak_lr``, then cosine decay to ``min_lr_ratio * peak_lr``.

    peak_lr: learning rate at the end of warm-up. warmup: steps of linear warm-up (0 = none).
    total_steps: steps in the run; the cosine reaches its floor at step ``total_steps``. min_lr_ratio: final / peak.
    """

    peak_lr: float = 2e-3
    warmup: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.peak_lr) and self.peak_lr > 0):
            raise ValueError(f"peak_lr must be a positive number, got {self.peak_lr!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup <= self.total_steps:
            raise ValueError(f"warmup must be in [0, total_steps={self.total_steps}], got {self.warmup}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def progress(self, step: int) -> float:
        """Fraction of the cosine part done at ``step`` (0-based), by steps."""
        return (step - self.warmup) / max(1, self.total_steps - self.warmup)

    def lr(self, step: int, progress: float | None = None) -> float:
        """Learning rate at ``step`` (0-based); ``progress`` overrides the step-based progress (e.g. by wall time)."""
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        p = min(1.0, max(0.0, self.progress(step) if progress is None else progress))
        floor = self.min_lr_ratio
        return self.peak_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only; norms and biases are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
               targets: torch.Tensor, lr: float, clip: float = 1.0) -> float:
    """One AdamW step on ``inputs`` / ``targets`` ``[B, C]`` at learning rate ``lr``; returns the loss (nats/token)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(input_ids=inputs, use_cache=False).logits  # [B, C, V]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.item())


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: torch.Tensor, context: int, bos: int, num_bytes: int,
             batch: int = 16, max_windows: int | None = None) -> dict[str, float]:
    """Validation NLL over consecutive windows of ``stream`` (each restarted with ``<bos>``).

    stream: ``[N]`` validation tokens; num_bytes: UTF-8 bytes of the text behind the whole stream (the
    windows cover ``covered`` tokens, and bytes are prorated to them). max_windows: evaluate only the
    first windows (faster, noisier). Returns ``val_nats_per_token``, ``val_bits_per_byte``, ``val_tokens``.
    Leaves the model in the train/eval mode it was in.
    """
    n_win = len(stream) // context
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    if n_win < 1:
        raise ValueError(f"the validation stream ({len(stream)} tokens) is shorter than one window of {context}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for w0 in range(0, n_win, batch):
        starts = torch.arange(w0, min(n_win, w0 + batch)) * context
        inputs, targets = batch_at(stream, starts, context, bos)
        logits = model(input_ids=inputs, use_cache=False).logits.float()  # [B, C, V]
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    covered_bytes = num_bytes * count / len(stream)  # bytes prorated to the tokens the windows cover
    return {"val_nats_per_token": total / count, "val_bits_per_byte": total / math.log(2) / covered_bytes,
            "val_tokens": float(count)}


@dataclass(slots=True)
class ModelSpec:
    """A small ``LlamaForCausalLM`` (RoPE, SwiGLU, RMSNorm, tied embeddings), as the bundled model is built.

    layers: decoder layers. hidden: model width. heads: query heads. kv_heads: key/value heads (= heads is
    MHA, 1 is MQA, a divisor in between is GQA). ffn: SwiGLU intermediate size. max_positions: RoPE
    positions allowed (``max_position_embeddings``).
    """

    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 8
    ffn: int = 688
    max_positions: int = 2048

    def __post_init__(self) -> None:
        positive_ints(self, "layers", "hidden", "heads", "kv_heads", "ffn", "max_positions")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden ({self.hidden}) must split into {self.heads} heads of an even size (RoPE)")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads}); allowed: "
                             f"{[d for d in range(1, self.heads + 1) if self.heads % d == 0]}")

    def build(self, tokenizer, attn_implementation: str = "sdpa"):
        """A freshly initialized model (seed torch first for a fixed init), special-token ids from ``tokenizer``."""
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden, intermediate_size=self.ffn,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, attention_bias=False, mlp_bias=False, initializer_range=0.02,
        )
        return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)


@dataclass(slots=True)
class TrainSettings:
    """One training run: ``steps`` AdamW steps of ``batch`` x ``context`` tokens, evaluated every ``eval_every``.

    lr: peak learning rate; warmup: warm-up steps; min_lr_ratio: final / peak lr; weight_decay: AdamW decay
    on matrices; seed: data order (and, via :func:`train`'s caller, the init). eval_windows: validation
    windows of ``context`` tokens per evaluation (None = the whole stream).
    """

    steps: int = 200
    batch: int = 8
    context: int = 256
    lr: float = 2e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_windows: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        positive_ints(self, "steps", "batch", "context", "eval_every")
        if self.context < 2:
            raise ValueError(f"context must be >= 2 tokens (<bos> + one target), got {self.context}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise ValueError(f"eval_windows must be >= 1 or None (all), got {self.eval_windows}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        self.schedule()  # validates lr, warmup and min_lr_ratio

    def schedule(self) -> Schedule:
        """The learning-rate schedule of this run."""
        return Schedule(self.lr, min(self.warmup, self.steps), self.steps, self.min_lr_ratio)


StepCallback = Callable[[int, int, float], None]  # (step done, total steps, loss)


def train(model: torch.nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor, val_bytes: int, bos: int,
          settings: TrainSettings, on_step: StepCallback | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place; return one row per step (loss, lr, training seconds) with validation on some.

    train_ids / val_ids: ``[N]`` token streams (see :func:`token_stream`). val_bytes: UTF-8 bytes behind
    ``val_ids``. Batches come from ``random.Random(settings.seed)``, so two runs with the same seed and
    the same initial weights give the same losses. Row 0 is the evaluation before any update; rows at
    multiples of ``eval_every`` and the last step carry ``val_*`` columns, the others NaN there.
    ``elapsed_s`` counts seconds spent in training steps only (evaluations excluded).
    """
    rng = random.Random(settings.seed)
    schedule = settings.schedule()
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
    no_eval = {"val_nats_per_token": math.nan, "val_bits_per_byte": math.nan, "val_tokens": math.nan}

    def validation(step: int) -> dict[str, float]:
        if step % settings.eval_every and step != settings.steps:
            return no_eval
        return evaluate(model, val_ids, settings.context, bos, val_bytes, max_windows=settings.eval_windows)

    model.train()
    rows = [{"step": 0, "tokens_seen": 0, "lr": 0.0, "train_loss": math.nan, "train_loss_ema": math.nan,
             **validation(0), "elapsed_s": 0.0}]
    ema, train_s = math.nan, 0.0
    for step in range(settings.steps):
        t0 = time.perf_counter()
        starts = random_starts(rng, len(train_ids), settings.context, settings.batch)
        inputs, targets = batch_at(train_ids, starts, settings.context, bos)
        lr = schedule.lr(step)
        loss = train_step(model, optimizer, inputs, targets, lr)
        train_s += time.perf_counter() - t0
        ema = loss if math.isnan(ema) else 0.95 * ema + 0.05 * loss
        done = step + 1
        rows.append({"step": done, "tokens_seen": done * settings.batch * settings.context, "lr": lr,
                     "train_loss": loss, "train_loss_ema": ema, **validation(done), "elapsed_s": train_s})
        if on_step is not None:
            on_step(done, settings.steps, loss)
    model.eval()
    return rows
