"""`coi-slot next`: reserve a slot of a workspace and print its slot record.

The record is plumbing: always JSON, one line, whatever --format says, so
`coi-slot next | coi-shell` cannot be broken by user config. Config is loaded
once for the workspace with the flags as its command-line layer; allocation
itself (lock, reservation, lowest free slot) is coi_common.slots'.
"""

from __future__ import annotations

from typing import Any

from coi_common import config, incus, naming, sessions
from coi_common.entry import Args
from coi_common.protocol import write_record


def run(args: Args) -> int:
    """Reserve the slot and print the record; exit status 0."""
    settings = load_settings(args["--workspace"], profile=args["--profile"],
                             persistent=args["--persistent"], image=args["--image"],
                             env_pairs=args["--env"])
    wanted = naming.validate_slot(args["--slot"], settings.get("defaults.max_slots"),
                                  allow_auto=True)
    record = sessions.new_slot_record(incus.connect(settings), settings, args["--workspace"],
                                      slot=wanted or None)
    write_record(record.to_record())
    return 0


def load_settings(workspace: str, *, profile: str | None, persistent: bool,
                  image: str | None, env_pairs: list[str]) -> Any:
    """The effective config of `workspace` with the flags laid over it.

    --env is merged over defaults.environment (as the profile left it) name by
    name, rather than replacing the table, so it is applied in a second pass.
    """
    path = naming.canonical_workspace(workspace)
    if image is not None:
        naming.validate_image_name(image)
    env = sessions.parse_env(env_pairs)
    cli: dict[str, Any] = {"defaults.persistent": True if persistent else None,
                           "defaults.image": image}
    settings = config.load(path, profile=profile, cli=cli)
    if env:
        cli["defaults.environment"] = {**settings.get("defaults.environment"), **env}
        settings = config.load(path, profile=profile, cli=cli)
    return settings
