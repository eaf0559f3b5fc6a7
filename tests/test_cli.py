"""python -m kvcore: subcommands print a table and write the same table as CSV."""

import subprocess
import sys

import pandas as pd

from kvcore.cli import main
from kvcore.shapes import PRESETS, kv_bytes
from tests.conftest import ROOT


def test_memory_subcommand_writes_csv(tmp_path, capsys):
    out = tmp_path / "kv.csv"
    assert main(["memory", "--model", "llama-3-8b", "--tokens", "8192", "--batch", "2", "--csv", str(out)]) == 0
    table = pd.read_csv(out)
    assert table.loc[0, "kv_bytes_total"] == kv_bytes(PRESETS["llama-3-8b"], 8192, 2)
    assert "llama-3-8b" in capsys.readouterr().out


def test_bad_value_is_an_error_message_not_a_traceback(capsys):
    assert main(["memory", "--tokens", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_module_entry_point_lists_subcommands():
    done = subprocess.run([sys.executable, "-m", "kvcore", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "memory" in done.stdout


def test_quant_subcommand_measures_bytes_and_perplexity(tmp_path):
    out = tmp_path / "quant.csv"
    assert main(["quant", "--methods", "fp16", "int8-token", "--tokens", "64", "--csv", str(out)]) == 0
    table = pd.read_csv(out).set_index("method")
    assert table.loc["fp16", "bytes_ratio"] == 1.0
    assert table.loc["int8-token", "bytes"] < table.loc["fp16", "bytes"]
    assert abs(table.loc["int8-token", "ppl_vs_fp16"] - 1) < 0.01


def test_paged_subcommand_runs_each_part_of_the_page(tmp_path):
    out = tmp_path / "sampling.csv"
    assert main(["paged", "--experiment", "sampling", "--requests", "20", "--csv", str(out)]) == 0
    sampling = pd.read_csv(out).set_index("n")
    assert sampling.loc[1, "saved_pct"] == 0
    assert sampling.loc[8, "blocks_shared"] < sampling.loc[8, "blocks_no_sharing"]
    out = tmp_path / "attention.csv"
    assert main(["paged", "--experiment", "attention", "--model", "llama-3-8b", "--batch", "2", "--context", "100",
                 "--csv", str(out)]) == 0
    check = pd.read_csv(out).iloc[0]
    assert (check.batch, check.tokens, check.q_heads, check.kv_heads) == (2, 150, 32, 8)
    assert check.max_abs_diff < 1e-5


def test_search_prints_a_table_a_terminal_can_read(tmp_path, capsys, monkeypatch):
    # a configuration that cannot serve the workload carries its error message: printed whole, it made one column
    # hundreds of characters wide
    monkeypatch.setenv("COLUMNS", "100")
    out = tmp_path / "configs.csv"
    code = main(["search", "--requests", "30", "--prompt-mean", "256", "--output-mean", "32", "--max-num-seqs", "8",
                 "--max-num-batched-tokens", "512", "2048", "--schedulers", "continuous", "--block-sizes", "16",
                 "--prefix-caching", "off", "--probes", "0", "--csv", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in printed) <= 100
    error = pd.read_csv(out)["error"].dropna()
    assert len(error) == 1
    assert len(error.iloc[0]) > 40  # the CSV keeps the whole message
    assert any(error.iloc[0][:30] in line for line in printed)
    assert not any(error.iloc[0] in line for line in printed)  # the terminal gets it cut
