"""Turn an error the user caused into a message on the page, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

# What a bad setting, a missing model or a dead network raises inside kvcore.
USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError, MemoryError)


@contextmanager
def user_errors(action: str, stop: bool = True) -> Iterator[None]:
    """Run a block; on a user-caused error show ``action: message`` and stop this page's run.

    stop: False shows the message and lets the rest of the page draw.
    On a page the block and its message draw in one container: however many elements the block draws this time
    (a progress bar when it computes, none when a cache has the result), it holds one place, and what follows keeps
    its place (why: :mod:`ui.params`).
    """
    with st.container() if get_script_run_ctx(suppress_warning=True) is not None else nullcontext():
        try:
            yield
        except USER_ERRORS as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            st.error(f"{action}: {message}", icon=":material/error:")
            if stop:
                st.stop()
