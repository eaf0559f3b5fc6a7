"""Where the Live model page opens and how it judges token 0 in every layer: the first layer past a sixth of the
depth (the first layers attend locally: StreamingLLM, Xiao et al. 2023), and the one sink detector applied layer by
layer; SmolLM2's token 0 is a sink there, the bundled model's nowhere."""

from __future__ import annotations

import pytest
import torch

from kvcore.models.attention import AttentionPatterns
from kvcore.models.generate import GenerationSettings
from kvcore.models.live import key_sink_by_layer, opening_layer, run_attention, run_live
from kvcore.plans import make_plan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("layers", "opens"), [(1, 0), (5, 0), (6, 1), (12, 2), (30, 5), (32, 5)])
def test_the_page_opens_past_a_sixth_of_the_depth(layers, opens):
    assert opening_layer(layers) == opens


def test_a_model_has_at_least_one_layer():
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        opening_layer(0)


def test_token_zero_is_judged_in_every_layer_by_the_detector():
    """Layer 0 spreads every query evenly (1.0x the uniform share); layer 1 sends every query to token 0, which
    gets (t + 1)x the uniform share 1 / (t + 1) from query t: the mean over queries 2..5 is 4.5x."""
    T = 6
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]  # [T, T]
    sink = torch.zeros(T, T)
    sink[:, 0] = 1.0
    attention = torch.stack([uniform, sink])[:, None].expand(2, 3, T, T)  # [L, Hq, T, T]
    table = key_sink_by_layer(attention, AttentionPatterns(sink_ratio=4.0, min_distance=2, min_queries=1))
    assert table["layer"].tolist() == [0, 1]
    assert table["received_vs_uniform"].tolist() == pytest.approx([1.0, (3 + 4 + 5 + 6) / 4])
    assert table["sink"].tolist() == [False, True]
    with pytest.raises(ValueError, match=r"key must be in 0\.\.5"):
        key_sink_by_layer(attention, AttentionPatterns(), key=6)


def test_smollm2_opens_on_a_layer_where_token_zero_is_a_sink(smollm2):
    model, tokenizer = smollm2
    run = run_live(model, tokenizer, "The import statement", GenerationSettings(max_new_tokens=24),
                   make_plan("full", 0, "original"))
    table = key_sink_by_layer(run_attention(model, run), AttentionPatterns.for_length(len(run.ids)))
    assert table.loc[opening_layer(len(table)), "sink"]
    assert table["sink"].sum() >= 20  # of 30 layers: token 0 is a sink through most of the model
    assert not table.loc[:2, "sink"].any()  # the first layers attend locally
