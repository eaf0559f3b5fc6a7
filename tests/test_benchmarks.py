"""Benchmarks are not tests: CI only checks that each runs at a tiny size and writes its table."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kvcore.kernels import native as native_module
from tests.conftest import ROOT

SMOKE = [
    ("batching.py", ["--requests", "20", "--output-mean", "16", "--runs", "1"]),
    ("pages.py", ["--pages", "home", "--passes", "empty", "--no-results"]),
    ("memory.py", ["--pages", "home"]),
    ("engine.py", ["--requests", "6", "--prompt-max", "48", "--output-max", "6", "--repeats", "1", "--threads", "1"]),
    ("engine.py", ["--profile", "--models", "bundled", "--threads", "1", "--repeats", "1"]),
]


@pytest.mark.parametrize(("script", "args"), SMOKE)
def test_benchmark_runs_at_smoke_size(script, args, tmp_path):
    if script == "pages.py" and not Path(os.environ.get("KVLAB_CHROMIUM", "/usr/bin/chromium")).exists():
        pytest.skip("the page benchmark drives Chromium, which is not installed")
    out = tmp_path / "table.csv"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--csv", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(pd.read_csv(out)) >= 1


@pytest.mark.parametrize("native", ["1", "0"], ids=["c-kernels", "torch-only"])
def test_the_step_breakdown_times_every_section_and_adds_up(tmp_path, native):
    """Each timer sits where the step calls it (a patched name the step never looks up would read 0), and the
    sections with the forward's and the step's remainders make up the whole step. With the C kernels the bundled
    model's norms run inside its projections' kernel (that section reads exactly 0); without them, apart."""
    out = tmp_path / "breakdown.csv"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine.py"), "--breakdown", "--models", "bundled",
                           "--threads", "1", "--repeats", "1", "--csv", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, native_module.DISABLE_ENV: native})
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(out).set_index("section")["us_per_step"]
    whole = table.pop("whole step (mean)")
    assert len(table) == 7
    norms = table.pop("RMS norms (those not in a projection's pass)")
    assert (norms == 0) == (native == "1" and native_module.compiler() is not None), norms
    assert (table > 0).all(), table  # the rest too: a section timed inside another is not counted twice
    assert table.sum() + norms == pytest.approx(whole, rel=1e-9)
