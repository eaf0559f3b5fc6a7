"""The step player shared by the Live model and Eviction pages: one step's attention row and what each cache held.

Data in (:class:`kvcore.models.steps.StepView`), ``go.Figure`` out: the top panel is the attention the step's
query gives each key (full cache), with the sinks and heavy hitters the detector finds up to that step; the
bottom panel has one row per cache: the share of layers and KV heads holding each key (and, for a
quantized cache, the share stored compressed). Plotly animation frames play the steps (play / pause and a
frame slider); the page's own step slider, bound to the URL, picks the frame the figure opens on and plays
from. Each frame carries the step's own line of metrics (token, cache bytes, sinks, heavy hitters) and its
own attention scale, so both follow the step being shown while it plays.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvcore.models.steps import StepView
from ui.figures import PALETTE, style
from ui.format import bytes_str

HELD, PARTLY, EVICTED, COMPRESSED = PALETTE[0], PALETTE[5], "#BBBBBB", PALETTE[4]
SINK, HEAVY = PALETTE[3], PALETTE[1]
HELD_SCALE = [[0.0, "#F2F2F2"], [1.0, PALETTE[0]]]
MAX_COLUMNS = 256  # keys are pooled into at most this many columns
MAX_FRAMES = 32  # animation frames at most (every stride-th step, the last and the opening step among them)
DIGITS = 4  # decimals of the attention and held shares sent to the browser


def _pool(row: np.ndarray, step: int, how: str) -> np.ndarray:
    """Pool a row's columns by ``step`` (sum for attention, mean for shares); NaN stays NaN."""
    if step == 1:
        return row
    n = math.ceil(len(row) / step) * step
    padded = np.full(n, np.nan)
    padded[:len(row)] = row
    blocks = padded.reshape(-1, step)
    with warnings.catch_warnings():  # an all-NaN block (keys after the query) pools to NaN, as it should
        warnings.simplefilter("ignore", RuntimeWarning)
        pooled = np.nansum(blocks, axis=1) if how == "sum" else np.nanmean(blocks, axis=1)
    return np.where(np.isnan(blocks).all(axis=1), np.nan, pooled)


def frame_stride(num_steps: int, max_frames: int = MAX_FRAMES) -> int:
    """Steps between two frames: 1 when every step fits, else the smallest that keeps the frames under the cap
    (room left for the last step and the opening one)."""
    return 1 if num_steps <= max_frames else math.ceil((num_steps - 1) / (max_frames - 2))


def frame_steps(num_steps: int, start: int, max_frames: int = MAX_FRAMES) -> list[int]:
    """The steps the animation shows: every :func:`frame_stride`-th step from 0 (evenly spaced ticks), the last
    step, and ``start``."""
    stride = frame_stride(num_steps, max_frames)
    return sorted({*range(0, num_steps, stride), num_steps - 1, min(max(0, start), num_steps - 1)})


def _bar_colors(held: np.ndarray | None, compressed: np.ndarray | None) -> list[str] | str:
    if held is None:
        return "#444444"
    colors = []
    for h, c in zip(held, compressed if compressed is not None else np.zeros_like(held), strict=True):
        if np.isnan(h):
            colors.append(EVICTED)
        elif c > 0:
            colors.append(COMPRESSED)
        else:
            colors.append(HELD if h >= 0.999 else EVICTED if h <= 0.001 else PARTLY)
    return colors


def _top(bars: np.ndarray) -> float:
    """The tallest bar of one step: its own scale, so the first steps' near-1 bars never flatten later ones."""
    finite = bars[np.isfinite(bars)]
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _frame_data(view: StepView, s: int, pool: int, x: np.ndarray, rows: list[tuple[str, np.ndarray]],
                colored: str | None, full: bool = True) -> list[go.BaseTraceType]:
    """The four traces of step ``s`` (markers just above the step's tallest bar); ``full`` False leaves out what
    every frame shares (axes, hover text)."""
    att = _pool(view.attention[s], pool, "sum")
    top = _top(att)
    held = _pool(view.held[colored][s], pool, "mean") if colored else None
    comp = _pool(view.compressed[colored][s], pool, "mean") if colored and colored in view.compressed else None
    z = np.vstack([_pool(r[s], pool, "mean") for _, r in rows]).round(DIGITS).astype(np.float32)  # half the bytes
    sinks = sorted({p // pool * pool for p in view.sinks[s]})
    heavy = sorted({p // pool * pool for p in view.heavy[s]})
    bars = np.nan_to_num(att).round(DIGITS).astype(np.float32)
    if not full:
        return [go.Bar(y=bars, marker_color=_bar_colors(held, comp)),
                go.Scatter(x=sinks, y=[top * 1.1] * len(sinks)), go.Scatter(x=heavy, y=[top * 1.2] * len(heavy)),
                go.Heatmap(z=z)]
    return [
        go.Bar(x=x, y=bars, marker_color=_bar_colors(held, comp), name="attention", showlegend=False,
               customdata=[shown_token(view.tokens[min(int(p), len(view.tokens) - 1)]) for p in x],
               hovertemplate="key %{x}: %{customdata}<br>attention %{y:.3f}<extra></extra>"),
        go.Scatter(x=sinks, y=[top * 1.1] * len(sinks), mode="markers", name="sink",
                   marker={"symbol": "triangle-down", "size": 11, "color": SINK}),
        go.Scatter(x=heavy, y=[top * 1.2] * len(heavy), mode="markers", name="heavy hitter",
                   marker={"symbol": "diamond", "size": 9, "color": HEAVY}),
        go.Heatmap(z=z, x=x, y=[name for name, _ in rows], zmin=0, zmax=1, colorscale=HELD_SCALE, showscale=False,
                   hovertemplate="%{y}<br>key %{x}: %{z:.0%}<extra></extra>"),
    ]


def shown_token(token: object) -> str:
    """A BPE piece as a reader sees it: a space as ·, a newline as ↵."""
    return str(token).replace("Ġ", "·").replace("Ċ", "↵").replace("▁", "·")


def step_summary(view: StepView, s: int) -> str:
    """What step ``s`` made and what its cache held, in one line: the metrics that follow the step shown."""
    row = view.steps.iloc[s]
    head = f"step {int(row.step)}: query at {int(row.query)}"
    if "token" in row:
        head += f", makes {shown_token(row.token) or '(empty)'!r}"
    parts = [head]
    if "kv_bytes" in row:
        parts.append(f"cache {bytes_str(int(row.kv_bytes))} ({int(row.kv_tokens)} entries per layer)")
    parts += [f"sinks {_few(row.sinks)}", f"heavy hitters {_few(row.heavy_hitters)}"]
    return " · ".join(parts)


def _title(view: StepView, s: int, title: str) -> str:
    return f"{title}<br>{step_summary(view, s)}"


def _y_range(view: StepView, s: int, pool: int) -> list[float]:
    return [0.0, _top(_pool(view.attention[s], pool, "sum")) * 1.3]


def _rows(view: StepView) -> list[tuple[str, np.ndarray]]:
    rows = [(f"{name} held", held) for name, held in view.held.items()]
    return rows + [(f"{name} compressed", comp) for name, comp in view.compressed.items() if np.nansum(comp) > 0]


def _geometry(view: StepView) -> tuple[int, np.ndarray]:
    width = view.attention.shape[1]
    pool = max(1, math.ceil(width / MAX_COLUMNS))
    return pool, np.arange(0, width, pool)


def _frame(view: StepView, s: int, title: str, colored: str | None, rows: list[tuple[str, np.ndarray]]) -> go.Frame:
    """Row ``s`` of ``view`` as an animation frame named after its step, with its own title line and scale."""
    pool, x = _geometry(view)
    return go.Frame(name=str(int(view.steps.iloc[s].step)), data=_frame_data(view, s, pool, x, rows, colored,
                                                                              full=False),
                    traces=[0, 1, 2, 3], layout={"title": {"text": _title(view, s, title)},
                                                 "yaxis": {"range": _y_range(view, s, pool)}})


def step_player(view: StepView, start: int, title: str, colored: str | None = None) -> go.Figure:
    """The animated step view, opening on step ``start`` (a row of ``view``), which ▶ plays from.

    Frames are named after their step. colored: the cache whose holdings colour the attention bars (held / partly
    held / evicted / compressed); None leaves them plain (several caches are compared in the rows below).
    """
    start = min(max(0, start), view.num_steps - 1)
    pool, x = _geometry(view)
    rows = _rows(view)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.68, 0.32], vertical_spacing=0.05)
    shown = frame_steps(view.num_steps, start)
    for trace, row in zip(_frame_data(view, start, pool, x, rows, colored), (1, 1, 1, 2), strict=True):
        fig.add_trace(trace, row=row, col=1)
    fig.frames = [_frame(view, s, title, colored, rows) for s in shown]
    names = [str(int(view.steps.iloc[s].step)) for s in shown]
    jump = {"frame": {"duration": 0, "redraw": True}, "mode": "immediate"}
    fig.update_layout(
        updatemenus=[{"type": "buttons", "direction": "left", "x": 0.0, "y": -0.16, "xanchor": "left",
                      "yanchor": "top", "showactive": False,
                      "buttons": [{"label": "▶ Play", "method": "animate", "args": [names[shown.index(start):], PLAY]},
                                  {"label": "❚❚ Pause", "method": "animate", "args": [[None], PAUSE]}]}],
        sliders=[{"active": shown.index(start), "x": 0.2, "y": -0.1, "len": 0.8,
                  "currentvalue": {"prefix": "step ", "xanchor": "right"},
                  "steps": [{"label": name, "method": "animate", "args": [[name], jump]} for name in names]}])
    style(fig, _title(view, start, title), height=600)
    fig.update_layout(margin={"b": 130})
    fig.update_yaxes(title_text="attention (each step's own scale)", range=_y_range(view, start, pool), row=1,
                     col=1)
    fig.update_xaxes(title_text="key position" + (f" (blocks of {pool})" if pool > 1 else ""), row=2, col=1)
    fig.update_xaxes(range=[-0.5 * pool, width_of(view) - 0.5 * pool])
    return fig


PLAY = {"frame": {"duration": 400, "redraw": True}, "fromcurrent": True, "transition": {"duration": 0}}
PAUSE = {"frame": {"duration": 0, "redraw": False}, "mode": "immediate"}


def width_of(view: StepView) -> int:
    """Key positions the view spans."""
    return view.attention.shape[1]


class PlayerFigure(go.Figure):
    """A step player already built and validated once, as a dict: Streamlit serializes a ``go.Figure`` as it is
    (a dict it would validate again, which for dozens of frames takes most of a second)."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self._spec = spec

    def to_dict(self) -> dict:
        return self._spec

    def to_plotly_json(self) -> dict:
        return self._spec


def player_base(view: StepView, title: str, colored: str | None = None) -> dict:
    """The player over every row of ``view`` (its frames), built and validated once, for :func:`player_at`."""
    return step_player(view, view.num_steps - 1, title, colored).to_dict()


def player_at(base: dict, step: int, extra: StepView | None = None, title: str = "",
              colored: str | None = None) -> PlayerFigure:
    """``base`` (:func:`player_base`) opening on ``step``, which ▶ plays from: a view of the built figure, no
    frame rebuilt. A step that is not among the base's frames comes from ``extra`` (a view holding it) and joins
    them in order."""
    frames = list(base["frames"])
    names = [f["name"] for f in frames]
    slider = dict(base["layout"]["sliders"][0])
    steps = list(slider["steps"])
    if str(step) not in names:
        if extra is None:
            raise ValueError(f"step {step} is not among the player's frames; pass a view that holds it")
        row = extra.steps["step"].tolist().index(step)
        labels = [y for y in base["data"][3]["y"]]
        rows = [(label, (extra.held if label.endswith(" held") else extra.compressed)[label.rsplit(" ", 1)[0]])
                for label in labels]
        at = int(np.searchsorted(np.array([int(n) for n in names]), step))
        frames.insert(at, go.Figure(frames=[_frame(extra, row, title, colored, rows)]).to_dict()["frames"][0])
        names.insert(at, str(step))
        steps.insert(at, {"label": str(step), "method": "animate",
                          "args": [[str(step)], {"frame": {"duration": 0, "redraw": True}, "mode": "immediate"}]})
    index = names.index(str(step))
    frame = frames[index]
    data = [{**trace, **{k: v for k, v in part.items() if k != "type"}}
            for trace, part in zip(base["data"], frame["data"], strict=True)]
    layout = dict(base["layout"])
    layout["title"] = {**layout["title"], "text": frame["layout"]["title"]["text"]}
    layout["yaxis"] = {**layout["yaxis"], "range": frame["layout"]["yaxis"]["range"]}
    layout["sliders"] = [{**slider, "active": index, "steps": steps}]
    menu = dict(layout["updatemenus"][0])
    menu["buttons"] = [{**menu["buttons"][0], "args": [names[index:], PLAY]}, *menu["buttons"][1:]]
    layout["updatemenus"] = [menu]
    return PlayerFigure({**base, "data": data, "layout": layout, "frames": frames})


def _few(positions: str, shown: int = 4) -> str:
    """``"0, 3, 9, 14 (+9)"``: the first few of a comma-separated list of positions."""
    items = positions.split(", ")
    return positions if len(items) <= shown else ", ".join(items[:shown]) + f" (+{len(items) - shown})"


def holdings_table(view: StepView, step: int) -> pd.DataFrame:
    """One row per key at ``step``: its token, the attention it got and each cache's held (and compressed) share."""
    q = int(view.steps.iloc[step].query)
    table = pd.DataFrame({"position": range(q + 1), "token": [shown_token(t) for t in view.tokens[:q + 1]],
                          "attention": view.attention[step, :q + 1]})
    for name, held in view.held.items():
        table[f"{name} held"] = held[step, :q + 1]
    for name, comp in view.compressed.items():
        if np.nansum(comp) > 0:
            table[f"{name} compressed"] = comp[step, :q + 1]
    return table
