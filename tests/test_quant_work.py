"""The quantization measurement's work, counted: each window's K/V captured once for every method, every
(method, window) pair decoded in one batch, and a progress report that says how far the decode is."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcore.quant import evaluate as qe
from kvcore.quant.methods import METHODS


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_windows_are_captured_once_and_every_method_decodes_in_one_batch():
    model = tiny()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))  # 2 windows of 24 tokens
    methods = {n: METHODS[n] for n in ("fp16", "int4-token", "kivi-2")}
    batches, reports = [], []
    handle = model.model.register_forward_hook(lambda module, args, kwargs, out: batches.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        result = qe.evaluate(model, ids, methods, progress=lambda fraction, label: reports.append((fraction, label)))
    finally:
        handle.remove()
    assert batches[:2] == [(1, 24), (1, 24)]  # one capture per window, shared by the three methods
    # one prefill per window, shared by the three methods, then one step per token of 3 methods x 2 windows
    assert batches[2:] == [(2, 12)] + [(6, 1)] * 12
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions)
    assert fractions[0] >= 0.0
    assert fractions[-1] <= 1.0
    assert any("decoding token" in label and "3 methods x 2 windows" in label for _, label in reports)
    assert result.measured_at > 0
    separate = qe.evaluate(model, ids, methods, batched=False)
    for column in ("bytes", "fp16_bytes", "k_rel_err", "v_rel_err", "attn_rel_err"):
        assert result.summary[column].tolist() == separate.summary[column].tolist(), column
    assert torch.allclose(torch.tensor(result.summary["perplexity"].tolist()),
                          torch.tensor(separate.summary["perplexity"].tolist()), rtol=1e-4)
