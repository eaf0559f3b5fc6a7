"""Optional compiled kernels: C sources in ``csrc/`` built once per machine with its C compiler, called by ctypes.

The package stays pure Python: nothing is built at install time and every compiled kernel has a torch
fallback. On first use a source is compiled with the system compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``) for this CPU (``-march=native``) into a cache folder keyed by the source, the compiler, the
flags and the CPU, so a shared home folder never hands one CPU another's build. Like vLLM's CPU backend,
the kernels are plain C with vector extensions and OpenMP (``-fopenmp`` where the compiler has it, else
one thread); the OpenMP runtime is the one torch loaded, so kernels and torch ops share one pool of threads.
ctypes releases the GIL during a call. ``KVLAB_NATIVE=0`` turns them off; :func:`unavailable_reason` says
why one is not loaded. Compiling uses ``-ffast-math`` but linking does not, so loading a kernel never
switches the process to flush-to-zero (GCC links ``crtfastmath.o``, which does that, into any shared
object linked with it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

DISABLE_ENV = "KVLAB_NATIVE"  # "0": never build or load compiled kernels
CACHE_ENV = "KVLAB_NATIVE_CACHE"  # folder for built libraries (default: ~/.cache/kv-cache-lab/native)
SOURCES = Path(__file__).resolve().parent / "csrc"
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-std=gnu11")
OPENMP = "-fopenmp"  # tried first; a compiler without OpenMP builds the kernels single-threaded
BUILD_TIMEOUT_S = 120

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}


def enabled() -> bool:
    """False when ``KVLAB_NATIVE=0`` (or ``false``/``no``/``off``)."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def compiler() -> str | None:
    """Path of the C compiler to use, or None if there is none."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((path for name in names if (path := shutil.which(name))), None)


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the architecture and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache_dir() -> Path:
    """``$KVLAB_NATIVE_CACHE``, else ~/.cache/kv-cache-lab/native, else a private per-user temp folder.

    A shared temp folder would let another local user plant a library under the expected name, so the
    fallback must be owned by this user and writable by no one else.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    home = Path.home() / ".cache" / "kv-cache-lab" / "native"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else None
    private = Path(tempfile.gettempdir()) / f"kv-cache-lab-native-{uid}"
    private.mkdir(mode=0o700, exist_ok=True)
    info = private.stat()
    if (uid is not None and info.st_uid != uid) or info.st_mode & 0o022:
        raise OSError(f"{private} is not private to this user; set {CACHE_ENV} to a folder of your own")
    return private


def library_path(name: str, cc: str) -> Path:
    """Where the build of ``csrc/<name>.c`` with compiler ``cc`` lives on this machine."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256()
    for part in ((SOURCES / f"{name}.c").read_bytes(), version.encode(), " ".join((*COMPILE_FLAGS, OPENMP)).encode(),
                 _cpu_signature().encode()):
        key.update(part)
    return _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"


def _build(name: str, cc: str, target: Path) -> None:
    """Compile (with OpenMP if the compiler can), then link without -ffast-math, into a temporary file renamed
    into place (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / f"{name}.o", Path(tmp) / f"{name}.so"
        run = {"capture_output": True, "text": True, "timeout": BUILD_TIMEOUT_S, "check": True}
        for openmp in ((OPENMP,), ()):
            try:
                subprocess.run([cc, *COMPILE_FLAGS, *openmp, "-c", str(SOURCES / f"{name}.c"), "-o", str(obj)], **run)
                subprocess.run([cc, "-shared", str(obj), "-o", str(lib), "-lm", *openmp], **run)
                break
            except subprocess.CalledProcessError:
                if not openmp:
                    raise
        os.replace(lib, target)


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library for ``csrc/<name>.c``, building it on first use; None if it cannot be had."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        library, reason = None, ""
        cc = compiler()
        if not enabled():
            reason = f"{DISABLE_ENV}=0"
        elif cc is None:
            reason = "no C compiler found (set CC or install gcc)"
        else:
            try:
                target = library_path(name, cc)
                if not target.exists():
                    _build(name, cc, target)
                library = ctypes.CDLL(str(target))
            except subprocess.CalledProcessError as e:
                reason = f"{name}.c did not compile: {(e.stderr or '').strip()[-500:]}"
            except (OSError, subprocess.SubprocessError) as e:
                reason = f"{name}.c could not be built or loaded: {e}"
        _loaded[name], _reasons[name] = library, reason
        return library


def entry_points(name: str, signatures: dict[str, list]) -> dict[str, ctypes._CFuncPtr] | None:
    """The functions of ``csrc/<name>.c`` named in ``signatures`` (name -> ctypes argument types), each typed to
    return a C int; None when the library cannot be had (:func:`load`)."""
    library = load(name)
    if library is None:
        return None
    out = {}
    for function, argtypes in signatures.items():
        fn = getattr(library, function)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
        out[function] = fn
    return out


def unavailable_reason(name: str) -> str:
    """Why :func:`load` returned None for ``name`` ("" if it loaded or was not tried)."""
    return _reasons.get(name, "")
