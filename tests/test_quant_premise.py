"""KIVI's premise, measured: outlier channels in keys and not in values, per-channel keys beating per-token ones at
the same bits, each verdict a sign test over layers; on SmolLM2 the premise holds, as KIVI (Liu et al. 2024) says
of real LLMs. The measurement's shared prefill gives exactly what streaming every row gives."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from kvcore.models.perplexity import stream_text
from kvcore.noise import WITHIN_NOISE
from kvcore.quant import evaluate as qe
from kvcore.quant.hf_cache import quantized_plan
from kvcore.quant.methods import METHODS
from kvcore.quant.model_kv import CapturedKV
from kvcore.quant.premise import channel_outliers, channel_ratios, kivi_premise, layer_verdict, sign_test
from tests.test_quant_work import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(layers: int, key_outlier: float, value_outlier: float = 1.0) -> CapturedKV:
    """Every channel of magnitude 1 in every token, channel 3 of head 0 ``*_outlier`` times that: ``[1, 2, 8, 16]``."""
    def cache(outlier: float) -> torch.Tensor:
        x = torch.ones(1, 2, 8, 16)
        x[..., 1::2, :] *= -1  # signs alternate over tokens: magnitudes are what count
        x[0, 0, :, 3] *= outlier
        return x
    keys = [cache(key_outlier) for _ in range(layers)]
    values = [cache(value_outlier) for _ in range(layers)]
    return CapturedKV([torch.zeros(1, 4, 8, 16)] * layers, keys, values, 0.25)


def test_a_channel_ratio_is_its_mean_magnitude_over_its_heads_median_channel():
    ratios = channel_ratios(planted(1, 10.0).keys[0])  # [H, D]
    assert ratios.shape == (2, 16)
    assert ratios[0, 3] == 10.0
    assert (ratios[0, [c for c in range(16) if c != 3]] == 1.0).all()
    assert (ratios[1] == 1.0).all()


def test_outlier_channels_are_counted_per_layer_for_keys_and_values():
    table = channel_outliers([planted(3, 10.0, 2.0)], ratio=5.0)
    assert table["layer"].tolist() == [0, 1, 2]
    assert table["k_top_ratio"].tolist() == [10.0] * 3
    assert table["v_top_ratio"].tolist() == [2.0] * 3
    assert table["k_outlier_share"].tolist() == [1 / 32] * 3  # one (head, channel) pair of 2 x 16
    assert table["v_outlier_share"].tolist() == [0.0] * 3
    with pytest.raises(ValueError, match="ratio must be > 1"):
        channel_outliers([planted(1, 10.0)], ratio=1.0)


def test_the_sign_test_by_hand():
    assert sign_test(6, 0) == 2 / 64  # both tails of 6 heads in 6 fair tosses
    assert sign_test(5, 1) == 2 * 7 / 64
    assert sign_test(3, 3) == 1.0
    assert sign_test(0, 0) == 1.0
    assert layer_verdict(6, 0) == "holds"
    assert layer_verdict(0, 6) == "does not hold"
    assert layer_verdict(5, 1) == WITHIN_NOISE  # 6 layers cannot tell 5 of 6 from chance


def summary_and_layers(layers: int, channel_err: float, token_err: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    names = ["int2-channel", "int2-token"]
    summary = pd.DataFrame({"method": names, "k_rel_err": [channel_err, token_err], "ppl_vs_fp16": [1.2, 3.0],
                            "ppl_vs_fp16_low": [1.1, 2.5], "ppl_vs_fp16_high": [1.3, 3.5],
                            "vs_fp16": ["worse", "worse"], "bytes_ratio": [0.19, 0.16]})
    by_layer = pd.DataFrame([{"method": m, "layer": i, "k_rel_err": e} for i in range(layers)
                             for m, e in zip(names, (channel_err, token_err), strict=True)])
    return summary, by_layer


def test_the_premise_holds_where_planted_and_fails_where_reversed():
    summary, by_layer = summary_and_layers(8, 0.2, 0.6)
    premise = kivi_premise(channel_outliers([planted(8, 10.0)]), summary, by_layer).set_index("claim")
    assert premise["verdict"].tolist() == ["holds", "holds", "holds"]  # outliers, keys vs values, 2 bits
    two_bits = premise.iloc[2]
    assert "at 2 bits" in two_bits.name
    assert "key error 0.200 per channel vs 0.600 per token" in two_bits.measured
    assert "lower in 8 of 8 layers" in two_bits.measured
    summary, by_layer = summary_and_layers(8, 0.6, 0.2)
    reversed_ = kivi_premise(channel_outliers([planted(8, 1.5, 10.0)]), summary, by_layer)
    assert reversed_["verdict"].tolist() == ["does not hold", "does not hold", "does not hold"]


def test_one_prefill_per_window_gives_what_streaming_every_row_gives():
    model = tiny()
    windows = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    methods = [METHODS[n] for n in ("fp16", "int2-token", "kivi-2", "int4-outliers")]
    shared = qe.stream_methods(model, windows, methods, 10)
    every = stream_text(model, windows.repeat_interleave(len(methods), dim=0),
                        quantized_plan([m for _ in range(2) for m in methods]), 10, feed_last=True)
    assert torch.equal(shared.nll, every.nll)
    assert shared.decode_steps == every.decode_steps == 10
    assert [layer.nbytes for layer in shared.cache.layers] == [layer.nbytes for layer in every.cache.layers]


def test_smollm2_shows_kivis_premise(smollm2):
    """SmolLM2's keys have channels 6-18x their head's median in every layer, its values mostly under 5x, and
    per-channel keys lose far less than per-token ones at 2 bits (0.2 vs 0.65 relative error)."""
    model, tokenizer = smollm2
    methods = {n: METHODS[n] for n in ("fp16", "int2-token", "int2-channel")}
    result = qe.evaluate(model, qe.QuantText(64, 0, 1).ids(tokenizer), methods)
    premise = result.premise()
    assert premise["verdict"].tolist() == ["holds", "holds", "holds"]
    channels = result.channels
    assert len(channels) == 30
    assert (channels["k_top_ratio"] >= 5.0).mean() > 0.9
    assert (channels["k_top_ratio"] > channels["v_top_ratio"]).mean() > 0.9
