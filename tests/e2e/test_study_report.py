"""A real browser opens a study's HTML report from disk with the network cut off: every figure draws.

Runs a tiny study on the bundled model, opens ``report.html`` through a ``file://`` URL in Debian's chromium
(Playwright) with every non-file request aborted, waits for plotly.js to draw each figure, and saves a
screenshot to ``artifacts/screenshots/study_report.png``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvcore.cli import main
from tests.conftest import ROOT

CHROMIUM = os.environ.get("KVLAB_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "artifacts" / "screenshots"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no browser at {CHROMIUM} (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report") / "study"
    assert main(["study", "--new-tokens", "24", "--prompt-tokens", "16", "--repeats", "2", "--warmup-tokens", "2",
                 "--ppl-tokens", "48", "--budget", "16", "--out", str(folder), "--no-progress"]) == 0
    return folder / "report.html"


def test_the_report_opens_offline_and_draws_every_figure(report):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            fetched, errors = [], []
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
                       else (fetched.append(route.request.url), route.abort()))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(report.as_uri())
            expected = page.locator("div.fig").count()
            assert expected == 8
            page.wait_for_function(f"document.querySelectorAll('div.fig .main-svg').length >= {expected}",
                                   timeout=60_000)
            drawn = page.locator("div.fig").evaluate_all("divs => divs.map(d => d.querySelectorAll('.point, "
                                                         ".trace').length)")
            assert all(n > 0 for n in drawn), drawn
            assert page.get_by_role("heading", name="Results").is_visible()
            assert page.locator("table.summary tbody tr").count() == 9
            assert fetched == []
            assert errors == []
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "study_report.png"), full_page=True)
        finally:
            browser.close()
