"""Convert a trained multi-head model to grouped-query attention by mean-pooling its K/V heads, then uptrain.

Follows GQA (Ainslie et al. 2023, section 2.1, "Uptraining"): to turn a multi-head checkpoint into a
GQA one with ``G`` groups, the key and value projection matrices of the heads in each group are
mean-pooled into one head; the model is then trained briefly (the paper uses 5% of the pre-training
steps) so it adapts to the shared heads. Groups are consecutive heads, matching transformers'
``repeat_kv``: KV head ``g`` serves query heads ``g * Hq/G .. (g + 1) * Hq/G - 1``.

RoPE is applied per head after the projection and is linear, so the rotated key of the pooled head
equals the mean of the rotated keys of the original heads: pooling the projection weights is exactly
pooling each token's keys and values. With ``G`` equal to the KV head count nothing changes (the test
suite checks the logits match).

Works on any transformers decoder whose attention has separate ``k_proj`` / ``v_proj`` linears and a
``num_key_value_heads`` setting (Llama, Mistral, Qwen2, SmolLM...); biases of ``k_proj`` / ``v_proj``,
where present, are pooled the same way. The original model is never modified.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from kvcore.models.corpus import build_corpus
from kvcore.models.loader import bundled_documents, model_shape
from kvcore.models.plan import FULL, run_step
from kvcore.models.runtime import model_device, text_config
from kvcore.models.training import TrainSettings, evaluate, text_bytes, token_stream, train
from kvcore.shapes import kv_bytes

DATA_SOURCES = ("bundled", "corpus")
_KV_PROJ = re.compile(r"(^|\.)(k_proj|v_proj)\.(weight|bias)$")
ProgressCallback = Callable[[float, str], None]  # (fraction done 0..1, what is running)


def check_poolable(model) -> int:
    """The model's KV head count; ValueError when it is not a Llama-family model with separate K/V projections."""
    cfg = text_config(model)
    names = [n for n, _ in model.named_parameters() if _KV_PROJ.search(n)]
    if getattr(cfg, "num_key_value_heads", None) is None or not names:
        raise ValueError(
            f"{type(model).__name__} cannot be converted to GQA here: it needs attention modules with separate "
            "k_proj / v_proj linears and a num_key_value_heads setting (LlamaForCausalLM, Mistral, Qwen2, "
            "SmolLM...); fused projections such as GPT-2's c_attn are not supported")
    return int(cfg.num_key_value_heads)


def valid_groups(model_or_heads) -> list[int]:
    """KV head counts a model (or a head count) can be pooled to: the divisors of its KV heads, largest first."""
    heads = model_or_heads if isinstance(model_or_heads, int) else check_poolable(model_or_heads)
    return [g for g in range(heads, 0, -1) if heads % g == 0]


def _pool(t: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Mean of each group of consecutive heads of a K/V projection weight ``[H*D, in]`` or bias ``[H*D]``."""
    rest = t.shape[1:]
    per_head = t.reshape(groups, heads // groups, head_dim, *rest)  # [G, H/G, D, (in)]
    return per_head.mean(dim=1).reshape(groups * head_dim, *rest)  # [G*D, (in)]


def pool_kv_heads(model, groups: int):
    """A new model with ``groups`` KV heads whose K/V projections are the group means of ``model``'s heads.

    model: a transformers causal LM (see module doc); left untouched. groups: the new
    ``num_key_value_heads``; must divide the model's KV heads (``valid_groups(model)``). Returns the
    new model on the same device and dtype, in eval mode.
    """
    heads = check_poolable(model)
    if not isinstance(groups, int) or groups < 1 or heads % groups:
        raise ValueError(f"groups must divide the model's {heads} KV heads: allowed {valid_groups(heads)}, "
                         f"got {groups!r}")
    cfg = text_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    state = model.state_dict()
    pooled = {name: _pool(t, heads, groups, head_dim) for name, t in state.items() if _KV_PROJ.search(name)}
    config = copy.deepcopy(model.config)
    config.get_text_config(decoder=True).num_key_value_heads = groups
    param = next(model.parameters())
    new = type(model)._from_config(config, attn_implementation=model.config._attn_implementation)
    new.to(device=param.device, dtype=param.dtype)
    new.load_state_dict(state | pooled, strict=True)
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


@dataclass(slots=True)
class ConvertSettings:
    """A conversion experiment: which group counts, how perplexity is measured, and optional uptraining.

    groups: KV head counts to build (None = every divisor of the model's KV heads, MHA down to MQA).
    context: tokens per validation window (``<bos>`` first); eval_windows: windows of the bundled
    validation text scored (more = steadier, slower). uptrain_steps: AdamW steps of uptraining per
    converted model (0 = none); uptrain_batch: sequences per step; uptrain_lr: peak learning rate
    (warm-up over a tenth of the steps, cosine to 10%). data: uptraining text, ``"bundled"`` or
    ``"corpus"`` (see :func:`eval_streams`). seed: batch order of the uptraining.
    """

    groups: tuple[int, ...] | None = None
    context: int = 256
    eval_windows: int = 8
    uptrain_steps: int = 0
    uptrain_batch: int = 4
    uptrain_lr: float = 3e-4
    data: str = "bundled"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.groups is not None and (not self.groups or min(self.groups) < 1):
            raise ValueError(f"groups must be positive KV head counts or None (all divisors), got {self.groups}")
        if self.context < 2:
            raise ValueError(f"context must be >= 2 tokens, got {self.context}")
        if self.eval_windows < 1:
            raise ValueError(f"eval_windows must be >= 1, got {self.eval_windows}")
        if not 0 <= self.uptrain_steps <= 1000:
            raise ValueError(f"uptrain_steps must be in [0, 1000] (a short uptraining), got {self.uptrain_steps}")
        if self.uptrain_batch < 1:
            raise ValueError(f"uptrain_batch must be >= 1, got {self.uptrain_batch}")
        if not (math.isfinite(self.uptrain_lr) and self.uptrain_lr > 0):
            raise ValueError(f"uptrain_lr must be a positive number, got {self.uptrain_lr}")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")

    def train_settings(self) -> TrainSettings:
        """Uptraining run settings (evaluated once, at the end, on the same validation windows)."""
        return TrainSettings(steps=self.uptrain_steps, batch=self.uptrain_batch, context=self.context,
                             lr=self.uptrain_lr, warmup=max(1, self.uptrain_steps // 10), eval_every=self.uptrain_steps,
                             eval_windows=self.eval_windows, seed=self.seed)


@dataclass(slots=True)
class ConvertResult:
    """``table``: one row per KV head count (bytes, perplexity before and, if run, after uptraining).

    ``curves``: uptraining loss per step and model (empty without uptraining).
    """

    table: pd.DataFrame
    curves: pd.DataFrame


def eval_streams(tokenizer, data: str = "bundled") -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(train_ids, val_ids, val_bytes)`` for converting the bundled model.

    Validation is always the bundled model's held-out split. Training text: ``"bundled"`` = the shipped
    40-document sample (fast; a few dozen steps before it starts to overfit), ``"corpus"`` = the whole
    training split rebuilt with ``build_corpus(seed=0)``, the split the bundled model was trained on.
    """
    if data not in DATA_SOURCES:
        raise ValueError(f"data must be one of {DATA_SOURCES}, got {data!r}")
    train_docs = bundled_documents("train") if data == "bundled" else build_corpus(seed=0).train
    val_docs = bundled_documents("validation")
    return token_stream(tokenizer, train_docs), token_stream(tokenizer, val_docs), text_bytes(val_docs)


@torch.inference_mode()
def measured_kv_bytes_per_token(model, input_ids: torch.Tensor) -> float:
    """Bytes the model's KV cache holds per token after a forward over ``input_ids`` ``[B, T]`` (real tensors)."""
    cache = FULL.new_cache(model)
    run_step(model, cache, input_ids.to(model_device(model)))
    return cache.nbytes / input_ids.numel()


def _row(model, groups: int, heads: int, q_heads: int, metrics: dict, probe: torch.Tensor) -> dict:
    shape = model_shape(model)
    bits = torch.finfo(next(model.parameters()).dtype).bits
    return {
        "kv_heads": groups, "attention": "MHA" if groups == q_heads else "MQA" if groups == 1 else "GQA",
        "q_heads_per_kv_head": q_heads // groups, "pooled_heads_per_group": heads // groups,
        "params": shape.num_params, "kv_bits": bits, "kv_bytes_per_token": kv_bytes(shape, 1, bits=bits),
        "kv_bytes_per_token_measured": measured_kv_bytes_per_token(model, probe),
        "perplexity": math.exp(metrics["val_nats_per_token"]), "bits_per_byte": metrics["val_bits_per_byte"],
    }


def convert_experiment(model, tokenizer, settings: ConvertSettings | None = None,
                       progress: ProgressCallback | None = None,
                       streams: Sequence | None = None) -> ConvertResult:
    """Pool ``model`` to each group count; measure KV bytes and perplexity, optionally after uptraining.

    With uptraining, the unconverted model (``kv_heads`` = its KV heads) is uptrained too, as a control:
    it shows what the same extra training does without any pooling. ``gap_closed`` = (perplexity
    pooled - uptrained) / (perplexity pooled - original model): the share of the conversion's loss
    that uptraining won back (compare with the control too: a long uptraining on a small text can make
    every model worse). streams: ``(train_ids, val_ids, val_bytes)`` (default
    ``eval_streams(tokenizer, settings.data)``).
    """
    settings = settings or ConvertSettings()
    heads = check_poolable(model)
    q_heads = text_config(model).num_attention_heads
    groups = valid_groups(heads) if settings.groups is None else sorted(set(settings.groups), reverse=True)
    bad = [g for g in groups if heads % g]
    if bad:
        raise ValueError(f"groups must divide the model's {heads} KV heads: allowed {valid_groups(heads)}, got {bad}")
    train_ids, val_ids, val_bytes = streams or eval_streams(tokenizer, settings.data)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    probe = torch.cat([torch.tensor([bos]), val_ids[:15]]).unsqueeze(0)  # [1, 16]: bytes per token need few tokens
    rows, curves = [], []
    for i, g in enumerate(groups):
        if progress is not None:
            progress(i / len(groups), f"pooling to {g} KV heads")
        pooled = pool_kv_heads(model, g)
        if not settings.uptrain_steps:
            before = evaluate(pooled, val_ids, settings.context, bos, val_bytes, max_windows=settings.eval_windows)
            rows.append(_row(pooled, g, heads, q_heads, before, probe))
            continue

        def on_step(done: int, total: int, loss: float, i: int = i, g: int = g) -> None:
            if progress is not None:
                progress((i + done / total) / len(groups), f"uptraining {g} KV heads: step {done}/{total}")

        log = train(pooled, train_ids, val_ids, val_bytes, bos, settings.train_settings(), on_step)
        rows.append(_row(pooled, g, heads, q_heads, log[0], probe) | {  # log[0]: evaluated before any step
            "perplexity_uptrained": math.exp(log[-1]["val_nats_per_token"]),
            "bits_per_byte_uptrained": log[-1]["val_bits_per_byte"]})
        curves += [{"kv_heads": g, "step": r["step"], "train_loss": r["train_loss"]} for r in log[1:]]
    table = pd.DataFrame(rows)
    base = table.loc[table.kv_heads == heads, "perplexity"]
    if len(base):
        table["ppl_vs_original"] = table["perplexity"] / base.iloc[0]
        if settings.uptrain_steps:
            gap = table["perplexity"] - base.iloc[0]
            closed = (table["perplexity"] - table["perplexity_uptrained"]) / gap
            table["gap_closed"] = closed.where(table.kv_heads != heads)
    if progress is not None:
        progress(1.0, "done")
    return ConvertResult(table, pd.DataFrame(curves, columns=["kv_heads", "step", "train_loss"]))
