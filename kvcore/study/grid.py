"""Grid files: one experiment (any ``python -m kvcore`` subcommand), settings fixed for every cell, settings to cross.

A grid file is TOML (``.toml``, read with the standard library's ``tomllib``) or YAML (``.yaml`` / ``.yml``,
when PyYAML is installed). Four keys, nothing else::

    experiment = "batching"              # the subcommand
    [settings]                           # the same in every cell (optional)
    requests = 100
    [grid]                               # every combination of these values is one cell, in file order
    max_num_seqs = [64, 256]
    schedulers = [["continuous"], ["chunked"]]   # an option taking several values: one list per cell
    [resources]                          # what each cell asks of the engine (optional)
    cpus = 1                             # cores (and torch threads) per cell
    gpus = 0                             # GPUs per cell (Ray places them; a cell whose settings name a
                                         # cuda device asks for one by itself)
    retries = 3                          # Ray reruns of a cell whose worker died

Setting names are the subcommand's options, with ``_`` or ``-`` (``max_num_seqs``, ``max-num-seqs``); an on/off
option takes ``true``/``false``. Every value is checked against the option (its type and its choices) before
any cell runs, and an error names the file, the table and the key.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcore.study.engines import Resources

SECTIONS = ("experiment", "settings", "grid", "resources")
RESOURCE_KEYS = ("cpus", "gpus", "retries")
MAX_CELLS = 100_000
RESERVED = {"csv": "the sweep writes the gathered table itself (sweep --csv)", "help": "not a setting"}
NOT_SWEEPABLE = ("sweep",)
_FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)


@dataclass(slots=True)
class Grid:
    """A parsed grid file. settings: fixed values; axes: values to cross (each a non-empty list); source: the file."""

    experiment: str
    settings: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    source: str = "grid"

    @property
    def num_cells(self) -> int:
        count = 1
        for values in self.axes.values():
            count *= len(values)
        return count


@dataclass(slots=True)
class Cell:
    """One cell: its index, the crossed settings (the sweep table's columns), its parsed arguments, its resources."""

    index: int
    values: dict[str, Any]
    args: argparse.Namespace
    resources: Resources


def read_grid(path: str | Path) -> Grid:
    """Read and check the structure of a grid file (not yet its settings: see :func:`grid_cells`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"grid file {str(path)!r} not found")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path.name}: not valid TOML: {exc}") from exc
    elif suffix in (".yaml", ".yml"):
        data = _yaml(text, path.name)
    else:
        raise ValueError(f"{path.name}: a grid file is .toml (or .yaml / .yml), got {suffix or 'no suffix'!r}")
    return parse_grid(data, path.name)


def _yaml(text: str, name: str) -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise ValueError(f"{name}: reading YAML needs PyYAML (pip install pyyaml); or write the grid as TOML") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{name}: not valid YAML: {exc}") from exc


def parse_grid(data: Any, source: str = "grid") -> Grid:
    """Check a grid file's tables: known keys only, a named experiment, non-empty lists to cross."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: a grid file is a table with the keys {', '.join(SECTIONS)}")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}; a grid file has only {', '.join(SECTIONS)}")
    experiment = data.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        raise ValueError(f"{source}: 'experiment' must name a subcommand of python -m kvcore, e.g. \"batching\"")
    tables = {}
    for name in ("settings", "grid", "resources"):
        table = data.get(name) or {}
        if not isinstance(table, Mapping):
            raise ValueError(f"{source}: [{name}] must be a table of key = value, got {type(table).__name__}")
        tables[name] = dict(table)
    for key, values in tables["grid"].items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{source}: [grid] {key!r} must be a non-empty list of values to cross, got {values!r}")
    for key in tables["resources"]:
        if key not in RESOURCE_KEYS:
            raise ValueError(f"{source}: [resources] unknown key {key!r}; allowed: {', '.join(RESOURCE_KEYS)}")
    both = set(tables["settings"]) & set(tables["grid"])
    if both:
        raise ValueError(f"{source}: {sorted(both)[0]!r} is both in [settings] and in [grid]; keep it in one")
    grid = Grid(experiment, tables["settings"], tables["grid"], tables["resources"], source)
    if grid.num_cells > MAX_CELLS:
        raise ValueError(f"{source}: {grid.num_cells:,} cells, more than {MAX_CELLS:,}; cross fewer values")
    return grid


def settings_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options of a subcommand a grid may set, by destination name."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in RESERVED}


def grid_cells(grid: Grid, parsers: Mapping[str, argparse.ArgumentParser], seed: int = 0,
               resources: Resources | None = None) -> list[Cell]:
    """Every cell of ``grid`` as parsed arguments of its subcommand (``parsers``: subcommand -> parser).

    seed: each cell's ``--seed`` unless the grid sets one. resources: per-cell resources overriding the file's.
    Raises ValueError naming the file, the table and the key of the first bad setting.
    """
    if grid.experiment not in parsers or grid.experiment in NOT_SWEEPABLE:
        allowed = [name for name in parsers if name not in NOT_SWEEPABLE]
        raise ValueError(f"{grid.source}: unknown experiment {grid.experiment!r}; choose from {', '.join(allowed)}")
    parser = parsers[grid.experiment]
    options = settings_of(parser)
    fixed = [w for k, v in grid.settings.items() for w in _argv(options[_dest(k, options, grid, "settings")], v,
                                                                 grid.source, "settings", k)]
    keys = list(grid.axes)
    axes = [[(v, _argv(options[_dest(k, options, grid, "grid")], v, grid.source, "grid", k)) for v in grid.axes[k]]
            for k in keys]
    base = resources or file_resources(grid)
    cells = []
    for index, combination in enumerate(itertools.product(*axes)):
        values = {k: v for k, (v, _) in zip(keys, combination, strict=True)}
        argv = ["--seed", str(seed), *fixed, *(w for _, words in combination for w in words)]
        args = _parse(parser, argv, grid.source, values)
        cells.append(Cell(index, values, args, _with_gpu(base, grid.settings | values)))
    return cells


def _dest(key: str, options: dict[str, argparse.Action], grid: Grid, table: str) -> str:
    if not isinstance(key, str):
        raise ValueError(f"{grid.source}: [{table}] keys are option names, got {key!r}")
    dest = key.replace("-", "_")
    if dest in RESERVED:
        raise ValueError(f"{grid.source}: [{table}] {key!r} cannot be set in a grid: {RESERVED[dest]}")
    if dest not in options:
        raise ValueError(f"{grid.source}: [{table}] unknown setting {key!r} for {grid.experiment!r}; its settings: "
                         + ", ".join(sorted(options)))
    return dest


def _argv(action: argparse.Action, value: Any, source: str, table: str, key: str) -> list[str]:
    """The command-line words that give ``action`` the value ``value`` (checked against its type and choices)."""
    where = f"{source}: [{table}] {key!r}"
    if isinstance(action, _FLAGS):
        if not isinstance(value, bool):
            raise ValueError(f"{where} is an on/off option: give true or false, got {value!r}")
        on = not isinstance(action, argparse._StoreFalseAction)
        return [action.option_strings[0]] if value == on else []
    if isinstance(value, Mapping):
        raise ValueError(f"{where} must be a value or a list of values, got a table")
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    repeated = isinstance(action, argparse._AppendAction)
    if isinstance(value, list) and not (many or repeated):
        raise ValueError(f"{where} takes one value, got the list {value!r}")
    items = value if isinstance(value, list) else [value]
    if action.nargs == "+" and not items:
        raise ValueError(f"{where} needs at least one value")
    words = [_word(action, item, where) for item in items]
    if repeated:
        return [w for word in words for w in (action.option_strings[0], word)]
    return [action.option_strings[0], *words]


def _word(action: argparse.Action, item: Any, where: str) -> str:
    if isinstance(item, list | Mapping) or item is None:
        raise ValueError(f"{where}: {item!r} is not a plain value")
    word = str(item).lower() if isinstance(item, bool) else str(item)
    converted: Any = word
    if callable(action.type):
        try:
            converted = action.type(word)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"{where}: {item!r} is not valid ({exc})") from exc
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
    return word


def _parse(parser: argparse.ArgumentParser, argv: list[str], source: str, values: dict) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit as exc:
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else str(exc)
        raise ValueError(f"{source}: the cell {values} is refused by {parser.prog!r}: {message}") from None


def file_resources(grid: Grid) -> Resources:
    """The grid file's ``[resources]`` (defaults for what it leaves out)."""
    try:
        return Resources(**grid.resources)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{grid.source}: [resources] {exc}") from exc


def _with_gpu(base: Resources, settings: Mapping[str, Any]) -> Resources:
    """A cell whose settings name a CUDA device asks for one GPU (unless the grid asks for some already)."""
    cuda = any(isinstance(v, str) and v.startswith("cuda") for v in settings.values())
    return Resources(base.cpus, 1.0, base.retries) if cuda and not base.gpus else base
