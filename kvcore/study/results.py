"""A results folder: a CSV and a JSON per table, the exact settings and versions, and one file per finished cell.

``<folder>/<table>.csv`` and ``<table>.json`` (records, NaN as null) hold each table; ``settings.json`` the
settings, the versions of Python and the packages, the commit of the lab and the machine; ``cells/<name>.json``
one finished cell each, written as soon as it finishes, so ``--resume`` can skip it after an interruption.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

import kvcore
from kvcore.device import describe, get_device

PACKAGES = ("torch", "transformers", "numpy", "pandas", "ray")
REPO = Path(kvcore.__file__).resolve().parents[1]


def write_table(folder: Path, name: str, table: pd.DataFrame) -> list[Path]:
    """``<name>.csv`` and ``<name>.json`` of ``table`` in ``folder``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    csv, js = folder / f"{name}.csv", folder / f"{name}.json"
    table.to_csv(csv, index=False)
    js.write_text(table.to_json(orient="records", indent=1, double_precision=15) + "\n", encoding="utf-8")
    return [csv, js]


def read_table(folder: Path, name: str) -> pd.DataFrame:
    """The table ``name`` written by :func:`write_table` (from its CSV)."""
    return pd.read_csv(folder / f"{name}.csv")


def versions() -> dict[str, Any]:
    """Python, the packages that make the numbers, the lab's commit (with ``dirty`` when the tree has
    uncommitted changes) and the machine."""
    found: dict[str, Any] = {"python": sys.version.split()[0], "kvcore": kvcore.__version__}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found |= _commit()
    found |= {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "device": describe(get_device())}
    return found


def _commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def write_settings(folder: Path, settings: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Path:
    """``settings.json``: the settings, the versions and when the run started."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"settings": dict(settings), "versions": versions(),
              "started": datetime.now(UTC).isoformat(timespec="seconds"), **(extra or {})}
    path = folder / "settings.json"
    path.write_text(json.dumps(_plain(record), indent=1) + "\n", encoding="utf-8")
    return path


def read_settings(folder: Path) -> dict[str, Any] | None:
    """The settings a folder's run was made with, or None when the folder holds none."""
    path = folder / "settings.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("settings")


def settings_difference(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two settings records (compared as JSON values)."""
    a, b = _plain(dict(before)), _plain(dict(now))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def write_cell(folder: Path, name: str, record: Mapping[str, Any]) -> Path:
    """``cells/<name>.json``, written to a temporary name first so an interruption never leaves half a cell."""
    cells = folder / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    path, tmp = cells / f"{name}.json", cells / f".{name}.json.tmp"
    tmp.write_text(json.dumps(_plain(dict(record))) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_cells(folder: Path) -> dict[str, dict[str, Any]]:
    """Every finished cell of a folder, by name."""
    cells = folder / "cells"
    if not cells.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(cells.glob("*.json"))}


def clear_cells(folder: Path) -> None:
    """Remove the finished cells of an earlier run (a run without ``--resume`` starts afresh)."""
    for path in (folder / "cells").glob("*.json"):
        path.unlink()


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, non-finite floats as None, numpy scalars as Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
