"""Read a request trace from CSV: ``arrival_s, prompt_tokens, output_tokens[, prefix_id]``.

Every bad row is reported with its row number (1 = first data row, the header is line 1 of the file),
the column and what is allowed, so a user can fix the file. Rows may come in any order; they are sorted
by arrival time (stable) and numbered in that order.
"""

from __future__ import annotations

import csv
import io
import math
from os import PathLike

from kvcore.sched.request import Request
from kvcore.sched.workload import MAX_REQUESTS, Workload

REQUIRED = ("arrival_s", "prompt_tokens", "output_tokens")
OPTIONAL = ("prefix_id",)
MAX_TOKENS = 1_000_000


def parse_trace(text: str | bytes, prefix_tokens: int = 0, seed: int = 0, name: str = "trace") -> Workload:
    """A workload from CSV text (or bytes, UTF-8, as ``st.file_uploader`` gives).

    prefix_tokens: how many leading prompt tokens requests with the same prefix_id share.
    seed: seed of the synthetic token ids. Raises ValueError naming the row and column of the first problem.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"trace is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ValueError(f"trace CSV is missing column(s) {', '.join(missing)}; the header must name "
                         f"{', '.join(REQUIRED)} and optionally {', '.join(OPTIONAL)} (found: {', '.join(columns)})")
    reader.fieldnames = columns
    rows = []
    for number, row in enumerate(reader, start=1):
        if number > MAX_REQUESTS:
            raise ValueError(f"trace has more than {MAX_REQUESTS:,} rows; cut it down")
        if None in row:
            raise ValueError(f"row {number}: more values than the {len(columns)} columns of the header")
        rows.append(_parse_row(number, row))
    if not rows:
        raise ValueError("trace CSV has a header but no rows")
    rows.sort(key=lambda r: r[0])
    requests = tuple(Request(i, *r) for i, r in enumerate(rows))
    return Workload(requests, prefix_tokens, seed, name=name)


def read_trace(path: str | PathLike, prefix_tokens: int = 0, seed: int = 0) -> Workload:
    """``parse_trace`` of a file on disk."""
    with open(path, "rb") as f:
        return parse_trace(f.read(), prefix_tokens, seed, name=str(path))


def _parse_row(number: int, row: dict[str, str | None]) -> tuple[float, int, int, int | None]:
    arrival = _number(number, "arrival_s", row.get("arrival_s"))
    if not (math.isfinite(arrival) and arrival >= 0):
        raise ValueError(f"row {number}, column arrival_s: {row['arrival_s']!r} is not allowed; "
                         "use a finite number of seconds >= 0")
    prompt = _count(number, "prompt_tokens", row.get("prompt_tokens"), minimum=1)
    output = _count(number, "output_tokens", row.get("output_tokens"), minimum=1)
    raw_prefix = (row.get("prefix_id") or "").strip()
    prefix = _count(number, "prefix_id", raw_prefix, minimum=0) if raw_prefix else None
    return arrival, prompt, output, prefix


def _number(number: int, column: str, raw: str | None) -> float:
    text = (raw or "").strip()
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"row {number}, column {column}: {text!r} is not a number") from None


def _count(number: int, column: str, raw: str | None, minimum: int) -> int:
    text = (raw or "").strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value == int(value) and minimum <= value <= MAX_TOKENS):
        raise ValueError(f"row {number}, column {column}: {text!r} is not allowed; use a whole number "
                         f"in {minimum}..{MAX_TOKENS:,}")
    return int(value)
