"""What :mod:`ui.warmup` computes in the background: the heavy pages' default views, through the very functions
those pages call with the settings of their default URL (so their caches, in memory and on disk, hold the results
when a visitor opens them; nothing here changes a number). Work already on disk (:mod:`ui.disk_cache`) is only read
back; a page asking for a result being computed here waits for it rather than computing it twice. The steps run in
the order of :data:`ui.background.STEPS` (a page waiting for one moves it up): the Serving engine's calibration first
(a timing measurement, so nothing else of the warm-up runs beside it, and at the server's own priority), then the
bundled model's views, the needle test (SmolLM2 on its default grid) and SmolLM2's default views of Live model,
Eviction and Quantization, so that a visitor who chooses the real model finds them kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvcore.eviction.evaluate import EvictionConfig, sample_text
from kvcore.models.attention import AttentionPatterns
from kvcore.models.live import opening_layer
from kvcore.quant import evaluate as qe
from ui import (
    background,
    engine_runs,
    eviction_runs,
    eviction_steps,
    live_runs,
    live_steps,
    needle_runs,
    quant_runs,
    timings,
)
from ui import step_figures as sf
from ui.models import SharedModel, private_model, shared_model

QUIET_BEFORE_SMOLLM2_S = 30.0  # SmolLM2's default views are warmed once no page has run for this long
LIVE_DEFAULT = live_runs.LiveRequest.of("The import statement", 40, 0.0, 0, "full", 32, "original")
log = logging.getLogger(__name__)


def warm_eviction(model: SharedModel | None = None) -> None:
    """The Eviction page's default sweep and its step player's frames at the first budget. model: a copy of the
    model to compute with (the shared bundled one by default)."""
    config = EvictionConfig()
    text = eviction_runs.EvictionText(model.name if model else "bundled", sample_text(), config.max_tokens)
    results = eviction_runs.sweep(text, config, model)
    steps = len(results.tokens)
    grid = tuple(sf.frame_steps(steps, steps - 1))
    view = eviction_steps.step_view(text, tuple(config.runs()), min(config.budgets), grid, results)
    eviction_steps.player(text, tuple(config.runs()), min(config.budgets), grid, view)


def warm_quantization(model: SharedModel | None = None) -> None:
    """The Quantization page's default measurement of every method (decoded with ``model``, a private copy, when
    given: the longest work of the warm-up never holds the shared model's lock)."""
    name = model.name if model else "bundled"
    quant_runs.measure(qe.QuantText(windows=qe.page_windows(name)), model=model)


def warm_live_model(model: SharedModel | None = None) -> None:
    """The Live model page's default generation, its full-cache twin, its timing and its step player's frames.
    model: a copy of the model to compute with (the shared bundled one by default)."""
    shared = model or shared_model()
    run = live_runs.generation(shared, LIVE_DEFAULT, stream=False)
    live_runs.generation(shared, LIVE_DEFAULT.full, stream=False)
    live_runs.measure_timing(shared, LIVE_DEFAULT, run)
    layer = opening_layer(shared.model.config.num_hidden_layers)  # the layer the page opens on
    attn = live_runs.attention(shared, LIVE_DEFAULT, run, layer, None)
    thresholds = AttentionPatterns.for_length(len(run.ids), sink_ratio=5.0, heavy_fraction=0.05)
    grid = tuple(sf.frame_steps(len(run.held), len(run.held) - 1))
    view = live_runs.steps_view(shared.name, LIVE_DEFAULT, layer, None, thresholds, grid, run, attn)
    live_steps.player(shared.name, LIVE_DEFAULT, layer, None, thresholds, grid, f"Layer {layer}, head mean", run.plan,
                      view)


def warm_calibration(model: SharedModel | None = None) -> None:
    """The Serving engine page's default calibration (bundled model, its default block size and thread count),
    measured on ``model`` (a copy of the bundled model; the shared one by default) and kept in memory only. A
    timing: it starts once no page has run for a second (the server's first page usually runs as it starts), or
    after half a minute of pages; the load it ran under is kept with it."""
    background.PAGES.wait_idle()
    engine_runs.calibrate(engine_runs.DEFAULT_CALIBRATION, model=model, by=engine_runs.BY_WARMUP)


def default_steps() -> list[tuple[str, Callable[[], object]]]:
    """The warm-up's steps in the order of :data:`ui.background.STEPS`, each on a copy of its model of its own:
    the bundled model's copy is loaded once and kept; SmolLM2's is loaded (fetched on a first run) for the needle
    test and kept for its default views, the last steps, each of which starts once no page has run for
    :data:`QUIET_BEFORE_SMOLLM2_S` seconds (a bar following work counts as a page) and no timing is measured
    behind a page (they serve later visitors; the one here now comes first). The
    pages' shared bundled model is loaded right after the calibration, so that the first page that needs it finds
    it."""
    private: dict[str, SharedModel] = {}

    def copy(name: str = "bundled") -> SharedModel:
        if name not in private:
            private[name] = private_model(name)
        return private[name]

    smollm2 = background.SMOLLM2

    def when_quiet(warm_view: Callable[[SharedModel], object]) -> Callable[[], object]:
        def step() -> object:  # SmolLM2's views are for later visitors: never beside a visitor or a timing
            while not (background.PAGES.wait_idle(quiet_s=QUIET_BEFORE_SMOLLM2_S, timeout_s=QUIET_BEFORE_SMOLLM2_S)
                       and timings.running() == 0):
                time.sleep(1.0)
            return warm_view(copy(smollm2))
        return step

    steps = {background.CALIBRATION: lambda: warm_calibration(copy()), background.BUNDLED: shared_model,
             background.EVICTION: lambda: warm_eviction(copy()), background.LIVE_MODEL: lambda: warm_live_model(copy()),
             background.QUANTIZATION: lambda: warm_quantization(copy()),
             background.NEEDLE: lambda: needle_runs.warm_default(lambda: copy(smollm2)),
             background.LIVE_MODEL_SMOLLM2: when_quiet(warm_live_model),
             background.EVICTION_SMOLLM2: when_quiet(warm_eviction),
             background.QUANTIZATION_SMOLLM2: when_quiet(warm_quantization)}
    return [(name, steps[name]) for name in background.STEPS]


def warm(steps: list[tuple[str, Callable[[], object]]] | None = None, queue: background.Queue | None = None,
         lower_priority: Callable[[], None] | None = None) -> list[str]:
    """Run the steps in the queue's order (a page may move one up meanwhile); a step that fails is logged and
    skipped (its page will say what is wrong). queue: the server's (:data:`ui.background.WARMUP`, filled when the
    warm-up started), else one of the steps in their order. lower_priority: called before the first step that is
    not a timing measurement (:data:`ui.background.TIMED`). Returns the steps done."""
    named = dict(steps or default_steps())
    if queue is None:
        queue = background.Queue()
        queue.fill(list(named))
    done = []
    while (name := queue.take()) is not None:
        if lower_priority is not None and name not in background.TIMED:
            lower_priority()
            lower_priority = None
        try:
            named[name]()
            done.append(name)
        except Exception:  # a page shows its own errors; the warm-up only tries
            log.warning("warming %s failed", name, exc_info=True)
        finally:
            queue.finish(name, done[-1:] == [name])
    return done
