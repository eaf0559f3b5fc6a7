"""KV Cache Lab: router only. Each page lives in pages/; shared widgets and charts in ui/."""

import streamlit as st

from ui.params import forget_other_pages

st.set_page_config(page_title="KV Cache Lab", page_icon=":material/memory:", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home: KV memory", icon=":material/calculate:", default=True),
    st.Page("pages/paged_blocks.py", title="Paged blocks", icon=":material/grid_view:"),
    st.Page("pages/continuous_batching.py", title="Continuous batching", icon=":material/view_timeline:"),
    st.Page("pages/eviction.py", title="Eviction", icon=":material/delete_sweep:"),
    st.Page("pages/quantization.py", title="Quantization", icon=":material/compress:"),
    st.Page("pages/sharing.py", title="Sharing (GQA/MQA/cross-layer)", icon=":material/share:"),
    st.Page("pages/memory_hierarchy.py", title="Memory hierarchy", icon=":material/layers:"),
    st.Page("pages/live_model.py", title="Live model", icon=":material/smart_toy:"),
]

page = st.navigation(PAGES)
forget_other_pages(page.url_path)
page.run()
