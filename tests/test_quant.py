"""KV quantization: packing, quantizers, exact bytes, KIVI's streaming semantics, and a real model.

Tensors are ``[B, H, T, D]`` caches; every byte count is checked against the tensors actually stored.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvcore.quant import (
    METHODS,
    IntCodec,
    KiviCache,
    QuantizedKV,
    custom_method,
    pack_codes,
    quantize,
    quantize_fp8,
    unpack_codes,
)
from kvcore.quant.formats import FP8_DTYPE, DenseSparseTensor, Fp8Tensor, HalfTensor, LowRankTensor, low_rank
from kvcore.quant.integer import QuantizedTensor
from kvcore.quant.packing import packed_length, unpack_range

BITS = (2, 3, 4, 8)


def cache_like(T=64, D=32, H=4, B=1, seed=0) -> torch.Tensor:
    """A KV-like tensor: Gaussian with a few large fixed channels (KIVI's key outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=g)
    x[..., 3] *= 8.0
    return x


def stored_tensors(obj) -> list[torch.Tensor]:
    """Every tensor a stored form holds (what memory holds), recursively."""
    if isinstance(obj, QuantizedTensor):
        return [t for t in (obj.codes, obj.scales, obj.zeros) if t is not None]
    if isinstance(obj, HalfTensor):
        return [obj.data]
    if isinstance(obj, Fp8Tensor):
        return [obj.data] + ([] if obj.shared_scale else [obj.scale])
    if isinstance(obj, LowRankTensor):
        return [obj.coeffs] + ([] if obj.shared_basis else [obj.basis])
    if isinstance(obj, DenseSparseTensor):
        return [*stored_tensors(obj.dense), obj.outliers.values, obj.outliers.indices]
    raise TypeError(type(obj))


def size(tensors) -> int:
    return sum(t.element_size() * t.numel() for t in tensors)


def per_element_scale(q: QuantizedTensor) -> torch.Tensor:
    """Each element's scale, in the original layout."""
    s = q.scales.float().repeat_interleave(q.group_size, dim=-1)[..., :q.n]  # [..., n]
    return s.movedim(-1, q.axis)


# --- packing -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 9, 31, 33, 128])
def test_packing_round_trips_exactly_and_densely(bits, n):
    codes = torch.randint(0, 2**bits, (3, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, math.ceil(n * bits / 8))  # 3 bits: 8 codes in 3 bytes
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    for start, stop in ((0, n), (n // 3, n), (1, max(1, n - 1)), (n, n)):
        assert torch.equal(unpack_range(packed, bits, n, start, stop), codes[:, start:stop])


def test_three_bit_codes_fill_three_bytes_per_eight():
    codes = torch.arange(8, dtype=torch.uint8)  # 0..7 in 24 bits
    packed = pack_codes(codes, 3)
    assert packed.tolist() == [0b10001000, 0b11000110, 0b11111010]  # little-endian bit order
    assert packed_length(8, 3) == 3
    assert packed_length(9, 3) == 4


@given(bits=st.sampled_from(BITS), data=st.data())
def test_pack_unpack_property(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=1, max_size=70))
    codes = torch.tensor(values, dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, len(values)), codes)


# --- integer quantization --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("axis", "group"), [(-1, None), (-1, 8), (-1, 12), (-2, None), (-2, 16), (-2, 40)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_within_half_a_step(bits, axis, group, symmetric):
    x = cache_like(T=50)
    q = quantize(x, bits, axis, group, symmetric, scale_dtype=torch.float32)
    err = (q.dequantize() - x).abs()
    # Rounding to the nearest level: half a step; float32 arithmetic adds a hair.
    assert bool((err <= 0.5 * per_element_scale(q) * (1 + 1e-5) + 1e-6).all())


@pytest.mark.parametrize("bits", BITS)
def test_fp16_scales_stay_within_one_step(bits):
    x = cache_like(T=50)
    q = quantize(x, bits, -1, 16)
    err = (q.dequantize() - x).abs()
    # fp16 scales and zeros add their own rounding (2**-11 relative): still within one step.
    assert bool((err <= per_element_scale(q) + 2**-10 * x.abs().amax(dim=-1, keepdim=True)).all())


@given(
    bits=st.sampled_from(BITS), axis=st.sampled_from([-1, -2]), group=st.sampled_from([None, 4, 7, 32]),
    symmetric=st.booleans(), T=st.integers(1, 20), D=st.integers(1, 20),
    scale=st.floats(1e-2, 1e3), seed=st.integers(0, 2**16),
)
def test_quantize_bound_property(bits, axis, group, symmetric, T, D, scale, seed):
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(seed)) * scale
    q = quantize(x, bits, axis, group, symmetric, scale_dtype=torch.float32)
    assert q.dequantize().shape == x.shape
    err = (q.dequantize() - x).abs()
    assert bool((err <= 0.5 * per_element_scale(q) * (1 + 1e-5) + 1e-6 * scale).all())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("axis", "group"), [(-1, None), (-1, 8), (-2, 16), (-1, 5)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_nbytes_is_what_is_stored(bits, axis, group, symmetric):
    x = cache_like(T=37, D=20)
    q = quantize(x, bits, axis, group, symmetric)
    assert q.nbytes == size(stored_tensors(q))
    n = x.shape[axis]
    rows = x.numel() // n
    g = n if group is None else min(group, n)
    assert q.codes.numel() == rows * math.ceil(n * bits / 8)
    assert q.scales.numel() == rows * math.ceil(n / g)
    assert q.scales.dtype == torch.float16
    assert (q.zeros is None) == symmetric


@pytest.mark.parametrize(("bits", "target"), [(4, 0.27), (2, 0.15)])
@pytest.mark.parametrize("axis", [-1, -2])
def test_memory_targets_at_group_128(bits, target, axis):
    x = torch.randn(1, 8, 1024, 128)  # Llama-like heads: D = 128
    q = quantize(x, bits, axis, group_size=128)
    ratio = q.nbytes / (2 * x.numel())
    # int4: (64 code bytes + 2 + 2 scale/zero bytes) / 256 fp16 bytes per group of 128 = 0.2656.
    assert ratio == (128 * bits / 8 + 4) / 256
    assert ratio <= target


@pytest.mark.parametrize(("bits", "target"), [(4, 0.27), (2, 0.15)])
def test_memory_targets_hold_for_a_streamed_kivi_cache(bits, target):
    cache = QuantizedKV(custom_method(bits, "kivi", group_size=128, residual=0))
    cache.append(torch.randn(1, 8, 4096, 128), torch.randn(1, 8, 4096, 128))
    assert cache.nbytes / cache.fp16_nbytes <= target


def test_dequantize_range_reads_a_block():
    x = cache_like(T=70)
    for q in (quantize(x, 3, -2, 16), quantize(x, 4, -1, 8)):
        full = q.dequantize()
        assert torch.equal(q.dequantize_range(16, 48), full[..., 16:48, :])
        assert torch.equal(q.dequantize_range(5, 6), full[..., 5:6, :])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 5, "axis": -1}, "bits must be one of"),
    ({"bits": 4, "axis": 4}, "axis must be in"),
    ({"bits": 4, "axis": -1, "group_size": 0}, "group_size must be a positive"),
])
def test_bad_settings_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize(torch.randn(2, 3, 4), **kwargs)


def test_codec_and_method_settings_are_validated():
    with pytest.raises(ValueError, match="needs group_size"):
        IntCodec(4, axis=-2)
    with pytest.raises(ValueError, match="outlier_fraction"):
        IntCodec(4, outlier_fraction=0.7)
    with pytest.raises(ValueError, match="scheme must be one of"):
        custom_method(4, "diagonal")


# --- other stored forms ---------------------------------------------------------------------------------

def test_fp8_stores_e4m3_with_counted_scales():
    x = cache_like()
    per_token = quantize_fp8(x, per_token=True)
    assert per_token.data.dtype == FP8_DTYPE
    assert per_token.scale.shape == (*x.shape[:-1], 1)
    assert per_token.nbytes == x.numel() + 2 * x.numel() // x.shape[-1]
    assert float((per_token.dequantize() - x).norm() / x.norm()) < 0.05  # 3 mantissa bits
    frozen = quantize_fp8(x * 10, per_token=False, scale=quantize_fp8(x, per_token=False).scale)
    assert frozen.nbytes == x.numel()  # a calibrated scale is not stored twice
    assert float(frozen.dequantize().abs().max()) <= float(x.abs().max()) * 1.01  # saturates, no NaN


def test_low_rank_is_exact_on_low_rank_keys():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 64, 4, generator=g) @ torch.randn(1, 2, 4, 32, generator=g)  # rank 4
    lr = low_rank(x, rank=4)
    assert lr.nbytes == 2 * (2 * 64 * 4 + 2 * 4 * 32)
    assert float((lr.dequantize() - x).norm() / x.norm()) < 2e-3  # fp16 factors


def test_outliers_are_kept_exactly_and_shrink_the_range():
    x = cache_like(T=16)
    x[0, 1, 5, 7] = 300.0
    plain = IntCodec(2).compress(x)
    kept = IntCodec(2, outlier_fraction=0.01).compress(x)
    restored = kept.dequantize()
    assert restored[0, 1, 5, 7] == 300.0
    assert kept.outliers.indices.dtype == torch.int16  # rows of H*D = 128 elements
    assert kept.nbytes == size(stored_tensors(kept))
    assert float((restored - x).norm()) < float((plain.dequantize() - x).norm())


# --- the registry and the streaming cache ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_stores_and_restores(name):
    k, v = cache_like(T=96, seed=1), cache_like(T=96, seed=2)
    store = QuantizedKV(METHODS[name])
    store.append(k, v)
    assert store.keys().shape == k.shape
    assert store.values().shape == v.shape
    held = [t for s in (store.k, store.v) for t in (s.sink, s.recent) if t is not None]
    held += [t for s in (store.k, store.v) for c in s.chunks for t in stored_tensors(c)]
    assert store.nbytes == size(held)
    ratio = store.nbytes / store.fp16_nbytes
    assert ratio == 1.0 if name == "fp16" else ratio < 1.0
    assert float((store.values() - v).norm() / v.norm()) < 1.0  # better than storing nothing
    for start, stop, stored in store.k.blocks():  # the per-block path rebuilds the same keys
        assert torch.equal(stored.dequantize(), store.keys()[..., start:stop, :])


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.family not in ("fp8", "low-rank")])
def test_streaming_one_token_at_a_time_equals_storing_at_once(name):
    k, v = cache_like(T=80, seed=3), cache_like(T=80, seed=4)
    at_once, streamed = QuantizedKV(METHODS[name]), QuantizedKV(METHODS[name])
    at_once.append(k, v)
    for t in range(80):
        streamed.append(k[..., t:t + 1, :], v[..., t:t + 1, :])
    assert torch.equal(at_once.keys(), streamed.keys())
    assert torch.equal(at_once.values(), streamed.values())
    assert at_once.nbytes == streamed.nbytes


def test_kivi_keeps_the_recent_window_exact_and_ages_keys_group_by_group():
    R, G = 8, 4
    cache = KiviCache(bits=2, group_size=G, residual=R)
    k, v = cache_like(T=40, D=8), cache_like(T=40, D=8, seed=9)
    for T in range(1, 41):
        cache.append(k[..., T - 1:T, :], v[..., T - 1:T, :])
        aged_k = max(0, (T - R) // G * G)  # keys leave the window a whole group at a time
        aged_v = max(0, T - R)  # values leave it token by token
        assert cache.k.num_aged == aged_k
        assert cache.v.num_aged == aged_v
        assert all(n == G for n in cache.k.chunk_lengths)  # one per-channel group per stored chunk
        # The most recent R tokens (and the not-yet-full key group) are exact fp16.
        keys, values = cache.keys(), cache.values()
        assert torch.equal(keys[..., aged_k:, :], k[..., aged_k:T, :].half().float())
        assert torch.equal(values[..., aged_v:, :], v[..., aged_v:T, :].half().float())
        if aged_k:  # older keys went through 2-bit codes
            assert not torch.equal(keys[..., :aged_k, :], k[..., :aged_k, :].half().float())
    # Bytes: the fp16 window + per-channel key groups (packed 2-bit codes + fp16 scale and zero per channel
    # and group of G tokens) + per-token values (packed codes + fp16 scale and zero per group of G channels).
    B, H, D = 1, 4, 8
    window = 2 * B * H * D * ((40 - 32) + (40 - 32))
    keys = 32 // G * B * H * D * (G * 2 // 8 + 4)
    values = 32 * B * H * (D * 2 // 8 + 4 * D // G)
    assert cache.nbytes == window + keys + values


def test_sinks_stay_fp16_forever():
    method = METHODS["int2-sinks"]
    cache = QuantizedKV(method)
    k = cache_like(T=100)
    cache.append(k, k)
    assert torch.equal(cache.keys()[..., :method.n_sink, :], k[..., :method.n_sink, :].half().float())
    assert cache.k.num_recent == method.residual


def test_cache_layer_attends_to_the_past_as_stored_and_to_new_tokens_exactly():
    from kvcore.quant.hf_cache import QuantizedKVLayer

    names = ("kivi-2", "int4-channel", "int2-sinks", "svd-r8")
    layer = QuantizedKVLayer([METHODS[n] for n in names])  # one method per batch row
    refs = [QuantizedKV(METHODS[n]) for n in names]
    k, v = cache_like(T=100, D=8, H=2, B=4, seed=7), cache_like(T=100, D=8, H=2, B=4, seed=8)
    for start, stop in [(0, 40), *((t, t + 1) for t in range(40, 100))]:
        got_k, got_v = layer.update(k[..., start:stop, :], v[..., start:stop, :])
        for row, ref in enumerate(refs):
            # KIVI and transformers' QuantizedLayer: the pass reads the past as stored before it appends.
            past_k, past_v = ref.keys(), ref.values()
            new_k, new_v = k[row:row + 1, :, start:stop], v[row:row + 1, :, start:stop]
            ref.append(new_k, new_v)
            want_k = new_k if past_k is None else torch.cat([past_k, new_k], -2)
            want_v = new_v if past_v is None else torch.cat([past_v, new_v], -2)
            assert torch.equal(got_k[row:row + 1], want_k)
            assert torch.equal(got_v[row:row + 1], want_v)
    assert layer.nbytes == sum(ref.nbytes for ref in refs)


# --- a real (tiny, random) transformers model -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def test_quantized_plan_generates_like_the_full_cache_at_8_bits(tiny_llama):
    from kvcore.models.generate import GenerationSettings, generate_stream
    from kvcore.quant.hf_cache import fp16_nbytes_per_row, nbytes_per_row, quantized_plan

    prompt = torch.arange(3, 23)
    settings = GenerationSettings(max_new_tokens=12, stop_at_eos=False)
    reference = tiny_llama.generate(prompt[None], attention_mask=torch.ones(1, 20, dtype=torch.long),
                                    max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 20:].tolist()
    plan = quantized_plan(METHODS["int8-token"])
    events = list(generate_stream(tiny_llama, None, prompt, settings, plan))
    assert [e.token_id for e in events] == reference  # 8 bits do not change this greedy path
    assert events[-1].kv_tokens == 31  # the last generated token is never fed back
    cache = plan.new_cache(tiny_llama)
    tiny_llama(input_ids=prompt[None], cache=cache, use_cache=True)
    D = 16  # head_dim of the tiny model: int8 codes + fp16 scale and zero per token and head
    assert nbytes_per_row(cache)[0] / fp16_nbytes_per_row(cache)[0] == pytest.approx((D + 4) / (2 * D))
    assert cache.nbytes == nbytes_per_row(cache)[0]


def test_one_batched_decode_measures_each_method_as_its_own_run(tiny_llama):
    from kvcore.device import torch_threads
    from kvcore.models.perplexity import stream_text
    from kvcore.quant.hf_cache import nbytes_per_row, quantized_plan

    ids = torch.randint(3, 256, (48,), generator=torch.Generator().manual_seed(5))
    methods = [METHODS[n] for n in ("fp16", "int2-token", "kivi-2", "svd-r8")]
    with torch_threads(1):
        batched = stream_text(tiny_llama, ids.expand(len(methods), -1), quantized_plan(methods), 24, feed_last=True)
        for i, method in enumerate(methods):
            single = stream_text(tiny_llama, ids, quantized_plan(method), 24, feed_last=True)
            assert torch.allclose(batched.nll[i], single.nll[0], rtol=1e-4, atol=1e-5)
            assert nbytes_per_row(batched.cache)[i] == single.cache.nbytes
            assert single.cache.get_seq_length() == 48  # feed_last: the cache holds the whole text


def test_evaluate_reports_every_method(tiny_llama):
    from kvcore.quant.evaluate import SUMMARY_COLUMNS, evaluate

    ids = torch.randint(3, 256, (64,), generator=torch.Generator().manual_seed(6))
    names = ("fp16", "int8-token", "int2-token", "kivi-2", "fp8-token")
    result = evaluate(tiny_llama, ids, {n: METHODS[n] for n in names}, prompt_tokens=32)
    summary = result.summary.set_index("method")
    assert tuple(result.summary.columns) == SUMMARY_COLUMNS
    assert list(summary.index) == list(names)
    assert len(result.by_layer) == 2 * len(names)
    assert summary.loc["fp16", "ppl_vs_fp16"] == 1.0
    assert summary.loc["fp16", "vs_fp16"] == "baseline"
    assert (summary["ppl_vs_fp16_low"] <= summary["ppl_vs_fp16"]).all()
    assert (summary["ppl_vs_fp16"] <= summary["ppl_vs_fp16_high"]).all()
    assert (summary["perplexity_low"] <= summary["perplexity"]).all()
    assert (summary["scored_tokens"] == 32).all()
    assert set(result.nll) == set(names)
    assert result.nll["fp16"].shape == (1, 32)
    assert summary.loc["int8-token", "attn_rel_err"] < summary.loc["int2-token", "attn_rel_err"]
    # The decode run's cache holds the same bytes as the text's K/V stored in one go.
    static = result.by_layer.groupby("method")["bytes"].sum()
    for name in names:
        assert summary.loc[name, "bytes"] == static[name]


# --- intervals: a difference is called only beyond the noise ---------------------------------------------------

def _nll(windows: int, tokens: int, shift: float = 0.0, jitter: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Per-token NLL of text whose difficulty varies a lot from token to token (shared by every method), plus a
    method's own shift and small jitter."""
    difficulty = torch.rand(windows, tokens, generator=torch.Generator().manual_seed(99)) * 8
    own = torch.randn(windows, tokens, generator=torch.Generator().manual_seed(seed)) * jitter
    return difficulty + shift + own


def test_a_real_difference_is_worse_and_a_jitter_is_within_noise():
    from kvcore.quant.evaluate import noise_columns

    nll = {"fp16": _nll(2, 128), "bad": _nll(2, 128, shift=0.1, jitter=0.01, seed=1),
           "same": _nll(2, 128, jitter=0.05, seed=2)}
    table = noise_columns(nll, {"fp16": 1.0, "bad": 0.2, "same": 0.3}).set_index("method")
    assert table.loc["bad", "vs_fp16"] == "worse"
    assert table.loc["bad", "ppl_vs_fp16_low"] > 1.08  # e^0.1 = 1.105
    assert table.loc["same", "vs_fp16"] == "within noise"
    assert table.loc["fp16", "vs_fp16"] == "baseline"
    assert (table["scored_tokens"] == 256).all()
    # The front: "bad" has the fewest bytes; "same" ties fp16 within noise, so it is neither on the front nor
    # pushes fp16 off it (the chart's "Pareto front (beyond noise)" once ran through a hollow within-noise marker).
    assert table["pareto"].to_dict() == {"fp16": True, "bad": True, "same": False}


def test_sixty_four_scored_tokens_call_nothing_and_rank_nothing():
    """The defect: 64 scored tokens (4 blocks) put kivi-2 at a green -2% and int2 on the Pareto front."""
    from kvcore.quant.evaluate import noise_columns

    nll = {"fp16": _nll(1, 64), "kivi-2": _nll(1, 64, shift=-0.02, jitter=0.005, seed=3),
           "int2-token": _nll(1, 64, shift=-0.02, jitter=0.005, seed=4)}
    table = noise_columns(nll, {"fp16": 1.0, "kivi-2": 0.3, "int2-token": 0.2}).set_index("method")
    assert table.loc[["kivi-2", "int2-token"], "vs_fp16"].tolist() == ["within noise", "within noise"]
    assert not table["pareto"].any()


def test_the_noisy_front_treats_differences_inside_the_noise_as_ties():
    from kvcore.quant.evaluate import noisy_pareto_front

    rng = np.random.default_rng(0)
    base = rng.normal(5.0, 0.2, size=(500, 1))
    samples = np.hstack([base, base + 0.001 * rng.normal(size=(500, 1)), base + 0.5])  # [R, 3]: NLL means
    # method 1 is a tie with method 0 but larger: beaten; method 2 is smallest: on the front whatever its NLL
    assert noisy_pareto_front(np.array([0.5, 0.6, 0.1]), samples).tolist() == [True, False, True]
    # method 1 slightly "better" only inside the noise, with more bytes: still beaten by the smaller tie
    samples[:, 1] = base[:, 0] - 0.0005 + 0.01 * rng.normal(size=500)
    assert noisy_pareto_front(np.array([0.5, 0.6, 0.1]), samples).tolist() == [True, False, True]
    assert not noisy_pareto_front(np.array([0.5, 0.6, 0.1]), samples, trusted=False).any()
    samples[:, 1] = base[:, 0] - 0.05  # better beyond the noise: now it earns its extra bytes
    assert noisy_pareto_front(np.array([0.5, 0.6, 0.1]), samples).tolist() == [True, True, True]


def test_combine_recomputes_the_intervals_over_both_runs(tiny_llama):
    from kvcore.quant.evaluate import combine, evaluate
    from kvcore.quant.methods import CustomSettings

    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(7))
    first = evaluate(tiny_llama, ids, {n: METHODS[n] for n in ("fp16", "int8-token")})
    second = evaluate(tiny_llama, ids, {"fp16": METHODS["fp16"], "custom": CustomSettings(bits=2).method()})
    both = combine(first, second)
    assert both.summary["method"].tolist() == ["fp16", "int8-token", "custom"]
    assert set(both.nll) == {"fp16", "int8-token", "custom"}
    custom = both.summary.set_index("method").loc["custom"]
    assert custom.ppl_vs_fp16_low <= custom.ppl_vs_fp16 <= custom.ppl_vs_fp16_high


# --- the bundled model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled():
    from kvcore.models.loader import BUNDLED_DIR

    if not (BUNDLED_DIR / "model.safetensors").is_file():
        pytest.skip(f"the bundled model is not trained yet ({BUNDLED_DIR}/model.safetensors is absent)")
    from kvcore.models import load_model

    return load_model(None)


def test_the_page_default_scores_256_tokens():
    from kvcore.quant.evaluate import PAGE_TOKEN_LIMIT, QuantText

    text = QuantText()
    assert text.windows * (text.tokens - text.tokens // 2) == 256
    assert text.windows * text.tokens <= PAGE_TOKEN_LIMIT


def test_int8_perplexity_within_one_percent_of_fp16_on_the_bundled_model(bundled):
    from kvcore.quant.evaluate import evaluate, text_windows

    model, tokenizer = bundled
    ids = text_windows(tokenizer, 256, windows=2)  # 2 x 128 scored tokens
    result = evaluate(model, ids, {n: METHODS[n] for n in ("fp16", "int8-token", "int8-channel")})
    summary = result.summary.set_index("method")
    ratio = summary["ppl_vs_fp16"]
    assert abs(ratio["int8-token"] - 1.0) < 0.01
    assert abs(ratio["int8-channel"] - 1.0) < 0.01
    assert (summary.loc[["int8-token", "int8-channel"], "ppl_vs_fp16_high"] < 1.01).all()


def test_cli_runs_headless_on_the_bundled_model(bundled, tmp_path, capsys):
    from kvcore.cli import main

    out = tmp_path / "quant.csv"
    argv = ["quant", "--methods", "fp16", "int4-token", "--tokens", "64", "--windows", "1", "--csv", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "int4-token" in printed
    assert "32 scored tokens" in printed
    assert "under 8 blocks: nothing is called" in printed
    header = out.read_text().splitlines()[0].split(",")
    assert header[:3] == ["method", "family", "bytes_ratio"]
    assert {"ppl_vs_fp16_low", "ppl_vs_fp16_high", "vs_fp16", "perplexity_low"} <= set(header)
