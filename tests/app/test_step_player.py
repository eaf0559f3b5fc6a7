"""The step player: evenly spaced frames, each with its own metrics line and attention scale; a step of the slider
is a view of a player built once (equal to building it afresh), and ▶ plays from the step shown."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest

from kvcore.models.steps import StepView
from ui import step_figures as sf


def view(steps: list[int], width: int = 300, seed: int = 0) -> StepView:
    """A synthetic run: step s is the query at s + 10, an early sink at 1 and a cache holding a window."""
    queries = [s + 10 for s in steps]
    attention = np.full((len(steps), width), np.nan)
    held = np.full((len(steps), width), np.nan)
    for i, q in enumerate(queries):
        row = np.random.default_rng(seed + q).random(q + 1)  # a step's numbers do not depend on the others
        attention[i, :q + 1] = row / row.sum()
        held[i, :q + 1] = (np.arange(q + 1) > q - 32).astype(float)
    frame = pd.DataFrame({"step": steps, "query": queries, "token": [f"t{q}" for q in queries],
                          "kv_tokens": [min(q + 1, 32) for q in queries], "kv_bytes": [64 * min(q + 1, 32)
                                                                                        for q in queries]})
    frame["sinks"], frame["heavy_hitters"] = "1", "1, 5"
    return StepView(frame, attention, {"window": held}, {"window": np.zeros_like(held)}, [[1]] * len(steps),
                    [[1, 5]] * len(steps), [f"t{i}" for i in range(width)])


def spec(fig) -> dict:
    return json.loads(pio.to_json(fig.to_dict(), validate=False))


def test_frames_are_evenly_spaced_and_keep_the_last_and_the_opening_step():
    assert sf.frame_steps(30, 12) == list(range(30))  # every step when they fit
    steps = sf.frame_steps(255, 254)
    gaps = set(np.diff(steps[:-1]).tolist())
    assert gaps == {sf.frame_stride(255)}  # evenly spaced ticks (they read 0, 12, 29, 45... before)
    assert steps[0] == 0
    assert steps[-1] == 254
    assert len(steps) <= sf.MAX_FRAMES
    assert 101 in sf.frame_steps(255, 101)


def test_each_frame_has_its_own_metrics_line_and_attention_scale():
    v = view(list(range(20)), width=200)  # one column per key (no pooling)
    fig = spec(sf.step_player(v, 5, "Player"))
    for frame in fig["frames"]:
        s = int(frame["name"])
        assert frame["layout"]["title"]["text"].startswith(f"Player<br>step {s}: query at {s + 10}")
        assert f"({min(s + 11, 32)} entries per layer)" in frame["layout"]["title"]["text"]
        top = float(np.nanmax(v.attention[s]))
        assert frame["layout"]["yaxis"]["range"] == pytest.approx([0, top * 1.3], rel=1e-3)
    first, last = fig["frames"][0]["layout"]["yaxis"]["range"][1], fig["frames"][-1]["layout"]["yaxis"]["range"][1]
    assert first > last  # the scale follows the step: a late step's bars are not flattened by an early one's


def test_a_step_is_a_view_of_the_player_built_once():
    grid = sf.frame_steps(255, 254)
    v = view(grid)
    base = sf.player_base(v, "Player")
    for row in (0, 7, len(grid) - 1):
        direct = spec(sf.step_player(v, row, "Player"))
        assert spec(sf.player_at(base, grid[row], None, "Player")) == direct
    menu = spec(sf.player_at(base, grid[7], None, "Player"))["layout"]["updatemenus"][0]
    assert menu["buttons"][0]["args"][0] == [str(s) for s in grid[7:]]  # ▶ plays from the step shown


def test_a_step_off_the_grid_joins_the_frames_in_order():
    grid = sf.frame_steps(255, 254)
    base = sf.player_base(view(grid), "Player")
    off = next(s for s in range(255) if s not in grid)
    got = spec(sf.player_at(base, off, view([off]), "Player"))
    both = sorted([*grid, off])
    direct = spec(sf.step_player(view(both), both.index(off), "Player"))
    assert [f["name"] for f in got["frames"]] == [str(s) for s in both]
    assert got["layout"]["sliders"][0]["active"] == both.index(off)
    assert got["layout"]["updatemenus"] == direct["layout"]["updatemenus"]
    assert got["data"] == direct["data"]
    assert got["frames"][both.index(off)] == direct["frames"][both.index(off)]
    with pytest.raises(ValueError, match="not among the player's frames"):
        sf.player_at(base, off)
