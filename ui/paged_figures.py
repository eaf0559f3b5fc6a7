"""Figures and captions of the Paged blocks page: the physical block grid, the free block queue, the attention
window over stored blocks, the parallel-sampling memory bars, and the captions of the fragmentation and attention
check tables. Styled through :func:`ui.figures.style`."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from kvcore.paged import FragmentationConfig
from ui.figures import PALETTE, style
from ui.format import signed_pct

FREE_FILL, CACHED_FILL, EMPTY_TEXT = "#F2F2F2", "#D9D9D9", "#999999"


def owner_color(request_id: str) -> str:
    """A request keeps its colour: r<n> -> palette entry n."""
    digits = "".join(ch for ch in request_id if ch.isdigit())
    return PALETTE[int(digits or 0) % len(PALETTE)]


def _short(word: str, limit: int = 7) -> str:
    return word if len(word) <= limit else word[:limit - 1] + "…"


LABEL_FONT_PX = 9  # the block labels' font size
LABEL_CHAR_PX = 5.6  # width of one character of a block label (9 px font)


def blocks_per_row(block_size: int) -> int:
    """Blocks drawn side by side: 8 up to 8-token blocks, 12 for longer (taller) ones, so a pool of 64 blocks
    stays a few screens high and every block is wide enough for its label ("#12 ref=1", 9 characters)."""
    return 8 if block_size <= 8 else 12


def block_grid_figure(grid: pd.DataFrame, block_size: int) -> go.Figure:
    """Physical blocks in id order, each a column of slots (token per slot, top to bottom): fill = first
    owner's colour (light grey when free, darker when free but still cached), thick outline = shared. Above each
    block, two short lines: "#id ref=n" and the first characters of its hash."""
    per_row = blocks_per_row(block_size)
    width, pitch = 4.0, block_size + 2.4  # block width and vertical pitch, in slot heights (room for 2 label lines)
    xs, ys, words, hx, hy, hover, shapes, labels = [], [], [], [], [], [], [], []
    for row in grid.itertuples(index=False):
        x0, top = (row.block % per_row) * (width + 0.6), -(row.block // per_row) * pitch
        owner = row.owners.split(", ")[0] if row.owners else ""
        fill = owner_color(owner) if owner else (CACHED_FILL if row.state == "cached, free" else FREE_FILL)
        shapes.append({"type": "rect", "x0": x0, "x1": x0 + width, "y0": top - block_size, "y1": top,
                       "fillcolor": fill, "opacity": 0.45 if owner else 1.0, "layer": "below",
                       "line": {"width": 3 if row.ref_cnt > 1 else 1, "color": "#000000" if owner else EMPTY_TEXT}})
        labels.append(f"#{row.block} ref={row.ref_cnt}" + (f"<br>{row.hash[:4]}" if row.hash else ""))
        hx.append(x0 + width / 2)
        hy.append(top - block_size / 2)
        hover.append(f"block {row.block}: {row.state}<br>owners: {row.owners or '-'}<br>ref_cnt {row.ref_cnt}"
                     f"<br>hash {row.hash or '-'}<br>tokens: {' '.join(w for w in row.slots if w)}")
        for i, word in enumerate(row.slots):
            xs.append(x0 + width / 2)
            ys.append(top - i - 0.5)
            words.append(_short(word))
    fig = go.Figure(go.Scatter(x=xs, y=ys, text=words, mode="text", textfont={"size": 10}, hoverinfo="skip",
                               showlegend=False))
    fig.add_trace(go.Scatter(x=hx, y=hy, mode="markers", marker={"opacity": 0, "size": 30}, hovertext=hover,
                             hoverinfo="text", showlegend=False))
    fig.add_trace(go.Scatter(x=hx, y=[y + block_size / 2 + 0.1 for y in hy], text=labels, mode="text",
                             textposition="top center", textfont={"size": LABEL_FONT_PX}, hoverinfo="skip",
                             showlegend=False))
    fig.update_layout(shapes=shapes)
    fig.update_xaxes(visible=False, range=[-0.3, per_row * (width + 0.6)])
    rows = -(-len(grid) // per_row)
    fig.update_yaxes(visible=False, range=[-rows * pitch + (pitch - block_size) - 0.3, pitch - block_size])
    return style(fig, "Physical blocks: #id, ref_cnt, hash (colour = owner, thick outline = shared)",
                 height=90 + int(16 * pitch * rows), legend=False)


def free_queue_figure(queue: pd.DataFrame) -> go.Figure:
    """The free block queue left (head, reused first) to right (tail); shaded blocks are still cached."""
    cached = queue["hash"] != ""
    fig = go.Figure(go.Scatter(
        x=queue["position"], y=[0] * len(queue), mode="markers+text", text=queue["block"].astype(str),
        marker={"symbol": "square", "size": 26, "color": [CACHED_FILL if c else FREE_FILL for c in cached],
                "line": {"width": 1, "color": EMPTY_TEXT}},
        hovertext=[f"block {b}" + (f", cached {h}" if h else "") for b, h in zip(queue["block"], queue["hash"],
                                                                                   strict=True)],
        hoverinfo="text", showlegend=False))
    fig.update_xaxes(title_text="head (evicted first) -> tail", showticklabels=False, showgrid=False,
                     range=[-1, max(len(queue), 24)])
    fig.update_yaxes(visible=False)
    return style(fig, f"Free block queue ({len(queue)} blocks)", height=170, legend=False)


def attention_window_figure(window: pd.DataFrame, block_size: int) -> go.Figure:
    """A request's stored tokens by logical block: dark = read by the recent-N attention, light = stored only."""
    num_blocks = int(window["logical_block"].max()) + 1 if len(window) else 0
    z = [[None] * block_size for _ in range(num_blocks)]
    for row in window.itertuples(index=False):
        z[row.logical_block][row.slot] = 1 if row.attended else 0
    physical = window.groupby("logical_block")["physical_block"].first()
    y = [f"logical {i} -> block {physical[i]}" for i in range(num_blocks)]
    fig = go.Figure(go.Heatmap(z=z, y=y, x=list(range(block_size)), zmin=0, zmax=1, showscale=False,
                               colorscale=[[0, "#CFE2F3"], [1, PALETTE[0]]], xgap=2, ygap=2,
                               hovertemplate="%{y}, slot %{x}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(dtick=1)
    return style(fig, "Stored (light) vs attended (dark)", x="slot", height=120 + 28 * num_blocks, legend=False)


def sampling_figure(sampling: pd.DataFrame) -> go.Figure:
    """Blocks held for n samples per request, without and with shared prompt blocks (fork)."""
    fig = go.Figure()
    for i, (column, name) in enumerate((("blocks_no_sharing", "separate copies"), ("blocks_shared", "fork"))):
        fig.add_trace(go.Bar(x=sampling["n"].astype(str), y=sampling[column], name=name, marker_color=PALETTE[i],
                             text=None if i == 0 else [signed_pct(-p) for p in sampling["saved_pct"]]))
    return style(fig, "Parallel sampling: KV blocks held", x="samples per request (n)", y="blocks")


def fragmentation_caption(config: FragmentationConfig | None = None) -> str:
    """Caption of the fragmentation table: the memory and max_seq_len of ``config`` (default: the experiment's)."""
    c = config or FragmentationConfig()
    return (f"{c.capacity:,} token slots ({c.num_blocks:,} blocks of {c.block_size}), max_seq_len {c.max_seq_len:,}, "
            "FCFS. Token counts are averages over steps; the vLLM paper (Fig. 2) reports 60-80% waste before paging.")
