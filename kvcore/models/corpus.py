"""The bundled model's corpus: Python's own documentation, available on every machine with no download.

Two openly licensed sources (Python Software Foundation License), both shipped with CPython:
``pydoc_data.topics`` (the language reference topics behind ``help()``) and the docstrings of the
standard library's ``.py`` files, read with ``ast`` (test suites left out). Documents are built in
sorted order and split with a fixed seed, so one Python version always gives the same corpus.
"""

from __future__ import annotations

import ast
import random
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
CORPUS_LICENSE = ("Python documentation and standard library docstrings, Copyright Python Software "
                  "Foundation, used under the PSF License Agreement (https://docs.python.org/3/license.html).")


@dataclass(slots=True)
class Corpus:
    """Documents split into train and validation; ``sources`` names each document's origin."""

    train: list[str]
    validation: list[str]
    train_sources: list[str]
    validation_sources: list[str]

    def __post_init__(self) -> None:
        if len(self.train) != len(self.train_sources) or len(self.validation) != len(self.validation_sources):
            raise ValueError("each document needs exactly one source name")
        if not self.train or not self.validation:
            raise ValueError("both splits need at least one document")


def pydoc_documents() -> list[tuple[str, str]]:
    """``(source, text)`` for each ``pydoc_data.topics`` entry, sorted by topic name."""
    from pydoc_data.topics import topics

    return [(f"pydoc_data.topics:{name}", topics[name].strip()) for name in sorted(topics) if topics[name].strip()]


def _docstrings(tree: ast.Module) -> list[str]:
    """Docstrings of a module, its classes and functions, in source order."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                found.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def stdlib_documents(stdlib: Path | None = None) -> list[tuple[str, str]]:
    """``(source, text)`` per standard-library file with docstrings, files in sorted path order.

    stdlib: the library folder; default this interpreter's (``sysconfig`` "stdlib").
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        strings = _docstrings(tree)
        if strings:
            docs.append((f"stdlib:{rel.as_posix()}", "\n\n".join(strings)))
    return docs


def build_corpus(seed: int = 0, validation_fraction: float = 0.05) -> Corpus:
    """All documents, shuffled with ``seed``; the last ``validation_fraction`` of them is validation."""
    if not 0.0 < validation_fraction < 0.5:
        raise ValueError(f"validation_fraction must be in (0, 0.5), got {validation_fraction}")
    docs = pydoc_documents() + stdlib_documents()
    random.Random(seed).shuffle(docs)
    n_val = max(1, round(len(docs) * validation_fraction))
    train, val = docs[:-n_val], docs[-n_val:]
    return Corpus([t for _, t in train], [t for _, t in val], [s for s, _ in train], [s for s, _ in val])
