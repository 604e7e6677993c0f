"""`coi config show`: the effective configuration with the source of each value, and
`coi trust`: which workspace config files may widen it."""

from __future__ import annotations

import os
import re
from typing import Any, Final

from coi_common import config, naming, tools, trust
from coi_common.errors import NotFound
from coi_common.protocol import make_record, write_json_atomic, write_record

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def show_config(workspace: str, profile: str | None, *, as_json: bool) -> int:
    """Print every key, its value and the layer that set it."""
    effective = config.load(naming.canonical_workspace(workspace), profile=profile)
    # A broken [tools.NAME] table should surface here, not at the next session start.
    tools.get_tool(effective.get("tool.name"), tools.registry_from_config(effective))
    if as_json:
        write_record(render_json(effective))
    else:
        print(render_text(effective))
    return 0


def trust_workspace(workspace: str, *, show: bool, revoke: bool, as_json: bool) -> int:
    """`coi trust`: pin (or show, or revoke) the content of the workspace's .coi.toml."""
    path, sha256 = config.workspace_file(naming.canonical_workspace(workspace))
    state_dir = config.load(None).path("paths.state_dir")
    pinned = trust.pins(state_dir).get(path)
    if revoke:
        pin(state_dir, path, None)
        state = "revoked" if pinned else "was not trusted"
    elif show:
        state = ("no file" if sha256 is None else "trusted" if pinned == sha256
                 else "changed since trusted" if pinned else "not trusted")
    elif sha256 is None:
        raise NotFound(f"{path}: no such file; nothing to trust")
    else:
        pin(state_dir, path, sha256)
        state = "trusted"
    if as_json:
        write_record(make_record("trust_state", path=path, state=state, sha256=sha256))
    else:
        print(f"{path}: {state}")
    return 0


def _toml_value(value: Any) -> str:
    """A TOML-like spelling of a config value for `coi config show`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return config.quote(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = ", ".join(f"{k if _BARE_KEY.fullmatch(k) else config.quote(k)} = {_toml_value(v)}"
                          for k, v in value.items())
        return "{ " + pairs + " }" if pairs else "{}"
    return str(value)  # TOML dates and times print as their ISO text


def render_text(effective: config.Config) -> str:
    """One `key = value  # source` line per key, in items() order."""
    return "".join(f"{key} = {_toml_value(value)}  # {source}\n"
                   for key, value, source in effective.items())


def render_json(effective: config.Config) -> dict[str, Any]:
    """The `config` protocol record: each key's value and source, and the files read."""
    values = {key: {"value": value, "source": source} for key, value, source in effective.items()}
    return make_record("config", values=values, files=list(effective.files),
                       profile=effective.profile)


def pin(state_dir: str, path: str, sha256: str | None) -> None:
    """Trust `path` with this content (sha256), or revoke its trust (None)."""
    current = trust.pins(state_dir)
    if sha256 is None:
        current.pop(path, None)
    else:
        current[path] = sha256

    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    write_json_atomic(os.path.join(state_dir, trust.TRUST_FILE),
                               make_record("trust", files=current))
