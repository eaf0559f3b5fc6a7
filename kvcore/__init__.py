"""kvcore: the measurement engine behind KV Cache Lab.

Pure Python over torch, numpy and pandas. Nothing here imports streamlit or plotly, so every
experiment also runs headless (``python -m kvcore ...``) and under pytest.
"""

__version__ = "0.1.0"
