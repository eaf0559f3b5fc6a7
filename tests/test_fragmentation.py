"""Fragmentation accounting, narrated on workloads small enough to count by hand; workload lengths;
parallel-sampling memory; the ``paged`` CLI subcommand."""

import numpy as np
import pandas as pd
import pytest

from kvcore.cli import main
from kvcore.paged import (
    FragmentationConfig,
    LengthDistribution,
    fragmentation_experiment,
    generate_workload,
    parallel_sampling_memory,
    waste_breakdown,
)
from kvcore.paged.contiguous import FirstFitAllocator
from kvcore.paged.fragmentation import _PagedRun, simulate_contiguous


def fixed_config(**kw):
    """4 requests of prompt 10 + output 6 = 16 tokens; memory 64 slots (16 blocks of 4); max_seq_len 32."""
    base = {"num_requests": 4, "prompt": LengthDistribution("fixed", 10), "output": LengthDistribution("fixed", 6),
            "max_seq_len": 32, "block_size": 4, "num_blocks": 16}
    return FragmentationConfig(**(base | kw))


def test_three_allocators_on_a_fixed_workload_counted_by_hand():
    rows = fragmentation_experiment(fixed_config()).set_index("allocator")
    # Max length: 2 requests at a time (2 x 32 = 64 slots), 6 steps each pair. Per pair, over the steps
    # s = 1..6: used 2(10 + s), reserved 2(6 - s), never used 2 x 16.
    # Sums: used 2 x 162, reserved 2 x 30, internal 2 x 192 -> waste 444 / 768.
    mx = rows.loc["contiguous, max length"]
    assert mx.steps == 12
    assert mx.peak_running == 2
    assert mx.waste_pct == pytest.approx(100 * 444 / 768)
    assert mx.internal_waste == pytest.approx(384 / 12)
    # Exact length: 4 x 16 = 64 slots, all 4 at once for 6 steps; waste is only the reserved future.
    ex = rows.loc["contiguous, exact length"]
    assert ex.steps == 6
    assert ex.peak_running == 4
    assert ex.waste_pct == pytest.approx(100 * 60 / 384)
    assert ex.external_waste == 0
    # Paged: 3 blocks per prompt; lengths 11..16 leave 1, 0, 3, 2, 1, 0 empty slots in the last block.
    pg = rows.loc["paged"]
    assert pg.steps == 6
    assert pg.preemptions == 0
    assert pg.internal_waste == pytest.approx(4 * 7 / 6)
    assert pg.waste_pct == pytest.approx(100 * 28 / (324 + 28))


def test_external_fragmentation_when_holes_are_too_small():
    """10 slots, exact length. r0 [0,3) and r1 [3,9) run; r2 (4 slots) waits. r0 ends after step 1:
    free holes of 3 and 1 add up to 4 but none holds r2, so for steps 2 and 3 all 4 free slots are
    external waste. r1 ends after step 3, the holes merge, r2 runs in step 4."""
    config = FragmentationConfig(num_requests=3, max_seq_len=10, block_size=1, num_blocks=10)
    totals = simulate_contiguous(np.array([2, 3, 3]), np.array([1, 3, 1]), config, exact=True)
    assert totals.steps == 4
    assert totals.sums == {"used": 22, "reserved_future": 3, "internal_waste": 0, "external_waste": 8}
    assert totals.row("exact", 10)["waste_pct"] == pytest.approx(100 * 11 / 33)


def test_paged_preempts_when_blocks_run_out_and_still_finishes_everything():
    config = fixed_config(num_requests=6, num_blocks=14)
    workload = config.workload()
    run = _PagedRun(workload["prompt_len"].to_numpy(), workload["output_len"].to_numpy(), config)
    while run.waiting or run.running:
        run.admit()
        run.decode()
    assert run.totals.preemptions > 0
    assert (run.generated == workload["output_len"].to_numpy()).all()
    assert run.manager.num_free_blocks == config.num_blocks
    assert run.used == 0


def test_default_workload_orders_the_allocators():
    summary = fragmentation_experiment(FragmentationConfig(num_requests=60))
    waste = summary.set_index("allocator")["waste_pct"]
    assert waste["paged"] < waste["contiguous, exact length"] < waste["contiguous, max length"]
    parts = waste_breakdown(summary)
    assert np.allclose(parts.groupby("allocator")["percent"].sum(), 100.0)


def test_first_fit_splits_and_merges():
    a = FirstFitAllocator(10)
    assert [a.allocate(3), a.allocate(3), a.allocate(3)] == [0, 3, 6]
    assert a.allocate(2) is None
    assert a.holes() == [1]
    a.free(3, 3)
    assert a.holes() == [3, 1]
    assert a.largest_hole() == 3
    assert a.allocate(2) == 3
    a.free(0, 3)
    a.free(6, 3)
    assert a.holes() == [3, 5]
    a.free(3, 2)
    assert a.holes() == [10]
    assert a.num_free == 10
    with pytest.raises(ValueError, match="double free"):
        a.free(0, 1)


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert (LengthDistribution("fixed", 7).sample(5, rng) == 7).all()
    uniform = LengthDistribution("uniform", 100, 0.5).sample(2000, rng)
    assert uniform.min() >= 50
    assert uniform.max() <= 150
    lognormal = LengthDistribution("lognormal", 300, 1.0).sample(50_000, rng)
    assert lognormal.mean() == pytest.approx(300, rel=0.05)
    assert lognormal.min() >= 1
    with pytest.raises(ValueError, match="one of fixed, uniform, lognormal"):
        LengthDistribution("zipf", 10)
    with pytest.raises(ValueError, match=r"spread for uniform must be in 0\.\.1"):
        LengthDistribution("uniform", 10, 2.0)


def test_workload_is_seeded_and_clipped():
    p, o = LengthDistribution("lognormal", 400, 1.5), LengthDistribution("lognormal", 400, 1.5)
    a = generate_workload(300, p, o, max_seq_len=512, seed=3)
    pd.testing.assert_frame_equal(a, generate_workload(300, p, o, max_seq_len=512, seed=3))
    assert ((a.prompt_len + a.output_len) <= 512).all()
    assert (a.output_len >= 1).all()
    assert not a.equals(generate_workload(300, p, o, max_seq_len=512, seed=4))


def test_config_validation():
    with pytest.raises(ValueError, match="must fit in memory"):
        FragmentationConfig(max_seq_len=4096, num_blocks=16, block_size=16)
    with pytest.raises(ValueError, match="num_requests must be an integer >= 1"):
        FragmentationConfig(num_requests=0)


def test_parallel_sampling_with_fork_counted_by_hand():
    """Prompt 10, output 6, block size 4, n = 4. Separate copies: 4 x 4 blocks. Fork: the 2 full prompt
    blocks are shared; each sample ends with 2 blocks of its own (the copied partial block + one more)."""
    workload = pd.DataFrame({"prompt_len": [10], "output_len": [6]})
    table = parallel_sampling_memory(workload, n_values=(1, 4), block_size=4).set_index("n")
    assert table.loc[1, "blocks_no_sharing"] == table.loc[1, "blocks_shared"] == 4
    assert table.loc[4, "blocks_no_sharing"] == 16
    assert table.loc[4, "blocks_shared"] == 2 + 4 * 2
    assert table.loc[4, "saved_pct"] == pytest.approx(100 * (1 - 10 / 16))


def test_cli_paged_writes_csv(tmp_path, capsys):
    out = tmp_path / "paged.csv"
    assert main(["paged", "--requests", "30", "--dist", "uniform", "--spread", "0.5", "--csv", str(out)]) == 0
    table = pd.read_csv(out)
    assert table["allocator"].tolist() == ["contiguous, max length", "contiguous, exact length", "paged"]
    assert "waste_pct" in capsys.readouterr().out
    assert main(["paged", "--dist", "uniform", "--spread", "2"]) == 2
