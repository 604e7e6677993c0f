"""Byte sizes as coi's config writes them (`2GiB`, `512MiB`, `0` for no limit)."""

from __future__ import annotations

import re
from typing import Final

UNITS: Final = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
                "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
"""The suffixes Incus accepts for limits.memory (which coi passes on as written), and KiB/TiB."""
SIZE: Final = re.compile(r"(?P<count>[1-9][0-9]{0,6})(?P<unit>" + "|".join(UNITS) + ")")
"""A non-zero size: a number and a unit (a bare number would be bytes, a surprise in a config)."""


def parse_size(text: str) -> int:
    """Bytes of `0` or a SIZE such as 2GiB; ValueError for anything else."""
    if text == "0":
        return 0
    match = SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size")
    return int(match["count"]) * UNITS[match["unit"]]
