"""The Eviction page's step player: a sweep step by step at one budget, computed once, each step a view of it.

The player's frames (every few steps, evenly spaced: :func:`ui.step_figures.frame_steps`) are computed and drawn
once per sweep and budget and cached; a step off that grid is computed once too (one step of the detector) and
joins them. The section is a Streamlit fragment, so moving its step slider reruns only this section: no sweep, no
other figure, no frame rebuilt.
"""

from __future__ import annotations

import streamlit as st

from kvcore.eviction.evaluate import EvictionConfig, EvictionResults, RunSpec
from kvcore.eviction.steps import eviction_steps
from kvcore.models.steps import StepView
from ui import background, disk_cache, figures, params
from ui import step_figures as sf
from ui.eviction_runs import EvictionText
from ui.guard import user_errors

MODULES = ("kvcore.eviction.evaluate", "kvcore.eviction.steps")  # what a step view executes (keys the disk cache)
TITLE = "Full-cache attention and what each policy kept"
CAPTION = ("Bars: the full cache's attention from the step's query (layers and heads averaged), on each step's own "
           "scale. Rows: the share of layers and KV heads in which each policy let that query read each token "
           "(grey = evicted). Triangles: sinks; diamonds: heavy hitters, by the detector over the attention so far. "
           "▶ plays from the chosen step; the line under the title follows the step shown.")


@st.cache_data(max_entries=64, show_spinner=False)
def step_view(source: EvictionText, specs: tuple[RunSpec, ...], budget: int, steps: tuple[int, ...],
              _results: EvictionResults) -> StepView:
    """Steps ``steps`` of the sweep ``specs`` on ``source`` at ``budget`` (``_results``: that sweep, not hashed);
    kept on disk too (the detector runs once per step shown)."""
    return disk_cache.computed("eviction-steps", (source, specs, budget, steps), MODULES,
                               disk_cache.weights_key(source.model), lambda _: eviction_steps(_results, budget, steps))


@st.cache_resource(max_entries=16, show_spinner=False)
def player(source: EvictionText, specs: tuple[RunSpec, ...], budget: int, steps: tuple[int, ...],
           _view: StepView) -> dict:
    """The player over ``_view`` (steps ``steps`` of that sweep), built once (:func:`ui.step_figures.player_base`);
    never changed: each step is a view of it."""
    return sf.player_base(_view, TITLE)


@background.counted_fragment()
def show_step_player(source: EvictionText, config: EvictionConfig, results: EvictionResults, budget: int) -> None:
    """The section: its step slider (bound to the URL), the player opening on that step, its caption."""
    st.subheader(f"Step by step at budget {budget}")
    steps = len(results.tokens)
    step = params.widget(st.slider, "Step (query position)", key="step", min_value=0, max_value=steps - 1,
                         value=steps - 1)
    specs, grid = tuple(config.runs()), tuple(sf.frame_steps(steps, steps - 1))
    with user_errors("Step view"):
        base = player(source, specs, budget, grid, step_view(source, specs, budget, grid, results))
        extra = None if step in grid else step_view(source, specs, budget, (step,), results)
    figures.show(sf.player_at(base, step, extra, TITLE), key="steps")
    st.caption(CAPTION)
