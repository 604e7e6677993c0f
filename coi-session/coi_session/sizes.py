"""The sizes coi-session checks and reports: size-valued config keys, and byte counts
for a person."""

from __future__ import annotations

from typing import Any

from coi_common.errors import ConfigError
from coi_common.sizes import parse_size


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
