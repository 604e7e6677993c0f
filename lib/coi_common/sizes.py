"""Byte sizes as coi's config writes them (`2GiB`, `512MiB`, `0` for no limit) and shows them."""

from __future__ import annotations

import re
from typing import Any, Final

from coi_common.errors import ConfigError

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


def config_size(settings: Any, key: str) -> int:
    """The size-valued config key `key` in bytes (0: no limit); ConfigError naming the key
    and where its value came from."""
    text = settings.get(key)
    try:
        return parse_size(text if isinstance(text, str) else "")
    except ValueError:
        raise ConfigError(f"{key} = {text!r} (from {settings.source(key)}) is not a size",
                          hint='write 0 for no limit or a size such as "512MiB" or "2GiB"'
                          ) from None


def human(count: int) -> str:
    """`118 B`, `4.0 KiB`, `3.0 GiB`: a byte count for a person."""
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
