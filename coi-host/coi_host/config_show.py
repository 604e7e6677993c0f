"""`coi config show`: the effective configuration with the source of each value."""

from __future__ import annotations

from coi_common import config
from coi_common.protocol import write_record


def show_config(workspace: str, profile: str | None, *, as_json: bool) -> int:
    """Print every key, its value and the layer that set it."""
    effective = config.load(workspace, profile=profile)
    if as_json:
        write_record(config.render_json(effective))
    else:
        print(config.render_text(effective))
    return 0
