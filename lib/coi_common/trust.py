"""Which workspace config files the user has trusted (`coi trust`), by content.

A workspace's `.coi.toml` is written by whatever runs in its containers, so the
config loader lets it only tighten settings (config.narrow_untrusted) until the
user trusts it. Trust pins the file's sha256: any change to the file needs trust
again. The pins live in `<paths.state_dir>/trust.json`, written atomically by
`coi trust` (coi_host.config_show.pin).
"""

from __future__ import annotations

import json
import os
from typing import Final

TRUST_FILE: Final = "trust.json"
MAX_TRUST_BYTES: Final = 1 << 20


def digest(raw: bytes) -> str:
    import hashlib  # noqa: PLC0415 - only when there is a workspace file

    return hashlib.sha256(raw).hexdigest()


def pins(state_dir: str) -> dict[str, str]:
    """config file path -> pinned sha256; a missing or damaged store pins nothing."""
    try:
        with open(os.path.join(state_dir, TRUST_FILE), "rb") as handle:
            data = json.loads(handle.read(MAX_TRUST_BYTES))
    except (OSError, ValueError, RecursionError):
        return {}
    found = data.get("files") if isinstance(data, dict) else None
    if not isinstance(found, dict):
        return {}
    return {str(k): str(v) for k, v in found.items() if isinstance(v, str)}


def trusted(state_dir: str, path: str, sha256: str) -> bool:
    return pins(state_dir).get(path) == sha256
