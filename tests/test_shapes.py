"""kvcore.shapes: the presets match their published configs, and kv_bytes is the one formula."""

import pytest

from kvcore.calculator import kv_curve, memory_table
from kvcore.shapes import GPU_PRESETS, PRESETS, ModelShape, kv_bytes, tokens_that_fit, weight_bytes

REQUIRED = {"gpt2", "llama-2-7b", "llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b", "falcon-7b"}


def llama_params(s: ModelShape, tied: bool = False, qkv_bias: bool = False) -> int:
    """Parameter count of a Llama-family config: untied embeddings, SwiGLU MLP, RMSNorm."""
    h, kv = s.hidden_size, s.num_kv_heads * s.head_dim
    attn = 2 * h * h + 2 * h * kv + (h + 2 * kv if qkv_bias else 0)
    layer = attn + 3 * h * s.intermediate_size + 2 * h
    return s.num_layers * layer + s.vocab_size * h * (1 if tied else 2) + h


def test_required_presets_exist():
    assert PRESETS.keys() >= REQUIRED
    assert {"H100 80GB", "A100 80GB", "L4 24GB", "RTX 4090 24GB"} <= GPU_PRESETS.keys()


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "llama-3-70b", "mistral-7b"])
def test_llama_family_param_counts_follow_from_their_configs(name):
    assert PRESETS[name].num_params == llama_params(PRESETS[name])


def test_smollm2_tied_embeddings_param_count():
    assert PRESETS["smollm2-135m"].num_params == llama_params(PRESETS["smollm2-135m"], tied=True) == 134_515_008


def test_qwen_param_count_includes_qkv_bias():
    assert PRESETS["qwen2.5-7b"].num_params == llama_params(PRESETS["qwen2.5-7b"], qkv_bias=True)


def test_head_layout_matches_hidden_size():
    for s in PRESETS.values():
        assert s.num_q_heads * s.head_dim == s.hidden_size, s.name


def test_attention_kinds():
    kinds = {n: s.attention_kind for n, s in PRESETS.items()}
    assert (kinds["llama-2-7b"], kinds["llama-3-8b"], kinds["falcon-7b"]) == ("MHA", "GQA", "MQA")


def test_hf_blog_anchor_llama2_10k_tokens_fp16():
    # Hugging Face's KV-cache quantization blog: llama-2-7b, 10,000 tokens, fp16 -> about 5 GB.
    assert kv_bytes(PRESETS["llama-2-7b"], 10_000) == 2 * 32 * 32 * 128 * 10_000 * 2 == 5_242_880_000


def test_kv_bytes_scales_linearly_and_rounds_up_partial_bytes():
    s = PRESETS["llama-3-8b"]
    assert kv_bytes(s, 100, 3, 8) == 3 * kv_bytes(s, 100, 1, 8) == 300 * kv_bytes(s, 1, 1, 8)
    tiny = ModelShape("t", 1, 1, 1, 1, 1)
    assert kv_bytes(tiny, 1, bits=3) == 1  # 2 x 3 bits = 6 bits -> one byte
    assert kv_bytes(tiny, 4, bits=3) == 3  # 24 bits


def test_tokens_that_fit_after_weights():
    s, g = PRESETS["llama-2-7b"], GPU_PRESETS["H100 80GB"]
    fit = tokens_that_fit(s, g)
    assert kv_bytes(s, fit) + weight_bytes(s) <= g.hbm_bytes < kv_bytes(s, fit + 1) + weight_bytes(s)
    assert tokens_that_fit(PRESETS["llama-3-70b"], GPU_PRESETS["L4 24GB"]) == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_q_heads": 32, "num_kv_heads": 5}, "multiple of num_kv_heads"),
    ({"num_layers": 0}, "num_layers must be an integer >= 1"),
])
def test_bad_shapes_say_what_is_wrong(kwargs, message):
    base = {"name": "x", "num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 8, "num_params": 10}
    with pytest.raises(ValueError, match=message):
        ModelShape(**(base | kwargs))


def test_memory_table_and_curve():
    shapes = [PRESETS["llama-2-7b"], PRESETS["falcon-7b"]]
    table = memory_table(shapes, 4096, 2, 8, GPU_PRESETS["A100 80GB"])
    assert table["kv_bytes_total"].tolist() == [kv_bytes(s, 4096, 2, 8) for s in shapes]
    curve = kv_curve(shapes, 4096, points=5)
    assert curve.groupby("model")["tokens"].max().tolist() == [4096, 4096]
    assert curve["kv_GB"].is_monotonic_increasing is False  # two models, each increasing
    for _, part in curve.groupby("model"):
        assert part["kv_GB"].is_monotonic_increasing
    with pytest.raises(ValueError, match="must be >= 1"):
        memory_table(shapes, 0)
