"""`coi config show`: the effective configuration with the source of each value, and
`coi trust`: which workspace config files may widen it."""

from __future__ import annotations

from coi_common import config, naming, tools, trust
from coi_common.errors import NotFound
from coi_common.protocol import make_record, write_record


def show_config(workspace: str, profile: str | None, *, as_json: bool) -> int:
    """Print every key, its value and the layer that set it."""
    effective = config.load(naming.canonical_workspace(workspace), profile=profile)
    # A broken [tools.NAME] table should surface here, not at the next session start.
    tools.get_tool(effective.get("tool.name"), tools.registry_from_config(effective))
    if as_json:
        write_record(config.render_json(effective))
    else:
        print(config.render_text(effective))
    return 0


def trust_workspace(workspace: str, *, show: bool, revoke: bool, as_json: bool) -> int:
    """`coi trust`: pin (or show, or revoke) the content of the workspace's .coi.toml."""
    path, sha256 = config.workspace_file(naming.canonical_workspace(workspace))
    state_dir = config.load(None).path("paths.state_dir")
    pinned = trust.pins(state_dir).get(path)
    if revoke:
        trust.pin(state_dir, path, None)
        state = "revoked" if pinned else "was not trusted"
    elif show:
        state = ("no file" if sha256 is None else "trusted" if pinned == sha256
                 else "changed since trusted" if pinned else "not trusted")
    elif sha256 is None:
        raise NotFound(f"{path}: no such file; nothing to trust")
    else:
        trust.pin(state_dir, path, sha256)
        state = "trusted"
    if as_json:
        write_record(make_record("trust_state", path=path, state=state, sha256=sha256))
    else:
        print(f"{path}: {state}")
    return 0
