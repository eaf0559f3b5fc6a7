"""Time every page's default view with AppTest: the first load (imports, model, caches) and a rerun.

    python benchmarks/pages.py [--runs 3] [--csv pages.csv]

The rerun is what a user waits for after the app is warm (target: under 2 s per page). Times are
wall-clock on this machine in this run; compare them with each other, not across machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.app.conftest import open_page  # noqa: E402
from tests.app.test_url_fuzz import PAGES  # noqa: E402


def time_page(name: str, runs: int) -> dict[str, object]:
    """First load and the median of ``runs`` further default renders of one page, in seconds."""
    t0 = time.perf_counter()
    at = open_page(name)
    first = time.perf_counter() - t0
    if at.exception:
        raise RuntimeError(f"page {name} raised: {at.exception[0].value}")
    warm = []
    for _ in range(runs):
        t0 = time.perf_counter()
        open_page(name)
        warm.append(time.perf_counter() - t0)
    return {"page": name, "first_load_s": round(first, 3), "warm_render_s": round(statistics.median(warm), 3),
            "under_2s": statistics.median(warm) < 2.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pages", nargs="*", default=PAGES)
    parser.add_argument("--csv")
    args = parser.parse_args()
    table = pd.DataFrame([time_page(p, args.runs) for p in args.pages])
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
