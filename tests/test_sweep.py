"""python -m kvcore sweep: grid files read and checked key by key, cells parsed as their subcommand parses
them, results gathered in cell order; the local process pool and Ray give exactly the same table."""

from __future__ import annotations

import math
import textwrap

import pandas as pd
import pytest

from kvcore.cli import build_parser, main
from kvcore.study.engines import Resources, TaskResult, run_tasks
from kvcore.study.grid import grid_cells, read_grid
from kvcore.study.sweep import gather, sweep
from tests.conftest import ROOT

# A small deterministic grid: the simulator on 24 requests. Cell 3 cannot run (its chunk budget of 16 is under
# max_num_seqs 64), so every engine must also carry a failure through.
SMALL = """
experiment = "batching"
[settings]
requests = 24
prompt_mean = 128
output_mean = 32
max_prompt = 512
schedulers = ["continuous", "chunked"]
[grid]
max_num_seqs = [8, 64]
chunk_budget = [256, 16]
"""


def parsers():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices


def write(tmp_path, body: str, name: str = "grid.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def cells_of(tmp_path, body: str, **kwargs):
    return grid_cells(read_grid(write(tmp_path, body)), parsers(), **kwargs)


@pytest.mark.parametrize(("body", "message"), [
    ('experiment = "batching"\n[grid]\nmax_seqs = [1, 2]\n', "[grid] unknown setting 'max_seqs' for 'batching'"),
    ('experiment = "batching"\n[settings]\nmodel = "gpt-9"\n', "[settings] 'model': 'gpt-9' is not one of"),
    ('experiment = "batchin"\n', "unknown experiment 'batchin'"),
    ('experiment = "sweep"\n', "unknown experiment 'sweep'"),
    ('experiment = "batching"\ngrids = 1\n', "unknown key 'grids'"),
    ('[grid]\nrate = [1.0]\n', "'experiment' must name a subcommand"),
    ('experiment = "batching"\n[grid]\nrate = []\n', "[grid] 'rate' must be a non-empty list"),
    ('experiment = "batching"\n[grid]\nrate = 3.0\n', "[grid] 'rate' must be a non-empty list"),
    ('experiment = "batching"\n[grid]\nrate = ["fast"]\n', "[grid] 'rate': 'fast' is not valid"),
    ('experiment = "batching"\n[settings]\nprefix_caching = "yes"\n', "'prefix_caching' is an on/off option"),
    ('experiment = "batching"\n[settings]\nrequests = [1, 2]\n', "'requests' takes one value"),
    ('experiment = "eviction"\n[settings]\ncsv = "x.csv"\n', "'csv' cannot be set in a grid"),
    ('experiment = "batching"\n[settings]\nrate = 1.0\n[grid]\nrate = [2.0]\n', "'rate' is both in"),
    ('experiment = "batching"\n[resources]\ngpu = 1\n', "[resources] unknown key 'gpu'"),
    ('experiment = "batching"\n[resources]\ncpus = 0\n', "[resources] cpus per task must be"),
    ('experiment = "batching\n', "not valid TOML"),
])
def test_a_bad_grid_file_names_the_bad_key(tmp_path, body, message):
    with pytest.raises(ValueError, match=r"grid\.toml") as info:
        cells_of(tmp_path, body)
    assert message in str(info.value)


def test_the_command_line_prints_the_error_not_a_traceback(tmp_path, capsys):
    path = write(tmp_path, 'experiment = "batching"\n[grid]\nmax_seqs = [1, 2]\n')
    assert main(["sweep", str(path), "--no-progress"]) == 2
    assert "unknown setting 'max_seqs'" in capsys.readouterr().err


def test_other_file_types_are_refused_and_yaml_reads_like_toml(tmp_path):
    with pytest.raises(ValueError, match=r"a grid file is \.toml"):
        read_grid(write(tmp_path, "experiment: batching", "grid.json"))
    toml = read_grid(write(tmp_path, 'experiment = "batching"\n[grid]\nrate = [1.0, 2.0]\nlengths = ["fixed"]\n'))
    yaml = read_grid(write(tmp_path, "experiment: batching\ngrid:\n  rate: [1.0, 2.0]\n  lengths: [fixed]\n",
                           "grid.yaml"))
    assert (yaml.experiment, yaml.settings, yaml.axes) == (toml.experiment, toml.settings, toml.axes)


def test_cells_cross_the_grid_in_file_order_and_parse_like_the_command_line(tmp_path):
    cells = cells_of(tmp_path, """
        experiment = "batching"
        [settings]
        prefix_caching = true
        schedulers = ["continuous", "chunked"]
        [grid]
        max_num_seqs = [8, 64]
        max-output = [100, 200, 300]
        """, seed=5)
    assert len(cells) == 6
    assert [(c.values["max_num_seqs"], c.values["max-output"]) for c in cells] == [
        (8, 100), (8, 200), (8, 300), (64, 100), (64, 200), (64, 300)]
    cli = build_parser().parse_args(["batching", "--seed", "5", "--prefix-caching", "--schedulers", "continuous",
                                     "chunked", "--max-num-seqs", "64", "--max-output", "100"])
    assert vars(cells[3].args) == {k: v for k, v in vars(cli).items() if k != "command"}


def test_repeated_options_flags_off_and_a_seed_in_the_grid(tmp_path):
    (cell,) = cells_of(tmp_path, """
        experiment = "eviction"
        [settings]
        param = ["streaming_llm.n_sink=2", "h2o.recent_fraction=0.25"]
        kvpress = false
        seed = 9
        """, seed=1)
    assert cell.args.param == ["streaming_llm.n_sink=2", "h2o.recent_fraction=0.25"]
    assert cell.args.kvpress is False
    assert cell.args.seed == 9


def test_a_cell_on_a_cuda_device_asks_for_a_gpu(tmp_path):
    cells = cells_of(tmp_path, 'experiment = "study"\n[grid]\ndevice = ["cpu", "cuda:0"]\n[resources]\ncpus = 2\n')
    assert [c.resources for c in cells] == [Resources(2, 0), Resources(2, 1.0)]


def test_gathered_columns_keep_setting_names_and_mark_a_clash():
    class Cell:
        def __init__(self, index, values):
            self.index, self.values = index, values

    cells = [Cell(0, {"requests": 10, "rate": 1.0}), Cell(1, {"requests": 20, "rate": 2.0})]
    results = [TaskResult(0, pd.DataFrame({"requests": [10, 10], "x": [1, 2]})), TaskResult(1, error="ValueError: no")]
    table = gather(cells, results)
    assert list(table.columns) == ["cell", "requests_setting", "rate", "requests", "x", "error"]
    assert table["cell"].tolist() == [0, 0, 1]
    assert table["rate"].tolist() == [1.0, 1.0, 2.0]
    assert table["error"].isna().tolist() == [True, True, False]


def _square(x: int) -> int:
    if x == 3:
        raise ValueError("three is refused")
    return x * x


def test_tasks_come_back_in_order_with_their_errors():
    seen = []
    results = run_tasks(_square, [1, 2, 3, 4], on_result=lambda r: seen.append(r.index))
    assert [r.value for r in results] == [1, 4, None, 16]
    assert results[2].error == "ValueError: three is refused"
    assert seen == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="engine must be one of"):
        run_tasks(_square, [1], engine="dask")
    with pytest.raises(ValueError, match="--address joins a Ray cluster"):
        run_tasks(_square, [1], address="auto")


@pytest.fixture(scope="module")
def small_cells(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "small.toml"
    path.write_text(SMALL)
    return grid_cells(read_grid(path), parsers())


@pytest.fixture(scope="module")
def in_process(small_cells):
    return sweep(small_cells, engine="local", jobs=1)


def test_the_small_grid_gathers_every_cell_and_its_failure(in_process):
    table = in_process.table
    assert table["cell"].tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert table["scheduler"].iloc[:2].tolist() == ["continuous batching", "chunked prefill"]
    assert (table["requests"].iloc[:6] == 24).all()
    assert "max_num_batched_tokens must be an integer >= max_num_seqs (64)" in table["error"].iloc[-1]
    assert in_process.failed == 1


def test_a_process_pool_returns_values_and_errors_in_task_order():
    results = run_tasks(math.factorial, [5, -1, 3], jobs=2)
    assert [r.value for r in results] == [120, None, 6]
    assert results[1].error.startswith("ValueError: factorial() not defined for negative values")
    assert all(r.seconds >= 0 for r in results)


@pytest.mark.slow
def test_ray_gives_exactly_the_table_of_the_local_engine(small_cells, in_process, monkeypatch):
    # A one-node Ray on the loopback interface (Ray's switch for single-machine clusters, read when ray is imported)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = sweep(small_cells, engine="ray")
        assert ray.is_initialized()  # a Ray the caller started is left running
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(on_ray.table, in_process.table)
    assert on_ray.cells["error"].notna().tolist() == [False, False, False, True]


@pytest.mark.parametrize("path", sorted((ROOT / "kvcore" / "study" / "grids").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_grid_file_parses_into_cells(path):
    grid = read_grid(path)
    assert len(grid_cells(grid, parsers())) == grid.num_cells >= 2
