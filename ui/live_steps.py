"""The Live model page's step player: the generation step by step through one layer's attention.

The player's frames (every few steps, evenly spaced: :func:`ui.step_figures.frame_steps`) are computed and drawn
once per run, layer, head and detector setting and cached; a step off that grid is computed once too and joins them.
The section is a Streamlit fragment, so moving its step slider reruns only this section: no generation, no timing,
no other figure, no frame rebuilt.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from kvcore.models.attention import AttentionPatterns
from kvcore.models.live import LiveRun
from kvcore.models.steps import StepView
from ui import background, figures, params, tables
from ui import step_figures as sf
from ui.guard import user_errors
from ui.live_runs import LiveRequest, steps_view


@st.cache_resource(max_entries=16, show_spinner=False)
def player(model: str, request: LiveRequest, layer: int, head: int | None, thresholds: AttentionPatterns,
           steps: tuple[int, ...], title: str, colored: str, _view: StepView) -> dict:
    """The player over ``_view`` (steps ``steps`` of that run), built once; each step is a view of it."""
    return sf.player_base(_view, title, colored)


@background.counted_fragment()
def show_step_player(model: str, request: LiveRequest, run: LiveRun, attn: np.ndarray, layer: int, head: str,
                     thresholds: AttentionPatterns, plan_name: str, csv_settings: dict) -> None:
    """The section: the step slider (bound to the URL), the player opening on that step, what the cache held."""
    st.subheader("Step by step")
    last = len(run.held) - 1
    step = params.widget(st.slider, "Step (generated token)", key="lm_step", min_value=0, max_value=max(1, last),
                         value=max(0, last), disabled=last < 1)
    step = min(step, last)
    grid = tuple(sf.frame_steps(last + 1, last))
    head_index, title = None if head == "mean" else int(head), f"Layer {layer}, head {head}"
    with user_errors("Step view"):
        view = steps_view(model, request, layer, head_index, thresholds, grid, run, attn)
        base = player(model, request, layer, head_index, thresholds, grid, title, run.plan, view)
        extra = None if step in grid else steps_view(model, request, layer, head_index, thresholds, (step,), run, attn)
    figures.show(sf.player_at(base, step, extra, title, colored=run.plan), key="lm_steps")
    st.caption(f"Bars: the attention the step's query gives each key (full cache), on each step's own scale. "
               f"Colour: what the {plan_name} cache holds when the query reads it: held, partly held (some layers or "
               "heads), evicted (grey), compressed (purple). Triangles: sinks; diamonds: heavy hitters, by the "
               "detector over the attention so far. ▶ plays from the chosen step; the line under the title follows "
               "the step shown. The slider above sets the step the view opens on (and the URL).")
    held, row = (view, grid.index(step)) if extra is None else (extra, 0)
    with st.expander("What the cache held at this step"):
        tables.show_table(sf.holdings_table(held, row), "live", "step", {**csv_settings, "step": step}, height=240)
