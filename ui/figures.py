"""Plotly figure builders: data in, ``go.Figure`` out, one look for the whole lab.

Builders here are generic (lines, bars, heatmaps); a page with its own drawing (block grid,
Gantt timeline) keeps it in a ``ui/<page>_figures.py`` that styles through :func:`style`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from ui.format import tick_text

# Okabe-Ito, readable for colour-blind users, in a fixed order so a policy keeps its colour.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#999999", "#882255")
DASHES = ("solid", "dash", "dot", "dashdot")
SEQUENTIAL = "Viridis"
FONT = "Inter, Source Sans Pro, sans-serif"


TITLE_CHARS = 70  # a longer title wraps; a half-width chart holds about 50 characters of title on one line
TITLE_LINE_PX, LEGEND_ROW_PX, SUBPLOT_TITLE_PX = 24, 22, 22
LEGEND_WIDTH_PX = 450  # the legend's room in a half-width chart: more entries than fit wrap to a new row
AXIS_CHAR_PX = 7.5  # width of one character of an axis title (13 px font)


def style(fig: go.Figure, title: str | None = None, *, x: str | None = None, y: str | None = None,
          height: int = 380, legend: bool | str = True) -> go.Figure:
    """Apply the lab's look: white background, light grid, title top left, legend on its own row under it.

    legend: True or "top" (a row above the plot, right-aligned), "right" (a column beside the plot, for many or long
    entries), "bottom" (rows under the x-axis title) or False (none).
    The margins are sized to hold the title (wrapped at ``TITLE_CHARS``), the legend rows and subplot titles, so none
    of them overlap; a y-axis title longer than its axis wraps; a log axis gets labelled ticks at powers of ten or
    1-2-5 steps (Plotly's own labels a short log axis at minor ticks, "2 5" for 200k and 500k), and a log y-axis runs
    from the tick below its data to the tick above, so both ends are labelled. Call it after the traces are added:
    the legend room and the ticks are measured from them.
    """
    side = "top" if legend is True else legend or None
    lines = (title.split("<br>") if "<br>" in title else textwrap.wrap(title, TITLE_CHARS)) if title else []
    title_px = 12 + TITLE_LINE_PX * len(lines) if lines else 0
    rows, widest = _legend_rows(fig), _legend_widest(fig)
    subplot_px = SUBPLOT_TITLE_PX if _has_subplot_titles(fig) else 0
    margin = {"l": 60, "r": 20, "t": max(30, title_px + subplot_px + 14), "b": 50}
    if side == "top":
        margin["t"] += LEGEND_ROW_PX * rows + 6 if rows else 0
    elif side == "right":
        margin["r"] = min(240, 30 + widest)
    elif side == "bottom":
        margin["b"] += 30 + LEGEND_ROW_PX * rows
    plot_px = height - margin["t"] - margin["b"]
    placed = {  # paper coordinates: a builder that moves the legend afterwards keeps the same reference
        "top": {"orientation": "h", "yanchor": "bottom", "y": 1 + (subplot_px + 6) / plot_px, "xanchor": "right",
                "x": 1.0},
        "right": {"orientation": "v", "yanchor": "top", "y": 1.0, "xanchor": "left", "x": 1.02},
        "bottom": {"orientation": "h", "yanchor": "top", "y": -70 / plot_px, "xanchor": "left", "x": 0.0},
    }
    fig.update_layout(
        template="plotly_white",
        title={"text": "<br>".join(lines), "x": 0.0, "xanchor": "left", "xref": "container", "y": 1.0,
               "yref": "container", "yanchor": "top", "pad": {"t": 12, "l": 12}} if lines else None,
        font={"family": FONT, "size": 13},
        colorway=PALETTE,
        height=height,
        margin=margin,
        showlegend=side is not None,
        legend=placed.get(side, {}),
        hovermode="closest",
    )
    if x is not None:
        fig.update_xaxes(title_text=x)
    if y is not None:
        fig.update_yaxes(title_text=y)
    _wrap_y_titles(fig, plot_px)
    for name, values in axis_values(fig).items():
        if fig.layout[name].type == "log" and (positive := values[values > 0]).size:
            ticks = log_ticks(float(positive.min()), float(positive.max()))
            fig.layout[name].update(tickmode="array", tickvals=ticks, ticktext=[tick_text(t) for t in ticks])
            if name.startswith("y") and fig.layout[name].range is None and fig.layout[name].autorange is None:
                # from the tick below the data to the tick above it, so both ends of the axis are labelled (a
                # y-axis only: an x-axis from tick to tick puts its first label on the y-axis' last one)
                fig.layout[name].update(range=[math.log10(ticks[0]), math.log10(ticks[-1])])
    return fig


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over [lo, hi] (both > 0): powers of ten when it spans 3 decades or more
    (every k-th power past 8 of them), else the sparsest of 1-2-5, 1-2-3-5 and finer steps that puts 3 ticks inside
    (the finest when none does). One tick past each end is included, for the axis' padding."""
    if not 0 < lo <= hi or not math.isfinite(hi):
        raise ValueError(f"a log axis needs 0 < lo <= hi < inf, got {lo}, {hi}")
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if last - first >= 4 or hi / lo >= 1e3:
        step = max(1, math.ceil((last - first) / 8))
        return [10.0**e for e in range(first - first % step, last + step, step)]
    for mantissas in LOG_MANTISSAS:
        ticks = [float(f"{m * 10.0**e:.6g}") for e in range(first - 1, last + 1) for m in mantissas]
        if sum(lo <= t <= hi for t in ticks) >= 3:
            break
    below, above = [t for t in ticks if t < lo][-1:], [t for t in ticks if t > hi][:1]
    return below + [t for t in ticks if lo <= t <= hi] + above


def round_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` ticks at a round step (1, 2, 2.5 or 5 x 10^k) from at or below ``lo`` to at or above ``hi``:
    (0, 94.1) -> [0, 20, 40, 60, 80, 100]. For a linear axis whose own ticks would not be round (a secondary axis
    that Plotly aligns with the primary's grid reads 31.4, 62.7, 94.1)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo or count < 1:
        raise ValueError(f"need finite lo <= hi and count >= 1, got {lo}, {hi}, {count}")
    if hi == lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [float(f"{k * step:.10g}") for k in range(first, last + 1)]


LOG_MANTISSAS = ((1, 2, 5), (1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 6, 8),
                 (1, 1.2, 1.4, 1.6, 1.8, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9))


LABEL_DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, 1), (1, -1), (-1, -1))  # above first
LABEL_RINGS = (0, 16, 32, 56)  # px of leader line between a marker and a label moved away from a crowd
LABEL_CHAR_EM, LABEL_GAP_PX = 0.6, 4  # a label character's width in font sizes; room between marker and label
LABEL_PAD_PX = 3  # room kept around a placed label


def label_size(text: str, font_px: float = 11) -> tuple[float, float]:
    """(width, height) in px of a label of ``text`` (lines split at "<br>") in a ``font_px`` font."""
    lines = text.split("<br>")
    return max(len(line) for line in lines) * LABEL_CHAR_EM * font_px, 1.25 * font_px * len(lines)


def label_box(x_px: float, y_px: float, text: str, offset: tuple[float, float], font_px: float = 11
              ) -> tuple[float, float, float, float]:
    """The box (left, bottom, right, top, in px with y up) of a label centred ``offset`` px from (``x_px``,
    ``y_px``)."""
    width, height = label_size(text, font_px)
    cx, cy = x_px + offset[0], y_px + offset[1]
    return cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _offsets(text: str, marker_px: float, font_px: float) -> list[tuple[float, float]]:
    """Where a label may go around its marker, nearest first: beside it, then ever further out (with a leader)."""
    width, height = label_size(text, font_px)
    near = marker_px / 2 + LABEL_GAP_PX / 2
    return [(dx * (near + ring + width / 2), dy * (near + ring + height / 2))
            for ring in LABEL_RINGS for dx, dy in LABEL_DIRECTIONS]


def place_labels(points: Sequence[tuple[float, float]], texts: Sequence[str], size_px: tuple[float, float],
                 font_px: float = 11, marker_px: float | Sequence[float] = 11,
                 whiskers: Sequence[tuple[float, float]] | None = None) -> list[tuple[float, float] | None]:
    """Where to put each point's label so that none covers another label, a marker or an error bar: an offset
    (dx, dy) in px (y up) of the label's centre from its point, None for a point without a label.

    points: (x, y) of every marker in axis fractions (0-1 across the plot area), labelled or not; texts: the label
    of each point ("" for none); size_px: the plot area's (width, height); marker_px: the markers' size (one for
    all, or one each); whiskers: each point's error bar as (low, high) y fractions. Labels are placed one by one,
    left to right, each at the nearest clear place inside the plot (beside its marker, else further out, to be
    joined by a leader line), or where it covers least.
    """
    width, height = size_px
    px = [(x * width, y * height) for x, y in points]
    sizes = [float(marker_px)] * len(points) if isinstance(marker_px, int | float) else [float(m) for m in marker_px]
    taken = [(x - m / 2, y - m / 2, x + m / 2, y + m / 2) for (x, y), m in zip(px, sizes, strict=True)]
    if whiskers is not None:
        taken += [(x - 3, lo * height, x + 3, hi * height) for (x, _), (lo, hi) in zip(px, whiskers, strict=True)]
    offsets: list[tuple[float, float] | None] = [None] * len(points)
    for i in sorted((i for i, t in enumerate(texts) if t), key=lambda i: px[i]):
        own = (i, len(points) + i) if whiskers is not None else (i,)  # its own marker and error bar

        def cost(offset: tuple[float, float], i: int = i, own: tuple[int, ...] = own) -> float:
            box = label_box(*px[i], texts[i], offset, font_px)
            outside = (box[0] < 0) + (box[2] > width) + (box[1] < 0) + (box[3] > height)
            return sum(_overlap(box, other) for j, other in enumerate(taken) if j not in own) + 1e6 * outside

        offsets[i] = min(_offsets(texts[i], sizes[i], font_px), key=cost)  # the first of equal costs: the nearest
        left, bottom, right, top = label_box(*px[i], texts[i], offsets[i], font_px)
        taken.append((left - LABEL_PAD_PX, bottom - LABEL_PAD_PX, right + LABEL_PAD_PX, top + LABEL_PAD_PX))
    return offsets


def axis_values(fig: go.Figure) -> dict[str, np.ndarray]:
    """The numeric data each axis shows (layout name, e.g. ``xaxis2``, -> finite values); categorical axes are left
    out. Bars count their base and their end; error bars their ends."""
    found: dict[str, list[np.ndarray]] = {}
    for trace in fig.data:
        horizontal = getattr(trace, "orientation", None) == "h"
        for letter in ("x", "y"):
            values = _numeric(getattr(trace, letter, None))
            if values is None:
                continue
            base = _numeric(getattr(trace, "base", None)) if trace.type == "bar" else None
            if base is not None and (letter == "x") == horizontal:
                values = np.concatenate([base, values + base]) if base.size == values.size else values
            values = np.concatenate([values, *_error_ends(trace, letter, values)])
            axis = getattr(trace, f"{letter}axis", None) or letter
            found.setdefault(f"{letter}axis{axis[1:]}", []).append(values[np.isfinite(values)])
    return {name: np.concatenate(parts) for name, parts in found.items()}


def vline(fig: go.Figure, x: float, text: str | None = None, *, color: str = "#999999", dash: str = "dot") -> None:
    """A vertical line at data value ``x`` with an optional label at its top.

    Plotly reads a shape's position in data units but an annotation's in log10 units on a log axis (add_vline's
    label on a log axis lands at 10^x and stretches the axis to it), so the label is placed here by the axis type:
    set the axis type before calling.
    """
    fig.add_vline(x=x, line={"color": color, "dash": dash})
    if text:
        at = math.log10(x) if fig.layout.xaxis.type == "log" else x
        fig.add_annotation(x=at, xref="x", y=1.0, yref="y domain", text=text, showarrow=False, xanchor="left",
                           yanchor="top", font={"color": color})


def _error_ends(trace, letter: str, values: np.ndarray) -> list[np.ndarray]:
    """The ends of a trace's error bars along ``letter`` (``error_y`` of type "data" with arrays), if any."""
    error = getattr(trace, f"error_{letter}", None)
    if error is None or error.type != "data" or error.visible is False:
        return []
    up = _numeric(error.array)
    down = up if error.symmetric is not False else _numeric(error.arrayminus)
    if up is None or up.size != values.size:
        return []
    ends = [values + up]
    if down is not None and down.size == values.size:
        ends.append(values - down)
    return ends


def _numeric(values) -> np.ndarray | None:
    if values is None or isinstance(values, str):
        return None
    try:
        array = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError):
        return None  # categories
    return array


def _legend_names(fig: go.Figure) -> list[str]:
    names: dict[str, str] = {}
    for trace in fig.data:
        if trace.showlegend is not False and trace.name and trace.type != "heatmap":
            names.setdefault(trace.legendgroup or trace.name, str(trace.name))
    return list(names.values())


def _legend_rows(fig: go.Figure) -> int:
    """Rows a horizontal legend takes in a half-width chart (estimated from the entries' text)."""
    names = _legend_names(fig)
    if not names:
        return 0
    legend_title = fig.layout.legend.title.text or ""
    width = sum(40 + AXIS_CHAR_PX * len(n) for n in names) + AXIS_CHAR_PX * len(legend_title)
    return math.ceil(width / LEGEND_WIDTH_PX)


def _legend_widest(fig: go.Figure) -> int:
    """Width of a vertical legend: its longest entry (or title) and the marker."""
    texts = [*_legend_names(fig), fig.layout.legend.title.text or ""]
    return int(40 + AXIS_CHAR_PX * max(len(t) for t in texts))


def _has_subplot_titles(fig: go.Figure) -> bool:
    return any(a.xref == "paper" and a.yref == "paper" and a.yanchor == "bottom" and (a.y or 0) >= 0.99
               for a in fig.layout.annotations)


def _wrap_y_titles(fig: go.Figure, plot_px: float) -> None:
    """Wrap each y-axis title to the height of its axis, so a long one cannot run into the chart title."""
    for name in [k for k in fig.layout if k.startswith("yaxis")]:
        axis = fig.layout[name]
        text = axis.title.text
        if not text or "<br>" in text:
            continue
        low, high = axis.domain or (0.0, 1.0)
        chars = max(10, int(plot_px * (high - low) / AXIS_CHAR_PX))
        if len(text) > chars:
            axis.title.text = "<br>".join(textwrap.wrap(text, chars))


def _categorical(df: pd.DataFrame, color: str | None) -> pd.DataFrame:
    """``color`` as text, so Plotly Express draws one trace per value (numbers would get a colour scale)."""
    return df if color is None else df.assign(**{color: df[color].astype(str)})


def line_chart(df: pd.DataFrame, x: str, y: str, color: str | None = None, *, title: str | None = None,
               x_title: str | None = None, y_title: str | None = None, log_x: bool = False,
               log_y: bool = False, markers: bool = True, dash: str | None = None) -> go.Figure:
    """One line per value of ``color`` (or a single line), points in ``df`` order.

    Dash styles cycle with the colours, so lines that coincide (same KV shape, say) stay visible; ``dash``
    gives every line one style instead.
    """
    fig = px.line(_categorical(df, color), x=x, y=y, color=color, line_dash=None if dash else color,
                  markers=markers, log_x=log_x, log_y=log_y, color_discrete_sequence=PALETTE,
                  line_dash_sequence=DASHES)
    fig.update_traces(line_width=2.5, **({"line_dash": dash} if dash else {}))
    return style(fig, title, x=x_title or x, y=y_title or y, legend=color is not None)


def bar_chart(df: pd.DataFrame, x: str, y: str, color: str | None = None, *, title: str | None = None,
              x_title: str | None = None, y_title: str | None = None, barmode: str = "group",
              log_y: bool = False, text: str | None = None) -> go.Figure:
    """Grouped (or stacked with barmode='stack') bars, one trace per value of ``color``."""
    fig = px.bar(_categorical(df, color), x=x, y=y, color=color, barmode=barmode, log_y=log_y, text=text,
                 color_discrete_sequence=PALETTE)
    return style(fig, title, x=x_title or x, y=y_title or y, legend=color is not None)


def heatmap(z: Sequence[Sequence[float]], *, x: Sequence | None = None, y: Sequence | None = None,
            title: str | None = None, x_title: str | None = None, y_title: str | None = None,
            colorscale: str = SEQUENTIAL, zmin: float | None = None, zmax: float | None = None,
            colorbar: str | None = None, height: int = 380) -> go.Figure:
    """A matrix as a heatmap, row 0 at the top (the way attention maps are read)."""
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorscale=colorscale, zmin=zmin, zmax=zmax,
                               colorbar={"title": {"text": colorbar}} if colorbar else None))
    fig.update_yaxes(autorange="reversed")
    return style(fig, title, x=x_title, y=y_title, height=height, legend=False)


def show(fig: go.Figure, key: str | None = None) -> None:
    """Draw a figure at full width with the lab's toolbar settings."""
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False}, theme=None)
