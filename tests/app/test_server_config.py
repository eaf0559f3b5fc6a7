"""The server's settings (.streamlit/config.toml) that the pages' speed rests on."""

from __future__ import annotations

import tomllib

from tests.conftest import ROOT


def test_streamlit_does_not_collect_garbage_after_every_run():
    """The defect: Streamlit's default gc.collect(2) after every script run (each progress bar's poll, each player
    step) held the GIL 120-250 ms with the models loaded, and an engine run measured behind the Serving engine page
    while two bars polled took 138-156 ms per output token instead of 64.5 ms."""
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert config["runner"]["postScriptGC"] is False
