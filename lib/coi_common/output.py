"""Rendering at the edge: output format flags and plain-text tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from coi_common.errors import UsageError


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
