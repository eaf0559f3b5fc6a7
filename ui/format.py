"""Human-readable numbers and tokens for metrics, captions, tables and axes (decimal units, as GPU datasheets use)."""

from __future__ import annotations

import math

# Byte-level BPE (GPT-2, Llama 3, Qwen, the bundled model) writes each byte that is not a printable character as
# chr(256 + i), i counting those bytes in order: a space is "Ġ", a newline "Ċ", a tab "ĉ". SentencePiece writes a
# space as "▁".
_PRINTABLE = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
_HIDDEN_BYTES = [b for b in range(256) if b not in _PRINTABLE]
_SHOWN = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}
TOKEN_MARKS = str.maketrans({chr(256 + i): _SHOWN.get(chr(b), f"\\x{b:02x}") for i, b in enumerate(_HIDDEN_BYTES)}
                            | {"▁": "·"})


def bytes_str(n: float) -> str:
    """1234567 -> '1.23 MB'. Decimal (SI) units, matching datasheets and the calculator's GB column."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def count_str(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f}{unit}"
    return f"{n:,.0f}"


def token_text(piece: str) -> str:
    """A tokenizer's piece as a reader sees it: 'Ġis' -> '·is', 'Ċ' -> '↵' (a space shows as '·', a newline as '↵',
    a tab as '⇥'; other invisible bytes as '\\xNN'). Pieces of other tokenizers pass through unchanged."""
    return piece.translate(TOKEN_MARKS)


def signed_pct(value: float, digits: int = 0) -> str:
    """A change in percent with its sign, never '-0%': -12.3 -> '-12%', 0.2 -> '0%', 4 -> '+4%'."""
    text = f"{value:+.{digits}f}"
    if float(text) == 0 or math.isnan(value):
        return f"{0:.{digits}f}%" if not math.isnan(value) else "n/a"
    return f"{text}%"


def tick_text(value: float) -> str:
    """An axis tick: 200000 -> '200k', 1.5e9 -> '1.5G', 0.05 -> '0.05', 2e-5 -> '2e-5'."""
    if value == 0:
        return "0"
    size = abs(value)
    if size >= 1e15 or size < 1e-3:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if size >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"
