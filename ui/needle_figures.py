"""The Eviction page's needle-in-a-haystack section: its widgets, figures and tables.

Figures take the needle test's tables (:mod:`kvcore.needle`) and return ``go.Figure``: a retrieval heatmap per
method (needle depth x haystack length, G. Kamradt's picture), the retrieval rate with its interval against the
full cache's, the bytes each method holds, and perplexity against retrieval. :func:`needle_section` is the one
call the page makes: its default view comes from the background warm-up (:func:`ui.needle_runs.warm_default`) and
fills in by itself when it is done; other settings are computed when picked, under a progress bar.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from kvcore.models.loader import describe_model
from kvcore.needle import NeedleConfig, disagreements, join_perplexity, lessons, needle_methods
from kvcore.needle.lesson import FINE_LOST, PPL_TOLERANCE
from kvcore.needle.tables import BASELINE, LOSES
from ui import background, figures, needle_runs, params, tables
from ui.guard import user_errors
from ui.needle_runs import PAGE_HAYSTACK_TOKENS, NeedleSettings, NeedleView

MODELS = ["smollm2-135m", "bundled"]
SHARES = [0.05, 0.1, 0.25, 0.5]
LENGTHS = [128, 256, 512, 1024]
DEPTHS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
VERDICT_COLORS = {BASELINE: "#000000", LOSES: "#D55E00"}  # anything else (within noise) stays grey
GREY = "#999999"
SYMBOLS = ("circle", "square", "triangle-up", "diamond")  # one per budget in the perplexity view
PER_ROW = 4  # heatmaps per row
NEEDLES = [1, 2, 3, 4]
CLI = ("python -m kvcore needle --model smollm2-135m --methods all --budgets 0.1 0.25 0.5 --lengths 512 1024 2048 "
       "--depths 0 0.25 0.5 0.75 1 --needles 4 --perplexity-tokens 512 --csv needle.csv")


def _budget_text(budget) -> str:
    return "every token" if budget is None or budget != budget else f"{budget:.0%}" if isinstance(budget, float) \
        else f"{budget} tokens"


def _at(frame: pd.DataFrame, budget) -> pd.DataFrame:
    """Rows of one budget, with the methods that keep every token (the full cache, quantizers)."""
    none = frame["budget"].map(lambda b: b is None or b != b)
    return frame[none | (frame["budget"] == budget)]


def retrieval_heatmaps(cells: pd.DataFrame, budget) -> go.Figure:
    """One heatmap per method: needle depth (rows) x haystack length (columns), colour = share retrieved, text =
    needles retrieved of those hidden; the methods that keep every token are shown beside those at ``budget``."""
    shown = _at(cells, budget)
    methods = list(dict.fromkeys(shown["method"]))
    cols = min(PER_ROW, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=methods, shared_yaxes=True,
                        horizontal_spacing=0.03, vertical_spacing=0.3 / rows)
    for i, method in enumerate(methods):
        part = shown[shown["method"] == method]
        grid = part.pivot_table(index="depth", columns="length", values="retrieved", sort=True)
        found = part.assign(k=(part["retrieved"] * part["needles"]).round().astype(int))
        counts = found.pivot_table(index="depth", columns="length", values="k", sort=True)
        n = int(part["needles"].iloc[0])
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=[f"{d:.0%}" for d in grid.index], zmin=0, zmax=1,
            colorscale=figures.SEQUENTIAL, showscale=i == 0, colorbar={"title": {"text": "retrieved"}},
            text=[[f"{int(k)}/{n}" for k in row] for row in counts.to_numpy()], texttemplate="%{text}",
            hovertemplate=f"{method}<br>%{{x}} tokens, needle at %{{y}}<br>%{{text}} retrieved<extra></extra>"),
            row=i // cols + 1, col=i % cols + 1)
        bottom = i + cols >= len(methods)  # the last heatmap of its column: the axis title goes under it
        fig.update_xaxes(title_text="haystack tokens" if bottom else None, type="category", row=i // cols + 1,
                         col=i % cols + 1)
    fig.update_yaxes(autorange="reversed", type="category")
    for r in range(rows):
        fig.update_yaxes(title_text="needle depth", row=r + 1, col=1)
    title = f"Needles retrieved by depth and haystack length (budget {_budget_text(budget)})"
    return figures.style(fig, title, height=260 * rows + 90, legend=False)


def retrieval_rates(summary: pd.DataFrame, budget) -> go.Figure:
    """Each method's share of needles retrieved with its 95% Wilson interval; the full cache's interval shaded.
    A marker is coloured only when the method loses the needle beyond the noise (paired, over the haystacks)."""
    shown = _at(summary, budget).iloc[::-1]
    full = summary[summary["method"] == "full"].iloc[0]
    colors = [VERDICT_COLORS.get(v, GREY) for v in shown["verdict"]]
    fig = go.Figure(go.Scatter(
        x=shown["retrieved"], y=shown["method"], mode="markers", marker={"size": 11, "color": colors},
        error_x={"type": "data", "symmetric": False, "array": shown["retrieved_high"] - shown["retrieved"],
                 "arrayminus": shown["retrieved"] - shown["retrieved_low"], "thickness": 1.5, "width": 5},
        customdata=shown[["retrieved_low", "retrieved_high", "verdict", "haystacks"]],
        hovertemplate="%{y}: %{x:.2f} [%{customdata[0]:.2f}, %{customdata[1]:.2f}] of %{customdata[3]} "
                      "haystacks<br>%{customdata[2]}<extra></extra>"))
    fig.add_vrect(x0=full["retrieved_low"], x1=full["retrieved_high"], fillcolor="#000000", opacity=0.07, line_width=0)
    fig.update_xaxes(range=[-0.03, 1.03])
    return figures.style(fig, f"Needles retrieved, 95% interval (budget {_budget_text(budget)})",
                         x="share retrieved (shaded: the full cache's interval)", y=None, legend=False)


def bytes_held(summary: pd.DataFrame, budget) -> go.Figure:
    """KV bytes each method holds after compression, as a share of the full cache's."""
    shown = _at(summary, budget).assign(kv_pct=lambda f: 100 * f["kv_share"])
    return figures.bar_chart(shown, "method", "kv_pct", title=f"KV bytes held (budget {_budget_text(budget)})",
                             x_title="method", y_title="% of the full cache's bytes")


def perplexity_vs_retrieval(joined: pd.DataFrame) -> go.Figure:
    """Perplexity over the full cache's (x, log, 95% CI) against the share of needles retrieved (y, 95% CI), one
    point per method (colour) and budget (symbol); a red ring: fine on perplexity (surely under the tolerance), yet
    losing the needle."""
    shown = joined[joined["ppl_vs_full"].notna()]
    colors = {m: figures.PALETTE[i % len(figures.PALETTE)] for i, m in enumerate(dict.fromkeys(shown["method"]))}
    budgets = list(dict.fromkeys(b for b in shown["budget"] if b is not None and b == b))
    fig = go.Figure()
    for row in shown.itertuples():
        at = row.budget is not None and row.budget == row.budget
        name = row.method + (f" @ {_budget_text(row.budget)}" if at else "")
        lost = row.agreement == FINE_LOST
        fig.add_trace(go.Scatter(
            x=[row.ppl_vs_full], y=[row.retrieved], mode="markers", name=name,
            marker={"size": 11, "color": colors[row.method],
                    "symbol": SYMBOLS[budgets.index(row.budget) % len(SYMBOLS)] if at else "circle",
                    "line": {"width": 3 if lost else 0, "color": VERDICT_COLORS[LOSES]}},
            error_x={"type": "data", "symmetric": False, "array": [row.ppl_vs_full_high - row.ppl_vs_full],
                     "arrayminus": [row.ppl_vs_full - row.ppl_vs_full_low], "thickness": 1.2, "width": 4},
            error_y={"type": "data", "symmetric": False, "array": [row.retrieved_high - row.retrieved],
                     "arrayminus": [row.retrieved - row.retrieved_low], "thickness": 1.2, "width": 4},
            hovertemplate=f"{name}<br>perplexity x%{{x:.3f}}, retrieved %{{y:.2f}}<br>{row.agreement}<extra></extra>"))
    fig.add_vline(x=1 + PPL_TOLERANCE, line_dash="dot", line_color=GREY)
    fig.update_xaxes(type="log")
    fig.update_yaxes(range=[-0.08, 1.08])
    return figures.style(fig, "Perplexity vs retrieval (each with its 95% interval; red ring: perplexity fine, "
                              "needle lost)", x=f"perplexity / full cache (log; dotted: +{PPL_TOLERANCE:.0%})",
                         y="share of needles retrieved", legend="right", height=420)


def _widgets() -> tuple[str, dict]:
    default = needle_runs.DEFAULT  # the widgets' defaults are the view the warm-up computes
    left, mid, right = st.columns(3)
    model = params.widget(left.selectbox, "Model", key="nd_model", options=MODELS, index=MODELS.index(default.model),
                          help="SmolLM2-135M-Instruct retrieves; the bundled 5.8M model is too small to")
    methods = params.widget(mid.multiselect, "Methods (full cache always)", key="nd_methods",
                            options=[m for m in needle_methods() if m != "full"],
                            default=[m for m in default.config.methods if m != "full"])
    budgets = params.widget(right.multiselect, "Budgets (share of the context kept)", key="nd_budgets",
                            options=SHARES, default=list(default.config.budgets))
    left, mid, right = st.columns(3)
    lengths = params.widget(left.multiselect, "Haystack tokens", key="nd_lengths", options=LENGTHS,
                            default=list(default.config.lengths))
    depths = params.widget(mid.multiselect, "Needle depths (share of the haystack)", key="nd_depths", options=DEPTHS,
                           default=list(default.config.depths))
    needles = params.widget(right.selectbox, "Needles per cell", key="nd_needles", options=NEEDLES,
                            index=NEEDLES.index(default.config.needles))
    question = params.widget(st.segmented_control, "Question", key="nd_q", options=["compressed", "after"],
                             default=default.config.question, required=True,
                             help="compressed: the question ends the compressed context, so SnapKV's window sees it "
                                  "(SnapKV, kvpress's compress_questions); after: fed after compression (kvpress's "
                                  "pipeline)")
    return model, {"methods": tuple(methods), "budgets": tuple(sorted(budgets)), "lengths": tuple(sorted(lengths)),
                   "depths": tuple(sorted(depths)), "needles": needles, "mode": "prefill", "question": question}


def _show(settings: NeedleSettings, view: NeedleView) -> None:
    results = view.results
    joined = join_perplexity(results.summary, view.perplexity)
    full = joined[joined["method"] == "full"].iloc[0]
    st.caption(f"Model: {describe_model(settings.model)}. Baseline: the full cache retrieved "
               f"{round(full.retrieved * full.haystacks)} of {full.haystacks} needles "
               f"({full.retrieved:.2f} [{full.retrieved_low:.2f}, {full.retrieved_high:.2f}]); each method is judged "
               "against it on the same haystacks.")
    budgets = list(settings.config.budgets) or [None]
    budget = params.widget(st.selectbox, "Budget shown (share of the context kept)", key="nd_at", options=budgets) \
        if len(budgets) > 1 else budgets[0]
    figures.show(retrieval_heatmaps(results.table, budget), key="nd_heat")
    left, right = st.columns(2)
    with left:
        figures.show(retrieval_rates(joined, budget), key="nd_rates")
    with right:
        figures.show(bytes_held(joined, budget), key="nd_bytes")
    figures.show(perplexity_vs_retrieval(joined), key="nd_ppl")
    lost = disagreements(joined)
    for row in lost.itertuples():
        st.warning(f"**{row.method} @ {_budget_text(row.budget)}**: {row.agreement}: perplexity x{row.ppl_vs_full:.3f} "
                   f"[{row.ppl_vs_full_low:.3f}, {row.ppl_vs_full_high:.3f}], yet {row.retrieved:.2f} "
                   f"[{row.retrieved_low:.2f}, {row.retrieved_high:.2f}] of the needles against {row.full:.2f} for "
                   "the full cache.")
    with st.expander("What each method did, as measured"):
        st.markdown("\n".join(f"- {line}" for line in lessons(joined)))
    shown = {"model": settings.model, "q": settings.config.question}
    tables.show_table(joined, "eviction", "needle-summary", shown,
                      caption="One row per method and budget over every haystack: the share of needles retrieved "
                              "with its 95% Wilson interval, the full cache's, the paired difference and its verdict, "
                              "bytes held, and the eviction sweep's perplexity at the same budget.")
    tables.show_table(results.table, "eviction", "needle-cells", shown,
                      caption="One row per method, budget, haystack length and needle depth (the first needle's "
                              "answer shown).")


def needle_section() -> None:
    """The Eviction page's needle-in-a-haystack section (one call at the end of the page)."""
    st.header("Does the policy keep what matters? A needle in a haystack")
    st.markdown(
        "Perplexity on running text flatters recency: a sliding window predicts the next word well after it has "
        "thrown away a fact the user will ask about. kvpress, SnapKV and RULER judge compression by **retrieval**: "
        "hide a fact with a random five-digit value in a haystack of Python's documentation (G. Kamradt's "
        "needle-in-a-haystack test; RULER's numeric needles and answer prefix), compress the cache **once** after "
        "the context (kvpress), then decode the answer greedily; retrieved = the value appears in it. The papers "
        "expect a window to lose a needle outside it, and attention-scored compression such as SnapKV to keep it "
        "at high compression: here it is measured.")
    model, chosen = _widgets()
    st.caption(f"The page reads at most {PAGE_HAYSTACK_TOKENS:,} haystack tokens per view; larger grids (and "
               f"decode mode) run from the command line: `{CLI}`.")
    if not chosen["lengths"] or not chosen["depths"]:
        st.info("Pick at least one haystack length and one needle depth.")
        return
    with user_errors("Needle test"):  # the page's last section: stopping here is returning
        settings = NeedleSettings(model, NeedleConfig(**chosen))
        settings.check_cost()
        view = needle_runs.kept(settings)
        if view is None:
            if not background.wait_for(_pending(settings), "Run the needle test now (about 40 s)", "nd_run",
                                       OFF_NOTE):
                return
            view = needle_runs.shown(settings)
    _show(settings, view)


OFF_NOTE = ("The default needle grid is computed by the server's background warm-up, which is off here "
            "(KVLAB_WARMUP=0); run it now, or pick other settings above.")


def _pending(settings: NeedleSettings) -> background.Pending:
    """The view as the background sees it: the warm-up computes the default settings, nothing computes others."""
    return background.Pending(lambda: needle_runs.kept(settings), lambda: needle_runs.in_flight(settings),
                              background.NEEDLE if settings == needle_runs.DEFAULT else None,
                              f"Needle test on {settings.model}")
