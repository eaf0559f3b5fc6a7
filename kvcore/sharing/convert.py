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
import torch.nn.functional as F

from kvcore.models.corpus import build_corpus
from kvcore.models.loader import bundled_documents, model_shape
from kvcore.models.plan import FULL, run_step
from kvcore.models.runtime import model_device, text_config
from kvcore.models.training import TrainSettings, batch_at, text_bytes, token_stream, train
from kvcore.noise import paired_means
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


@torch.inference_mode()
def window_nll(model, stream: torch.Tensor, context: int, bos: int, max_windows: int | None = None,
               batch: int = 16) -> torch.Tensor:
    """NLL (nats) of every token that :func:`kvcore.models.training.evaluate` scores, kept per token: ``[W, C]``
    over the first ``W`` consecutive windows of ``context`` tokens of ``stream`` ``[N]`` (each restarted with
    ``<bos>``). Its mean is evaluate's ``val_nats_per_token``; per token, it gives intervals. Leaves the model
    in the train/eval mode it was in."""
    windows = len(stream) // context if max_windows is None else min(len(stream) // context, max_windows)
    if windows < 1:
        raise ValueError(f"the validation stream ({len(stream)} tokens) is shorter than one window of {context}")
    was_training = model.training
    model.eval()
    rows = []
    for w0 in range(0, windows, batch):
        inputs, targets = batch_at(stream, torch.arange(w0, min(windows, w0 + batch)) * context, context, bos)
        logits = model(input_ids=inputs, use_cache=False).logits.float()  # [B, C, V]
        rows.append(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))  # [B, C]
    model.train(was_training)
    return torch.cat(rows)  # [W, C]


def _row(model, groups: int, heads: int, q_heads: int, probe: torch.Tensor) -> dict:
    shape = model_shape(model)
    bits = torch.finfo(next(model.parameters()).dtype).bits
    return {
        "kv_heads": groups, "attention": "MHA" if groups == q_heads else "MQA" if groups == 1 else "GQA",
        "q_heads_per_kv_head": q_heads // groups, "pooled_heads_per_group": heads // groups,
        "params": shape.num_params, "kv_bits": bits, "kv_bytes_per_token": kv_bytes(shape, 1, bits=bits),
        "kv_bytes_per_token_measured": measured_kv_bytes_per_token(model, probe),
    }


def quality_columns(nll: Sequence[torch.Tensor], base: int | None, tokens_per_byte: float, suffix: str = "",
                    seed: int = 0) -> dict[str, list]:
    """Perplexity and bits per byte of each model with its interval, and (``base`` given) its perplexity ratio to
    model ``base`` with the ratio's interval and ``vs_original``: "worse" / "better" only beyond the noise.

    nll: per-token NLL ``[W, C]`` of each model on the same windows (paired block bootstrap,
    :func:`kvcore.noise.paired_means`). tokens_per_byte: of the validation text (bits per byte = mean NLL x
    tokens per byte / ln 2). suffix: appended to the perplexity and bits-per-byte column names.
    """
    means, diffs = paired_means(nll, base=base or 0, seed=seed)
    ppl = [m.map(math.exp) for m in means]
    bpb = [m.map(lambda v: v * tokens_per_byte / math.log(2)) for m in means]
    out = {f"perplexity{suffix}": [p.estimate for p in ppl], f"perplexity{suffix}_low": [p.low for p in ppl],
           f"perplexity{suffix}_high": [p.high for p in ppl], f"bits_per_byte{suffix}": [b.estimate for b in bpb]}
    if base is not None and not suffix:
        ratio = [d.map(math.exp) for d in diffs]
        out |= {"ppl_vs_original": [r.estimate for r in ratio], "ppl_vs_original_low": [r.low for r in ratio],
                "ppl_vs_original_high": [r.high for r in ratio],
                "vs_original": ["original" if i == base else r.versus(1.0, below="better", above="worse")
                                for i, r in enumerate(ratio)]}
    return out


def uptraining_columns(before: torch.Tensor, after: torch.Tensor, seed: int = 0) -> dict[str, object]:
    """What uptraining did to one model, on the same windows: its perplexity ratio after / before with the
    interval, and ``uptraining``: "better" / "worse" beyond the noise, else "within noise"."""
    ratio = paired_means([before, after], base=0, seed=seed)[1][1].map(math.exp)
    return {"uptrained_vs_pooled": ratio.estimate, "uptrained_vs_pooled_low": ratio.low,
            "uptrained_vs_pooled_high": ratio.high,
            "uptraining": ratio.versus(1.0, below="better", above="worse")}


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
    rows, curves, before, after = [], [], [], []

    def score(m) -> torch.Tensor:
        return window_nll(m, val_ids, settings.context, bos, settings.eval_windows)  # [W, C]

    for i, g in enumerate(groups):
        if progress is not None:
            progress(i / len(groups), f"pooling to {g} KV heads")
        pooled = pool_kv_heads(model, g)
        rows.append(_row(pooled, g, heads, q_heads, probe))
        before.append(score(pooled))
        if not settings.uptrain_steps:
            continue

        def on_step(done: int, total: int, loss: float, i: int = i, g: int = g) -> None:
            if progress is not None:
                progress((i + done / total) / len(groups), f"uptraining {g} KV heads: step {done}/{total}")

        log = train(pooled, train_ids, val_ids, val_bytes, bos, settings.train_settings(), on_step)
        after.append(score(pooled))
        rows[-1] |= uptraining_columns(before[-1], after[-1], settings.seed)
        curves += [{"kv_heads": g, "step": r["step"], "train_loss": r["train_loss"]} for r in log[1:]]
    table = pd.DataFrame(rows)
    base = groups.index(heads) if heads in groups else None
    tokens_per_byte = len(val_ids) / val_bytes
    table = table.assign(**quality_columns(before, base, tokens_per_byte, seed=settings.seed))
    if settings.uptrain_steps:
        table = table.assign(**quality_columns(after, base, tokens_per_byte, "_uptrained", settings.seed))
        if base is not None:
            gap = table["perplexity"] - table.loc[base, "perplexity"]
            closed = (table["perplexity"] - table["perplexity_uptrained"]) / gap
            table["gap_closed"] = closed.where(table.kv_heads != heads)
    if progress is not None:
        progress(1.0, "done")
    return ConvertResult(table, pd.DataFrame(curves, columns=["kv_heads", "step", "train_loss"]))
