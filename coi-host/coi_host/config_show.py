"""`coi config show`: the effective configuration with the source of each value."""

from __future__ import annotations

from coi_common import config, tools
from coi_common.protocol import write_record


def show_config(workspace: str, profile: str | None, *, as_json: bool) -> int:
    """Print every key, its value and the layer that set it."""
    effective = config.load(workspace, profile=profile)
    # A broken [tools.NAME] table should surface here, not at the next session start.
    tools.get_tool(effective.get("tool.name"), tools.registry_from_config(effective))
    if as_json:
        write_record(config.render_json(effective))
    else:
        print(config.render_text(effective))
    return 0
