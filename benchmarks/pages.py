"""What a visitor waits for, in a real browser: every page's first view on a fresh server, a reload, one click, a
slider step; with the load average of each measurement.

    python benchmarks/pages.py                        # the whole benchmark, written to benchmarks/RESULTS.md
    python benchmarks/pages.py --pages eviction live_model --no-results

Starts ``streamlit run app.py`` (headless) on a free port and drives Chromium (``/usr/bin/chromium`` or
``$KVLAB_CHROMIUM``) through Playwright. A wait ends with the server's last ``script_finished`` message after the
action, once none has come for :data:`QUIET_MS`: a whole run's for a first view, a reload or a click (the page is
complete; a section computed in the background may still show its progress bar). A slider step of a step player
runs until the player's title, drawn by Plotly in the browser, shows the new step (a server-side end would also
count the polls of any bar still on the page). "Filled in" runs on from the first view until the sections that
follow background work have filled in: no run of any kind (a waiting section polls every second) for
:data:`FILLED_QUIET_MS`. The time runs from the navigation (first view, reload) or the key press or click.

Two passes by default, each on a server started afresh: ``empty`` gives the server an empty results cache on disk
(``KVLAB_RESULTS_CACHE`` in a new temporary folder: what the very first visitor of a new deployment waits for), and
``kept`` restarts the server on the folder the first pass filled (a restarted server, e.g. after a deploy with no
code change). Pages are opened in the navigation's order, each in a new tab, as a visitor clicking through would.
Times are wall-clock on this machine under the load shown; compare rows of one run, not machines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.app_server import CHROMIUM, CHROMIUM_FLAGS, app_server  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_CACHE_ENV = "KVLAB_RESULTS_CACHE"  # ui.disk_cache reads it
QUIET_MS = 900  # the script must stay stopped this long for a wait to end (a rerun may follow a first run)
FILLED_QUIET_MS = 3000  # no run at all this long: no section polls for background work any more (it polls every 1 s)
BEGIN, END = "<!-- pages-benchmark:begin -->", "<!-- pages-benchmark:end -->"

# url path -> the page's name in the table
PAGES = {"": "Home", "paged_blocks": "Paged blocks", "continuous_batching": "Continuous batching",
         "serving_engine": "Serving engine", "eviction": "Eviction", "quantization": "Quantization",
         "sharing": "Sharing", "memory_hierarchy": "Memory hierarchy", "live_model": "Live model"}


@dataclass(frozen=True, slots=True)
class Click:
    """One setting changed as a visitor would: ``kind`` is ``number:<value>``, ``slider:<key>``, ``radio:<option>``,
    ``segment:<option>`` (a segmented control's button) or ``select:<option>``; ``url`` appears in the URL after."""

    label: str
    kind: str
    url: str


# The settings one click away that each page is timed on (the first is the table's "one click" column).
CLICKS: dict[str, list[Click]] = {
    "": [Click("Context length (tokens)", "number:4096", "tokens=4096")],
    "paged_blocks": [Click("Blocks in the pool", "slider:ArrowRight", "blocks=")],
    "continuous_batching": [Click("Preemption", "radio:swap", "pre=swap")],
    "serving_engine": [Click("Seed", "number:3", "eg_seed=3")],
    "eviction": [Click("Mode", "segment:prefill", "mode=prefill"),
                 Click("Positions after eviction", "segment:rerotate", "pos=rerotate")],
    "quantization": [Click("Generated tokens", "number:16", "qgen=16")],
    "sharing": [Click("Context (tokens)", "number:4096", "sh_tokens=4096")],
    "memory_hierarchy": [Click("Remote (GB)", "number:200", "h_r_gb=200")],
    "live_model": [Click("New tokens", "number:12", "lm_new=12")],
}
# The URL key of each page's model choice (``--model`` sets it on these pages).
MODEL_KEYS = {"serving_engine": "eg_model", "eviction": "model", "quantization": "qmodel", "live_model": "lm_model"}
# Step players: their slider's label; one step back is timed.
STEPS = {"eviction": "Step (query position)", "live_model": "Step (generated token)"}

class RunWatch:
    """The ``script_finished`` messages the server sends a tab, with the time each arrived (perf_counter seconds):
    ``finished`` every one (a whole run's or a fragment's), ``whole`` those of whole runs."""

    def __init__(self, tab) -> None:
        self.finished: list[float] = []
        self.whole: list[float] = []
        tab.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload: bytes | str) -> None:
        if isinstance(payload, bytes | bytearray):
            msg = ForwardMsg()
            msg.ParseFromString(bytes(payload))
            if msg.WhichOneof("type") == "script_finished":
                now = time.perf_counter()
                self.finished.append(now)
                if msg.script_finished != ForwardMsg.FINISHED_FRAGMENT_RUN_SUCCESSFULLY:
                    self.whole.append(now)


@contextmanager
def fresh_server(results_cache: Path) -> Iterator[str]:
    """A fresh server with its results cache in ``results_cache``; yields the URL."""
    with app_server({RESULTS_CACHE_ENV: str(results_cache)}) as url:
        yield url


def wait_finished(tab, runs: list[float], since: float, quiet_ms: float = QUIET_MS, timeout_s: float = 600.0) -> float:
    """Seconds from ``since`` (perf_counter) until the last of ``runs`` (a :class:`RunWatch` list) the server
    finished after it, once none has finished for ``quiet_ms`` (a rerun may follow a run)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tab.wait_for_timeout(20)  # lets Playwright deliver the websocket frames
        after = [t for t in runs if t >= since]
        if after and (time.perf_counter() - after[-1]) * 1e3 >= quiet_ms:
            return after[-1] - since
    raise TimeoutError(f"no run finished within {timeout_s:.0f} s")


def do_click(page, click: Click) -> None:
    """Change one setting as a visitor would."""
    kind, _, value = click.kind.partition(":")
    if kind == "slider":
        slider_thumb(page, click.label).press(value or "ArrowRight")
    elif kind == "radio":
        page.get_by_role("radio", name=value, exact=True).click()
    elif kind == "segment":
        group = page.get_by_role("radiogroup", name=click.label, exact=True)
        group.get_by_role("radio", name=value, exact=True).first.click()
    elif kind == "select":
        page.get_by_label(click.label, exact=True).click()
        page.get_by_role("option", name=value, exact=True).click()
    else:
        box = page.get_by_label(click.label, exact=True)
        box.fill(value)
        box.press("Enter")


def slider_thumb(page, label: str):
    """The focused thumb of the Streamlit slider labelled ``label``."""
    thumb = page.locator("[data-testid='stSlider']").filter(has=page.get_by_text(label, exact=True)).locator(
        "input[type='range']").first
    thumb.focus()
    return thumb


def step_drawn(tab, label: str) -> float:
    """Seconds from one step back on a step player's slider (its URL-bound Streamlit slider) until the player's
    title shows that step in the browser (``step N: query at ...``, drawn by Plotly) and the URL carries it."""
    thumb = slider_thumb(tab, label)
    step = int(thumb.input_value()) - 1
    title = tab.locator("svg text.gtitle").filter(has_text=f"step {step}: query at")
    since = time.perf_counter()
    thumb.press("ArrowLeft")
    title.first.wait_for(state="visible", timeout=120_000)
    drawn = time.perf_counter() - since
    tab.wait_for_url(f"**step={step}**", timeout=30_000)
    return drawn


def measure(tab, watch: RunWatch, action: Callable[[], None], url_part: str | None = None) -> float:
    """Seconds from ``action`` until the server finished the whole run it started; the URL carries ``url_part``
    first, when given."""
    since = time.perf_counter()
    action()
    if url_part:
        tab.wait_for_url(f"**{url_part}**", timeout=120_000)
    return wait_finished(tab, watch.whole, since)


def time_page(browser, url: str, path: str, model: str | None = None) -> list[dict[str, object]]:
    """First view, reload, each click and a slider step of one page (with ``model`` chosen where the page has a
    model choice): one row each."""
    rows: list[dict[str, object]] = []
    name = PAGES[path]
    address = f"{url}/{path}" + (f"?{MODEL_KEYS[path]}={model}" if model and path in MODEL_KEYS else "")

    def row(action: str, seconds: float) -> None:
        rows.append({"page": name, "action": action, "seconds": round(seconds, 2),
                     "load_1min": round(os.getloadavg()[0], 2)})

    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    watch = RunWatch(tab)
    since = time.perf_counter()
    row("first view", measure(tab, watch, lambda: tab.goto(address)))
    row("filled in", wait_finished(tab, watch.finished, since, FILLED_QUIET_MS))
    row("reload", measure(tab, watch, tab.reload))
    if path in STEPS:
        row("slider step", step_drawn(tab, STEPS[path]))
    for click in CLICKS.get(path, []):
        measure(tab, watch, lambda: tab.goto(address))
        try:
            row(f"click: {click.url.rstrip('=')}", measure(tab, watch, lambda c=click: do_click(tab, c), click.url))
        except Exception as exc:  # a control that moved or a wait that ran out: say so, time the rest
            print(f"{name}: {click.label} not timed: {str(exc).splitlines()[0]}", file=sys.stderr)
            row(f"click: {click.url.rstrip('=')}", float("nan"))
    tab.close()
    return rows


def run_pass(browser, results_cache: Path, paths: list[str], label: str, model: str | None = None) -> pd.DataFrame:
    """Every page on one fresh server."""
    with fresh_server(results_cache) as url:
        rows = [r for p in paths for r in time_page(browser, url, p, model)]
    return pd.DataFrame(rows).assign(results_cache=label)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per page and pass: first view, reload, the first click, every other click, the slider step."""
    out = []
    for (cache, page), rows in table.groupby(["results_cache", "page"], sort=False):
        by = dict(zip(rows["action"], rows["seconds"], strict=True))
        clicks = [a for a in rows["action"] if a.startswith("click")]
        out.append({"results cache": cache, "page": page, "first view s": by.get("first view"),
                    "filled in s": by.get("filled in"), "reload s": by.get("reload"),
                    "one click s": "; ".join(f"{by[c]} ({c.removeprefix('click: ')})" for c in clicks) or "-",
                    "slider step s": by.get("slider step", "-"),
                    "load 1-min": f"{rows['load_1min'].min():.1f}-{rows['load_1min'].max():.1f}"})
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame, started: str, load_start: tuple[float, ...], args: argparse.Namespace) -> str:
    """The RESULTS.md section."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("-" if pd.isna(v) else str(v) for v in r) + " |" for r in table.itertuples(index=False)]
    load_end = os.getloadavg()
    command = " ".join(["python benchmarks/pages.py", *shown_args(args.argv)])
    begin, _ = markers(args.model)
    title = "## First view in a browser" + (f" with {args.model} chosen" if args.model else "")
    return "\n".join([
        begin, f"{title} (`benchmarks/pages.py`)", "",
        f"**Command:** `{command}`. "
        f"**Date:** {started}. **Machine:** {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}. **Load average** (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load_start)} "
        f"at the start, {'/'.join(f'{x:.2f}' for x in load_end)} at the end.", "",
        "Headless Chromium, one tab per page in the navigation's order; each time runs from the navigation, key "
        "press or click until the server finished the whole run it started, once nothing else ran for 0.9 s; a step "
        "player's slider step until the player's title shows the new step (drawn in the browser; the URL must carry "
        "it too). `first view`: the page complete, a section that follows background "
        "work showing its progress bar; `filled in`: from the navigation until every such section filled in by "
        "itself (no run, not even a poll, for 3 s). `empty`: a fresh server with an empty results cache (the first "
        "visitor of a new deployment); `kept`: the server restarted on the cache the first pass filled. The "
        "background warm-up (`ui/warmup.py`) runs in both, as on a deployment. Targets: first view <= 5 s, one "
        "click <= 15 s, a slider step < 0.5 s." + (
            f" `--model {args.model}` opens each page that has a model choice with it chosen (in the URL); the "
            "model's files were already in the lab's cache (a first fetch and conversion is not timed here)."
            if args.model else ""), "", *lines, "", markers(args.model)[1]])


def markers(model: str | None) -> tuple[str, str]:
    """The comments around the section of RESULTS.md this run replaces (one section per ``--model``)."""
    if not model:
        return BEGIN, END
    return f"<!-- pages-benchmark:{model}:begin -->", f"<!-- pages-benchmark:{model}:end -->"


def shown_args(argv: list[str]) -> list[str]:
    """The command's arguments as RESULTS.md shows them (where the CSV went is not part of the benchmark)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--csv="):
            skip = False
            continue
        if arg == "--csv":
            skip = True
            continue
        out.append(arg)
    return out


def write_results(section: str, path: Path = RESULTS, model: str | None = None) -> None:
    """Replace the benchmark's section of RESULTS.md (or append it)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    begin, end = markers(model)
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + section + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", nargs="*", default=list(PAGES), help="url paths ('' or 'home' is the home page)")
    parser.add_argument("--passes", nargs="*", default=["empty", "kept"], choices=["empty", "kept"])
    parser.add_argument("--csv", help="every measurement, one row each")
    parser.add_argument("--no-results", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument("--model", help="choose this model on the pages that have a model choice (and time only "
                        "those, unless --pages says otherwise), e.g. smollm2-135m")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.model and "--pages" not in args.argv:
        args.pages = list(MODEL_KEYS)
    paths = ["" if p in ("", "home") else p for p in args.pages]
    unknown = [p for p in paths if p not in PAGES]
    if unknown:
        parser.error(f"unknown pages {unknown}; choose from {', '.join(p or 'home' for p in PAGES)}")
    if not Path(CHROMIUM).exists():
        parser.error(f"no browser at {CHROMIUM} (apt-get install chromium, or set KVLAB_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()
    tables = []
    with tempfile.TemporaryDirectory(prefix="kvlab-results-") as cache, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        for label in args.passes:
            tables.append(run_pass(browser, Path(cache), paths, label, args.model))
            print(summary(tables[-1]).to_string(index=False), flush=True)
        browser.close()
    table = pd.concat(tables, ignore_index=True)
    if args.csv:
        table.to_csv(args.csv, index=False)
    if not args.no_results:
        write_results(markdown(summary(table), started, load_start, args), model=args.model)


if __name__ == "__main__":
    main()
