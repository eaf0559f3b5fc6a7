"""Streamlit glue: URL-bound widgets, Plotly figures with one look, tables with CSV downloads.

The only package besides ``app_pages/`` and ``app.py`` that imports streamlit.
"""
