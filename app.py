"""KV Cache Lab: router only. Each page lives in app_pages/; shared widgets and charts in ui/.

The folder is not called ``pages/``: Streamlit treats a ``pages/`` folder next to the main script as a
legacy multipage app, and a fresh server's first visitor arriving by a page link would get that
folder's pages without this router (no layout, no navigation titles).
"""

import streamlit as st

from ui import background, warmup
from ui.params import forget_other_pages

PAGE_ICON = "💾"

# The favicon is an emoji, drawn by the browser: a ":material/...:" favicon is fetched from fonts.gstatic.com,
# which fails offline. The navigation's material icons come from the font Streamlit serves itself.
st.set_page_config(page_title="KV Cache Lab", page_icon=PAGE_ICON, layout="wide")

PAGES = [
    st.Page("app_pages/home.py", title="Home: KV memory", icon=":material/calculate:", default=True),
    st.Page("app_pages/paged_blocks.py", title="Paged blocks", icon=":material/grid_view:"),
    st.Page("app_pages/continuous_batching.py", title="Continuous batching", icon=":material/view_timeline:"),
    st.Page("app_pages/serving_engine.py", title="Serving engine", icon=":material/dns:"),
    st.Page("app_pages/eviction.py", title="Eviction", icon=":material/delete_sweep:"),
    st.Page("app_pages/quantization.py", title="Quantization", icon=":material/compress:"),
    st.Page("app_pages/sharing.py", title="Sharing (GQA/MQA/cross-layer)", icon=":material/share:"),
    st.Page("app_pages/memory_hierarchy.py", title="Memory hierarchy", icon=":material/layers:"),
    st.Page("app_pages/live_model.py", title="Live model", icon=":material/smart_toy:"),
]

page = st.navigation(PAGES)
forget_other_pages(page.url_path)
warmup.start()  # the heavy pages' default views, computed in the background once per server
warmup.prepare(page.url_path)  # a model page waits for the model code's import, never imports it beside another
with background.PAGES.page_run():  # counted: the warm-up's timing measurement waits for no page to be running
    page.run()
