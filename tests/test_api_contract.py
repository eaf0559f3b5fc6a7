"""The public names that pages, tests and outside checks rely on (the package's API contract)."""

import inspect

import pytest
import torch

from kvcore import shapes
from kvcore.cli import build_parser
from kvcore.eviction import POLICIES
from kvcore.kernels import contiguous_decode_attention, paged_decode_attention
from kvcore.models import load_model
from kvcore.paged import KVCacheManager
from kvcore.quant import QuantizedTensor, quantize


def test_shapes_contract():
    assert {"gpt2", "llama-2-7b", "llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b",
            "falcon-7b"} <= shapes.PRESETS.keys()
    s = shapes.PRESETS["llama-3-8b"]
    for field in ("name", "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "num_params"):
        assert hasattr(s, field)
    assert shapes.kv_bytes(s, 10, batch_size=2, bits=8) == 2 * 32 * 8 * 128 * 10 * 2
    for gpu in shapes.GPU_PRESETS.values():
        assert gpu.hbm_bytes > 0
        assert gpu.hbm_bandwidth > 0
        assert gpu.bf16_flops > 0
        assert gpu.host_link_bandwidth > 0


def test_paged_manager_contract():
    m = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    assert m.allocate("a", [1, 2, 3]) == m.block_table("a")
    assert m.append("a", [4]) == m.block_table("a")
    m.fork("a", "b")
    assert all(m.ref_cnt(b) == 2 for b in m.block_table("a"))
    assert m.num_cached_tokens("a") == 0
    assert m.allocate("c", list(range(100))) is None
    m.free("a")
    m.free("b")
    assert m.num_free_blocks == 4 == len(m.free_block_queue())
    assert {e.kind for e in m.events} >= {"allocate", "free"}


def test_kernel_contract():
    q = torch.randn(2, 4, 8)
    kc, vc = torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8)
    tables, lens = torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([5, 3])
    out = paged_decode_attention(q, kc, vc, tables, lens, scale=None)
    assert out.shape == (2, 4, 8)
    keys = kc[tables].permute(0, 3, 1, 2, 4).reshape(2, 2, 6, 8)  # [B, Hkv, T, D]
    values = vc[tables].permute(0, 3, 1, 2, 4).reshape(2, 2, 6, 8)
    ref = torch.stack([contiguous_decode_attention(q[i:i + 1], keys[i:i + 1, :, :n], values[i:i + 1, :, :n])[0]
                       for i, n in enumerate(lens.tolist())])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_contract(bits):
    x = torch.randn(1, 2, 16, 32)
    qt = quantize(x, bits, axis=-1, group_size=None, symmetric=False)
    assert isinstance(qt, QuantizedTensor)
    assert qt.dequantize().shape == x.shape
    assert isinstance(qt.nbytes, int)
    assert 0 < qt.nbytes < x.numel() * 2


def test_eviction_contract():
    assert {"full", "sliding_window", "streaming_llm", "h2o", "tova", "snapkv", "knorm", "random"} <= POLICIES.keys()
    k, v, q = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 4, 3, 8)
    for name, cls in POLICIES.items():
        policy = cls()
        assert policy.score(k, v, q).shape == (1, 2, 20), name
        k2, v2, kept = policy.compress(k, v, q, 8)
        # full, and the attention-only window, keep storage whole; every other policy holds the budget
        expected = 20 if name in ("full", "attention_window") else 8
        assert k2.shape[-2] == v2.shape[-2] == kept.shape[-1] == expected, name


def test_models_and_cli_contract():
    assert list(inspect.signature(load_model).parameters)[:2] == ["name_or_path", "device"]
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"memory", "paged", "batching", "eviction", "quant", "sharing", "hierarchy"} <= commands.keys()
    for name, sub in commands.items():
        options = {o for a in sub._actions for o in a.option_strings}
        assert {"--csv", "--seed"} <= options, name


def test_backends_contract():
    from kvcore.kernels import BACKENDS, DecodeBatch, choose_backend

    q, kc, vc = torch.randn(2, 9, 16), torch.randn(4, 4, 3, 16), torch.randn(4, 4, 3, 16)  # 3 query heads per KV head
    tables, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([7, 5])
    assert set(BACKENDS) == {"torch", "native", "triton"}
    assert choose_backend(q, kc, vc) in ("native", "torch")
    ref = paged_decode_attention(q, kc, vc, tables, lens, backend="torch")
    batch = DecodeBatch.of(choose_backend(q, kc, vc), tables, [7, 5], 9, 16)
    torch.testing.assert_close(batch.attend(q, kc, vc, 16 ** -0.5), ref, atol=1e-5, rtol=0)


def test_engine_calibration_and_needle_contract():
    from kvcore.engine.calibrate import calibrate_engine
    from kvcore.needle import NeedleConfig, disagreements, join_perplexity, run_needle
    from kvcore.sched.cost import FittedCost

    assert list(inspect.signature(calibrate_engine).parameters)[:1] == ["model"]
    assert {"block_size", "threads"} <= set(inspect.signature(calibrate_engine).parameters)
    cost = FittedCost("c", 1e-3, per_seq_s=1e-4)
    assert cost.step_time(4, 10, 10, num_seqs=4, prefill_seqs=0) == pytest.approx(1.4e-3)
    assert {"model", "tokenizer", "config"} <= set(inspect.signature(run_needle).parameters)
    assert callable(join_perplexity)
    assert callable(disagreements)
    assert NeedleConfig().mode in ("prefill", "decode")
    commands = build_parser()._subparsers._group_actions[0].choices
    assert "needle" in commands
