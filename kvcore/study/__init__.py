"""Whole studies, grids of experiments and serving-config searches, run on one machine or on a Ray cluster.

The layer above every experiment: it runs them, it is run by nothing but the command line.

``study``     the comparison of one model's KV cache methods (full cache, eviction, cross-layer merging,
              quantized caches, GQA-converted heads): ms per token, peak memory, KV bytes, perplexity with
              its interval, agreement with the full cache's greedy text (:mod:`kvcore.study.study`).
``results``   the results folder: a CSV and a JSON per table, settings and versions, ``--resume``.
``report``    a self-contained offline HTML report of a study (Plotly figures, JavaScript inlined).
``engines``   run independent tasks in a local process pool or as Ray tasks; results in task order.
``grid``      grid files (TOML or YAML): an experiment, fixed settings, settings to cross.
``sweep``     a grid's cells through an engine, gathered into one table with the cells' settings as columns.
``search``    serving-config search on the simulator under TTFT/TPOT p99 SLOs (Vidur-Search style).
``cli``       ``python -m kvcore study | sweep | search``.

This package never imports streamlit or plotly: the HTML report writes Plotly's JSON figure format and
inlines the plotly.js bundle that the plotly distribution ships, read as a file.
"""
