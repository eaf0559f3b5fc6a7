"""kvcore.sched.cost: the roofline step-time model."""

import pytest

from kvcore.sched.cost import CostModel, prefill_pairs
from kvcore.shapes import GPU_PRESETS, PRESETS, kv_bytes, weight_bytes


@pytest.fixture
def h100_llama3():
    return CostModel(PRESETS["llama-3-8b"], GPU_PRESETS["H100 80GB"])


def test_decode_is_memory_bound_and_long_prefill_compute_bound(h100_llama3):
    assert h100_llama3.bound(1, 1000, 1000) == "memory"
    assert h100_llama3.bound(4096, prefill_pairs(4096, 0), 0) == "compute"


def test_single_decode_reads_weights_and_kv(h100_llama3):
    c = h100_llama3
    expected = (weight_bytes(c.shape) + kv_bytes(c.shape, 1001)) / (c.gpu.hbm_bandwidth * c.bandwidth_efficiency)
    assert c.step_time(1, 1000, 1000) == pytest.approx(expected + c.step_overhead_s)


def test_prefill_pairs_are_causal():
    assert prefill_pairs(1, 0) == 1
    assert prefill_pairs(4, 0) == 10  # 1 + 2 + 3 + 4
    assert prefill_pairs(4, 6) == 4 * 6 + 10
    # one chunk of 8 == two chunks of 4
    assert prefill_pairs(8, 0) == prefill_pairs(4, 0) + prefill_pairs(4, 4)


def test_capacity(h100_llama3):
    tokens = h100_llama3.kv_capacity_tokens(0.1)
    assert tokens * h100_llama3.kv_bytes_per_token <= 0.9 * h100_llama3.gpu.hbm_bytes - h100_llama3.weight_bytes
    assert h100_llama3.kv_capacity_blocks(16) == tokens // 16
    with pytest.raises(ValueError, match="do not fit"):
        CostModel(PRESETS["llama-3-70b"], GPU_PRESETS["L4 24GB"]).kv_capacity_tokens()


def test_validation():
    with pytest.raises(ValueError, match="flops_efficiency"):
        CostModel(PRESETS["gpt2"], GPU_PRESETS["L4 24GB"], flops_efficiency=0)
