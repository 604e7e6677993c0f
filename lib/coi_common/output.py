"""Rendering at the edge: output format flags, plain-text tables, colour, and how much
a command says (-q/-v, which every command takes: coi_common.entry turns them into
QUIET_VARIABLE/VERBOSE_VARIABLE, so the programs a command runs say as much as it)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import IO, Any, Final

from coi_common.errors import UsageError

QUIET_VARIABLE: Final = "COI_QUIET"
VERBOSE_VARIABLE: Final = "COI_VERBOSE"
STYLES: Final = {"ok": "32", "fail": "1;31", "warn": "33", "dim": "2"}
"""SGR codes: green, bold red, yellow, faint."""


def quiet() -> bool:
    """-q: only results and errors (no progress, no notes)."""
    return os.environ.get(QUIET_VARIABLE) == "1"


def verbose() -> bool:
    """-v: every step and every wait is said, however short."""
    return os.environ.get(VERBOSE_VARIABLE) == "1"


def coloured(text: str, style: str, stream: IO[str]) -> str:
    """`text` in `style` when `stream` is a terminal and NO_COLOR is not set (any
    value but empty, no-color.org) and TERM is not dumb; else `text` as it is."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb" or \
            not stream.isatty():
        return text
    return f"\x1b[{STYLES[style]}m{text}\x1b[0m"


def wants_json(args: Mapping[str, Any], formats: Sequence[str] = ("text", "json")) -> bool:
    """Check `--format` against the formats a command offers; True for json."""
    chosen = args.get("--format")
    if chosen is None:  # not given; an empty value given is refused like any other
        chosen = formats[0]
    if chosen not in formats:
        raise UsageError(f"unknown format {chosen!r}; use {' or '.join(formats)}")
    return chosen == "json"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last one is not padded."""
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)
