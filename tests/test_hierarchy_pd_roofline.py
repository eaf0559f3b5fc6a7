"""Prefill/decode disaggregation, the roofline of prefill vs decode, FlashAttention I/O, and the CLI."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kvcore.cli import main
from kvcore.hierarchy import (
    PDConfig,
    ServeRequest,
    ServingWorkload,
    attention_io,
    compare_pd,
    decode_bytes,
    decode_point,
    kv_crossover_context,
    pd_summary,
    prefill_point,
    prefill_with_scores,
)
from kvcore.sched.cost import CostModel
from kvcore.shapes import GPU_PRESETS, PRESETS, kv_bytes

H100 = GPU_PRESETS["H100 80GB"]
LLAMA3 = PRESETS["llama-3-8b"]
COST = CostModel(LLAMA3, H100)
REQS = ServingWorkload(num_requests=120, rate=6.0, seed=2).generate()


def split(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    return df[df["setup"].str.startswith(kind)].reset_index(drop=True)


# -- prefill/decode disaggregation ------------------------------------------------------------------

def test_infinite_link_adds_nothing():
    free = PDConfig(link_bandwidth=math.inf, link_latency_s=0.0)
    assert free.transfer_time(COST, 4096) == 0.0
    fast = split(compare_pd(REQS, COST, free), "disaggregated")
    slow = split(compare_pd(REQS, COST, PDConfig(link_bandwidth=1e9, link_latency_s=1e-3)), "disaggregated")
    assert (fast["kv_transfer_s"] == 0).all()
    assert (slow["kv_transfer_s"] > 0).all()
    # The prefill side does not see the link: TTFT is identical; the decode side waits for it.
    assert fast["ttft_s"].tolist() == slow["ttft_s"].tolist()
    assert (fast["finish_s"] <= slow["finish_s"] + 1e-12).all()
    assert fast["tpot_s"].mean() < slow["tpot_s"].mean()


def test_transfer_time_is_kv_bytes_over_bandwidth_plus_latency():
    cfg = PDConfig(link_bandwidth=25e9, link_latency_s=2e-4)
    assert cfg.transfer_time(COST, 1000) == pytest.approx(kv_bytes(LLAMA3, 1000) / 25e9 + 2e-4)
    one = compare_pd([ServeRequest(0, 0.0, 1000, 8)], COST, cfg)
    assert split(one, "disaggregated")["kv_transfer_s"][0] == pytest.approx(cfg.transfer_time(COST, 1000))


def test_prefills_stall_colocated_decodes():
    df = compare_pd(REQS, COST, PDConfig())
    colo, disagg = split(df, "colocated"), split(df, "disaggregated")
    # A colocated decode waits behind whole prefills; a decode-only GPU never does.
    assert colo["max_itl_s"].quantile(0.9) > 2 * disagg["max_itl_s"].quantile(0.9)
    assert len(colo) == len(disagg) == len(REQS)
    assert colo["output_tokens"].sum() == disagg["output_tokens"].sum()
    summary = pd_summary(df)
    assert list(summary["setup"]) == ["colocated (2 GPUs)", "disaggregated (1P + 1D)"]
    assert summary["slo_attainment"].between(0, 1).all()


def test_single_request_matches_the_cost_model():
    r = ServeRequest(0, 0.0, 512, 3)
    colo = split(compare_pd([r], COST, PDConfig()), "colocated").iloc[0]
    prefill = COST.step_time(512, 512 * 513 // 2, 0)
    assert colo["ttft_s"] == pytest.approx(prefill)
    decode = COST.step_time(1, 513, 513) + COST.step_time(1, 514, 514)
    assert colo["finish_s"] == pytest.approx(prefill + decode)


def test_pd_settings_are_checked():
    with pytest.raises(ValueError, match="prefill_gpus must be in"):
        PDConfig(num_gpus=2, prefill_gpus=2)
    with pytest.raises(ValueError, match="link_bandwidth must be > 0"):
        PDConfig(link_bandwidth=0)
    with pytest.raises(ValueError, match=r"needs \d+ KV tokens"):
        compare_pd([ServeRequest(0, 0.0, 10_000_000, 2)], COST)


# -- roofline -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("batch", "context"), [(1, 1024), (32, 8192), (256, 4096)])
def test_decode_is_below_the_ridge(batch, context):
    p = decode_point(COST, batch, context)
    assert p["intensity"] < H100.ridge_point
    assert p["bound"] == "memory"


@pytest.mark.parametrize("tokens", [2048, 8192, 32768])
def test_long_prefill_is_above_the_ridge(tokens):
    p = prefill_point(COST, tokens)
    assert p["intensity"] > H100.ridge_point
    assert p["bound"] == "compute" == COST.bound(tokens, tokens * (tokens + 1) // 2, 0)


def test_kv_reads_take_over_decode_bytes_as_context_grows():
    crossover = kv_crossover_context(COST, 32)
    df = decode_bytes(COST, 32, [int(crossover / 4), int(crossover * 4)])
    kv = df[df["part"] == "KV read (context)"]["share"].tolist()
    assert kv[0] < 0.5 < kv[1]
    assert df.groupby("context")["share"].sum().tolist() == pytest.approx([1.0, 1.0])


def test_flash_attention_never_writes_the_score_matrix():
    T, s = 8192, LLAMA3
    df = attention_io(COST, T).set_index("method")
    standard, flash = df.iloc[0], df.iloc[1]
    heads = s.num_layers * s.num_q_heads
    assert standard["score_bytes"] == 4 * T * T * 2 * heads  # S and P, each written once and read once, bf16
    assert flash["score_bytes"] == 0
    assert flash["bytes"] == 4 * T * s.head_dim * 2 * heads  # Q, K, V read and O written once
    assert standard["intensity"] < H100.ridge_point < flash["intensity"]
    tiled = df.iloc[2]
    assert flash["bytes"] < tiled["bytes"] < standard["bytes"]
    whole = prefill_with_scores(COST, T)
    assert whole["intensity"][0] > whole["intensity"][1]


# -- command line ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--experiment", "roofline", "--table", "attention"],
                                  ["--experiment", "pd", "--requests", "40"],
                                  ["--experiment", "offload", "--requests", "100", "--workload", "rag"]])
def test_cli_writes_csv(tmp_path, capsys, args):
    out = tmp_path / "t.csv"
    assert main(["hierarchy", *args, "--csv", str(out), "--seed", "1"]) == 0
    assert len(pd.read_csv(out)) > 0
    assert "wrote" in capsys.readouterr().out


def test_cli_rejects_a_table_of_another_experiment(capsys):
    assert main(["hierarchy", "--experiment", "pd", "--table", "attention"]) == 2
    assert "choose from" in capsys.readouterr().err
