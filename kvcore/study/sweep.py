"""A grid's cells through an engine, gathered into one table with each cell's settings as columns.

Each cell is one run of a ``python -m kvcore`` subcommand with the cell's arguments (its ``run(args)``, the
function behind the command line), in a worker of :func:`~kvcore.study.engines.run_tasks`. The gathered
table holds every row each cell's run returned, after a ``cell`` column and one column per crossed setting
(named as in the grid file, with ``_setting`` appended where the experiment's table already has that name),
in cell order whatever order the cells finished in, so every engine gives the same table.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from kvcore.study.engines import TaskResult, run_tasks
from kvcore.study.grid import Cell


@dataclass(slots=True)
class SweepResult:
    """table: every cell's rows with its settings; cells: one row per cell (settings, rows, seconds, error);
    seconds: wall time of the whole sweep; engine: where it ran."""

    table: pd.DataFrame
    cells: pd.DataFrame
    seconds: float
    engine: str

    @property
    def failed(self) -> int:
        return int(self.cells["error"].notna().sum())


def run_cell(args: argparse.Namespace) -> pd.DataFrame:
    """One cell: the subcommand's own ``run(args)``, which returns its table (what it prints goes to stderr, so
    the sweep's standard output holds only the gathered table)."""
    with contextlib.redirect_stdout(sys.stderr):
        table = args.run(args)
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"the experiment returned {type(table).__name__}, not a table")
    return table


def sweep(cells: Sequence[Cell], *, engine: str = "local", jobs: int = 1, address: str | None = None,
          on_result: Callable[[TaskResult], None] | None = None) -> SweepResult:
    """Run every cell with ``engine`` (see :func:`~kvcore.study.engines.run_tasks`) and gather the results."""
    if not cells:
        raise ValueError("the grid has no cells")
    start = time.perf_counter()
    results = run_tasks(run_cell, [c.args for c in cells], engine=engine, jobs=jobs, address=address,
                        resources=[c.resources for c in cells], on_result=on_result)
    seconds = time.perf_counter() - start
    where = f"{engine} ({jobs} job{'s' if jobs != 1 else ''})" if engine == "local" or address is None else \
        f"ray at {address}"
    return SweepResult(gather(cells, results), cell_table(cells, results), seconds, where)


def _shown(value: Any) -> Any:
    return " ".join(map(str, value)) if isinstance(value, list) else value


def gather(cells: Sequence[Cell], results: Sequence[TaskResult]) -> pd.DataFrame:
    """Every cell's table with its ``cell`` index and crossed settings in front; a failed cell is one row with
    its settings and an ``error`` column."""
    frames = []
    for cell, result in zip(cells, results, strict=True):
        table = result.value if result.error is None else pd.DataFrame({"error": [result.error]})
        columns = {"cell": cell.index}
        for key, value in cell.values.items():
            name = key.replace("-", "_")
            columns[f"{name}_setting" if name in table.columns or name == "cell" else name] = _shown(value)
        front = pd.DataFrame({k: [v] * len(table) for k, v in columns.items()}, index=table.index)
        frames.append(pd.concat([front, table], axis=1))
    gathered = pd.concat(frames, ignore_index=True)
    if "error" in gathered.columns:  # the failures' column goes last
        gathered = gathered[[c for c in gathered.columns if c != "error"] + ["error"]]
    return gathered


def cell_table(cells: Sequence[Cell], results: Sequence[TaskResult]) -> pd.DataFrame:
    """One row per cell: index, crossed settings, rows returned, seconds in its worker, error (None when it ran)."""
    rows = []
    for cell, result in zip(cells, results, strict=True):
        rows.append({"cell": cell.index, **{k: _shown(v) for k, v in cell.values.items()},
                     "rows": 0 if result.value is None else len(result.value), "seconds": result.seconds,
                     "error": result.error})
    return pd.DataFrame(rows)
