"""Peak memory and time of each page at its heaviest allowed setting, with the bundled model loaded.

    python benchmarks/memory.py [--pages eviction quantization] [--csv memory.csv]

Each page runs in its own process (so peak RSS is the page's alone, plus the app and the bundled
model): every numeric widget is set to its maximum through the URL, every toggle and checkbox
turned on, and the page is rendered once with AppTest. The deployment target is a Streamlit
Community Cloud container (690 MB to 2.7 GB); the goal is a peak under 1.5 GB per page.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LIMIT_MB = 1500
# Pages whose limits interact, so that every widget at its maximum is a refused view: their heaviest legal one.
# Serving engine: 41 requests of up to 256 + 400 + 64 tokens is the most the work limit allows with the longest
# prefix; 9 sequences at a time the most whose padded prefill transformers may hold; 1,024 fp32 blocks the most
# pools the page allows (kvcore.engine.report).
HEAVIEST_ALLOWED = {
    "serving_engine": {"eg_n": "41", "eg_pmax": "400", "eg_omax": "64", "eg_prefix": "256", "eg_share": "1",
                       "eg_blocks": "1024", "eg_seqs": "9", "eg_budget": "2048", "eg_apc": "true",
                       "eg_chunked": "true", "eg_hf": "true"},
}


def heaviest_query(page: str) -> dict[str, str]:
    """The URL that sets every bound numeric widget of ``page`` to its maximum and every switch on."""
    from tests.app.conftest import open_page
    from tests.app.test_url_fuzz import bound_widgets

    query = {}
    for key, widget in bound_widgets(open_page(page)).items():
        hi = getattr(widget, "max", None)
        if type(widget).__name__ == "SelectSlider":
            query[key] = str(widget.options[-1])
        elif hi is not None:
            query[key] = str(int(hi)) if float(hi).is_integer() else str(hi)
        elif isinstance(widget.value, bool):
            query[key] = "true"
    return query


def run_one(page: str) -> dict[str, object]:
    """Child process: load the bundled model, render the page at its heaviest, report peak RSS."""
    from kvcore.models import load_model
    from tests.app.conftest import open_page

    load_model(None)
    query = HEAVIEST_ALLOWED.get(page) or heaviest_query(page)
    t0 = time.perf_counter()
    at = open_page(page, query, timeout=600)
    wall = time.perf_counter() - t0
    errors = [e.value for e in at.exception] + [e.value for e in at.error]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"page": page, "peak_rss_MB": round(peak_mb), "render_s": round(wall, 1), "under_limit": peak_mb < LIMIT_MB,
            "settings": json.dumps(query), "messages": " | ".join(str(e)[:120] for e in errors)}


def main() -> None:
    from tests.app.test_url_fuzz import PAGES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", nargs="*", default=PAGES)
    parser.add_argument("--csv")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child)))
        return
    rows = []
    for page in args.pages:
        done = subprocess.run([sys.executable, __file__, "--child", page], cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else {"page": page, "messages": done.stderr[-300:]})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.drop(columns=["settings"], errors="ignore").to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
