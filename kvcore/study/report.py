"""A study's HTML report: one self-contained file (figures, tables, texts, settings) that opens offline.

The figures are written in Plotly's JSON figure format (``{"data": [...], "layout": {...}}``, what
``plotly.graph_objects.Figure.to_json`` produces) and drawn by the plotly.js bundle that the installed
plotly distribution ships, inlined in a ``<script>`` element as ``include_plotlyjs=True`` does: no network,
no CDN. ``kvcore`` never imports plotly; it reads that one JavaScript file. Without plotly installed the
report keeps its tables and says the figures need it.

The look follows the app's figures: white background, light grid, the Okabe-Ito palette (one colour per
method in every figure), the title top left.
"""

from __future__ import annotations

import html
import json
import math
import textwrap
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#999999", "#882255")
FONT = "Inter, Source Sans Pro, Helvetica, Arial, sans-serif"
GRID = "#E5E9F0"
ROLLING = 16  # decode steps per rolling median of the per-step time figure
TITLE_CHARS = 62  # a longer title wraps (a figure is about half the page wide)
SUMMARY_COLUMNS = {
    "method": "method", "label": "settings", "ms_per_token": "ms / token (median)", "ms_q1": "IQR low",
    "ms_q3": "IQR high", "tokens_per_s": "tokens / s", "peak_memory_bytes": "peak memory (MB)",
    "kv_bytes": "KV held (MB)", "kv_vs_full": "KV vs full", "perplexity": "perplexity", "ppl_low": "95% low",
    "ppl_high": "95% high", "ppl_vs_full": "ppl vs full", "agreement": "same tokens as full",
    "first_divergence": "first different token", "error": "error",
}
MB_COLUMNS = ("peak_memory_bytes", "kv_bytes")


def plotly_js() -> str | None:
    """The plotly.js bundle of the installed plotly distribution (read as a file, never imported), or None."""
    try:
        dist = metadata.distribution("plotly")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if str(file).replace("\\", "/").endswith("package_data/plotly.min.js"):
            path = Path(dist.locate_file(file))
            return path.read_text(encoding="utf-8") if path.is_file() else None
    return None


def _layout(title: str, x: str, y: str, *, height: int = 380, legend: bool = False, **extra: Any) -> dict:
    axis = {"gridcolor": GRID, "zerolinecolor": GRID, "linecolor": "#B0B8C4", "automargin": True}
    lines = textwrap.wrap(title, TITLE_CHARS)
    return {"title": {"text": "<br>".join(lines), "x": 0.0, "xanchor": "left", "xref": "container", "y": 1.0,
                      "yanchor": "top", "yref": "container", "pad": {"t": 12, "l": 12}},
            "height": height + 22 * (len(lines) - 1), "paper_bgcolor": "white", "plot_bgcolor": "white",
            "font": {"family": FONT, "size": 13}, "colorway": list(PALETTE),
            "margin": {"l": 70, "r": 20, "t": 30 + 24 * len(lines), "b": 60}, "showlegend": legend,
            "legend": {"orientation": "v", "x": 1.02, "xanchor": "left", "y": 1.0, "yanchor": "top"},
            "xaxis": {**axis, "title": {"text": x}}, "yaxis": {**axis, "title": {"text": y}}, **extra}


def _colors(methods: list[str]) -> list[str]:
    return [PALETTE[i % len(PALETTE)] for i in range(len(methods))]


def _num(values) -> list[float | None]:
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v) for v in values]


def _bars(ok: pd.DataFrame, column: str, title: str, y: str, scale: float = 1.0, fmt: str = ".3g",
          error: tuple[str, str] | None = None, **layout: Any) -> dict:
    values = ok[column].astype(float) * scale
    trace: dict[str, Any] = {"type": "bar", "x": list(ok["method"]), "y": _num(values),
                             "marker": {"color": _colors(list(ok["method"]))}, "hovertext": list(ok["label"]),
                             "hovertemplate": "%{x}: %{y}<br>%{hovertext}<extra></extra>"}
    if error is None:  # a value label would sit on an error bar
        trace |= {"text": [f"{v:{fmt}}" for v in values], "textposition": "outside", "cliponaxis": False}
    else:
        low, high = ok[error[0]].astype(float) * scale, ok[error[1]].astype(float) * scale
        trace["error_y"] = {"type": "data", "symmetric": False, "array": _num(high - values),
                            "arrayminus": _num(values - low), "color": "#333"}
    return {"data": [trace], "layout": _layout(title, "method", y, **layout)}


def study_figures(summary: pd.DataFrame, steps: pd.DataFrame) -> list[dict]:
    """The report's figures (Plotly JSON), from the study's ``summary`` and ``steps`` tables."""
    ok = summary[summary.get("error", pd.Series(index=summary.index, dtype=object)).isna()]
    if ok.empty:
        return []
    figs = [
        _bars(ok, "ms_per_token", "Decode time per token (median of the timed runs, IQR bars)",
              "ms per token", error=("ms_q1", "ms_q3")),
        _bars(ok, "peak_memory_bytes", "Peak memory while generating", "MB", scale=1e-6),
        _bars(ok, "kv_bytes", "KV cache bytes held after the last token", "MB", scale=1e-6),
    ]
    if "ppl_vs_full" in ok:
        figs.append(_bars(ok, "ppl_vs_full", "Perplexity vs the full cache (95% paired bootstrap interval)",
                          "perplexity ratio", error=("ppl_vs_full_low", "ppl_vs_full_high"),
                          shapes=[_hline(1.0)]))
        figs.append(_bars(ok, "agreement", "Greedy tokens identical to the full cache's, by position",
                          "share of tokens", fmt=".0%", yaxis={"range": [0, 1.1], "tickformat": ".0%",
                                                                "gridcolor": GRID, "title": {"text": "share"}}))
        figs.append(_tradeoff(ok))
    figs += _step_figures(steps, list(ok["method"]))
    return figs


def _hline(y: float) -> dict:
    return {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y,
            "line": {"color": "#666", "dash": "dot", "width": 1}}


def _tradeoff(ok: pd.DataFrame) -> dict:
    traces = []
    for color, (_, r) in zip(_colors(list(ok["method"])), ok.iterrows(), strict=True):
        traces.append({"type": "scatter", "mode": "markers", "name": r["method"], "x": [float(r["kv_vs_full"])],
                       "y": [float(r["ppl_vs_full"])], "marker": {"size": 12, "color": color},
                       "hovertemplate": f"{r['method']}: %{{x:.0%}} of the KV bytes, perplexity x%{{y:.3f}}"
                                        "<extra></extra>",
                       "error_y": {"type": "data", "symmetric": False,
                                   "array": _num([r["ppl_vs_full_high"] - r["ppl_vs_full"]]),
                                   "arrayminus": _num([r["ppl_vs_full"] - r["ppl_vs_full_low"]]), "color": color}})
    layout = _layout("KV bytes and perplexity, both relative to the full cache",
                     "KV bytes held / full cache", "perplexity / full cache", legend=True, shapes=[_hline(1.0)])
    layout["xaxis"]["tickformat"] = ".0%"
    return {"data": traces, "layout": layout}


def _step_figures(steps: pd.DataFrame, methods: list[str]) -> list[dict]:
    decode = steps[(steps["phase"] == "decode") & steps["method"].isin(methods)]
    if decode.empty:
        return []
    timing, memory = [], []
    for color, method in zip(_colors(methods), methods, strict=True):
        part = decode[decode["method"] == method]
        if part.empty:
            continue
        smooth = part["ms"].rolling(ROLLING, min_periods=1).median()
        timing.append({"type": "scatter", "mode": "lines", "name": method, "x": part["step"].tolist(),
                       "y": _num(smooth), "line": {"color": color}})
        memory.append({"type": "scatter", "mode": "lines", "name": method, "x": part["step"].tolist(),
                       "y": _num(part["kv_bytes"] / 1e6), "line": {"color": color}})
    title = f"Decode time per step (rolling median of {ROLLING}, first timed run)"
    return [{"data": timing, "layout": _layout(title, "generated token", "ms", legend=True)},
            {"data": memory, "layout": _layout("KV cache bytes held along the generation", "generated token", "MB",
                                               legend=True)}]


def _summary_html(summary: pd.DataFrame) -> str:
    shown = summary[[c for c in SUMMARY_COLUMNS if c in summary.columns]].copy()
    for column in MB_COLUMNS:
        if column in shown:
            shown[column] = shown[column] / 1e6
    formats = {c: (lambda v: "" if pd.isna(v) else f"{v:.3g}") for c in shown.columns
               if pd.api.types.is_float_dtype(shown[c])}
    if "agreement" in shown:
        formats["agreement"] = lambda v: "" if pd.isna(v) else f"{v:.0%}"
    if "first_divergence" in shown:
        formats["first_divergence"] = lambda v: "none" if pd.isna(v) else f"{int(v)}"
    return shown.rename(columns=SUMMARY_COLUMNS).to_html(index=False, formatters={
        SUMMARY_COLUMNS[c]: f for c, f in formats.items()}, na_rep="", classes="summary", border=0)


NOTES = [
    "<b>ms / token</b>: a short untimed warm-up generation, then the timed generations; each gives the mean time of "
    "its one-token decode steps; the table gives their median, interquartile range (IQR) and the figure its bars.",
    "<b>Peak memory</b>: one more generation, measured apart from the timed ones: growth of the process's resident "
    "set on CPU (sampled every millisecond, after freed memory was handed back to the system), "
    "<code>torch.cuda.max_memory_allocated</code> on CUDA.",
    "<b>KV held</b>: bytes the cache holds after the last generated token, exact (packed codes, scales and "
    "full-precision windows of a quantized cache).",
    "<b>Perplexity</b>: held-out text streamed one token per step through each method's cache; 95% block-bootstrap "
    "interval over blocks of 16 tokens; the ratio to the full cache resamples the same blocks for both (paired).",
    "<b>Same tokens as full</b>: greedy decoding from the same prompt; the share of positions whose token equals "
    "the full cache's, and the first position that differs.",
]


def report_html(summary: pd.DataFrame, steps: pd.DataFrame, texts: pd.DataFrame, settings: Mapping[str, Any],
                versions: Mapping[str, Any], title: str = "KV cache study") -> str:
    """The whole report as one HTML string (plotly.js inlined when the plotly distribution is installed)."""
    js = plotly_js()
    figures = study_figures(summary, steps) if js is not None else []
    divs = "\n".join(f'<div class="fig" id="fig-{i}"></div>' for i in range(len(figures)))
    specs = json.dumps([{"id": f"fig-{i}", **f} for i, f in enumerate(figures)]).replace("</", "<\\/")
    model = settings.get("model") or "bundled"
    head = (f"{html.escape(str(model))} ({html.escape(str(settings.get('dtype')))}) on "
            f"{html.escape(str(versions.get('device')).split(' (')[0])}, {settings.get('threads')} torch thread(s) "
            f"of {versions.get('cpus')} CPUs; {settings.get('new_tokens')} new tokens, "
            f"{settings.get('repeats')} timed runs, {settings.get('ppl_tokens')} tokens scored; "
            f"torch {html.escape(str(versions.get('torch')))}, commit {html.escape(str(versions.get('commit')))}")
    if "load_1min" in summary and summary["load_1min"].notna().any():
        head += (f"; 1-minute load average {summary['load_1min'].min():.1f}-{summary['load_1min'].max():.1f} "
                 "during the timed runs")
    texts_html = "\n".join(f"<details><summary>{html.escape(str(r.method))}</summary><pre>"
                           f"{html.escape(str(r.text if isinstance(r.text, str) else r.error))}</pre></details>"
                           for r in texts.itertuples())
    no_js = "" if js is not None else "<p class='warn'>The figures need the plotly package installed " \
                                      "(pip install plotly); the tables below hold every number.</p>"
    record = html.escape(json.dumps({"settings": dict(settings), "versions": dict(versions)}, indent=1,
                                    default=str))
    script = f"<script>{js}</script>" if js is not None else ""
    draw = (f"<script>const FIGURES = {specs};\nfor (const f of FIGURES) {{ Plotly.newPlot(f.id, f.data, f.layout, "
            "{displaylogo: false, responsive: true}); }\n</script>") if figures else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}: {html.escape(str(model))}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: {FONT}; margin: 24px auto; max-width: 1400px; padding: 0 16px; color: #222; }}
h1 {{ margin-bottom: 4px; }} .meta {{ color: #555; margin-top: 0; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 12px; }}
.fig {{ border: 1px solid {GRID}; border-radius: 6px; min-height: 380px; }}
table.summary {{ border-collapse: collapse; font-size: 13px; }}
table.summary th, table.summary td {{ padding: 4px 8px; border-bottom: 1px solid {GRID}; text-align: right; }}
table.summary td:nth-child(-n+2), table.summary th:nth-child(-n+2) {{ text-align: left; }}
pre {{ white-space: pre-wrap; background: #f7f8fa; padding: 8px; border-radius: 4px; }}
.warn {{ color: #D55E00; }}
</style>{script}</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{head}</p>
{no_js}
<h2>Results</h2>
{_summary_html(summary)}
<h2>Figures</h2>
<div class="grid">
{divs}
</div>
<h2>How each number is measured</h2>
<ul>{"".join(f"<li>{n}</li>" for n in NOTES)}</ul>
<h2>Greedy texts</h2>
{texts_html}
<h2>Settings and versions</h2>
<pre>{record}</pre>
{draw}
</body></html>
"""


def write_report(folder: Path, tables: Mapping[str, pd.DataFrame], settings: Mapping[str, Any],
                 versions: Mapping[str, Any]) -> Path:
    """``<folder>/report.html`` from a study's tables."""
    path = Path(folder) / "report.html"
    path.write_text(report_html(tables["summary"], tables["steps"], tables["texts"], settings, versions),
                    encoding="utf-8")
    return path
