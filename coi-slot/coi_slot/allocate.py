"""`coi-slot next`: check a session's flags, reserve a slot, print its slot record.

The record is plumbing: always JSON, one line, whatever --format says, so
`coi-slot next | coi-shell` cannot be broken by user config. It takes every
flag of `coi shell`/`coi run` (the porcelain runs it with them): config is
loaded once for the workspace with the flags as its command-line layer, and
everything that can be refused (tool, limits, session id, host paths) is,
before the slot is reserved.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from coi_common import config, incus, naming, plan, sessions, tools
from coi_common.entry import Args
from coi_common.errors import BadInput
from coi_common.protocol import write_record
from coi_slot import slots

FLAG_KEYS = {"--image": "defaults.image", "--tool": "tool.name", "--network": "network.mode",
             "--cpu": "limits.cpu", "--memory": "limits.memory",
             "--processes": "limits.processes"}
"""The flags that are config keys given on the command line."""


def run(args: Args) -> int:
    """Reserve the slot and print the record; exit status 0."""
    write_record(next_record(args).to_record())
    return 0


def next_record(args: Args) -> sessions.SlotRecord:
    """The slot record the flags ask for, its slot reserved."""
    settings = load_settings(args)
    tools.get_tool(settings.get("tool.name"), tools.registry_from_config(settings))
    limits = naming.validate_limits(settings.get("limits.cpu"), settings.get("limits.memory"),
                                    settings.get("limits.processes"))
    resume = _resume(args)
    wanted = naming.validate_slot(args["--slot"], settings.get("defaults.max_slots"),
                                  allow_auto=True) if args["--slot"] is not None else 0
    mounts = [sessions.Mount.parse(spec) for spec in args["--mount"]]
    storage = _storage_dir(args["--storage"]) if args["--storage"] is not None else ""
    flags = {"allow_home": bool(args["--allow-home"]), "force": bool(args["--force"])}
    # Every host path is refused before a slot is reserved or a directory is made.
    sessions.host_sources(args["--workspace"], storage, mounts, sessions.invoking_home(),
                          **flags)
    if storage and not os.path.isdir(storage) and not plan.step("mkdir", storage):
        os.makedirs(storage, exist_ok=True)
    record = slots.new_slot_record(incus.connect(settings), settings, args["--workspace"],
                                   slot=wanted or None, mounts=mounts, storage=storage)
    return dataclasses.replace(record, limits=limits, mask=not args["--no-mask"],
                               resume=resume, config_profile=args["--profile"] or "", **flags)


def load_settings(args: Args) -> Any:
    """The effective config of the workspace with the flags laid over it.

    --env is merged over defaults.environment (as the profile left it) name by
    name, rather than replacing the table, so it is applied in a second pass.
    """
    path = naming.canonical_workspace(args["--workspace"])
    if args["--image"] is not None:
        naming.validate_image_name(args["--image"])
    env = sessions.parse_env(args["--env"])
    cli: dict[str, Any] = {key: args[flag] for flag, key in FLAG_KEYS.items()
                           if args[flag] is not None}  # given empty: checked, not unset
    if args["--persistent"]:
        cli["defaults.persistent"] = True
    settings = config.load(path, profile=args["--profile"], cli=cli)
    if env:
        cli["defaults.environment"] = {**settings.get("defaults.environment"), **env}
        settings = config.load(path, profile=args["--profile"], cli=cli)
    return settings


def _resume(args: Args) -> str:
    if args["--session"] is not None:  # a malformed one (empty too) is refused first
        return naming.validate_session_id(args["--session"])
    return sessions.RESUME_LATEST if args["--resume"] else ""


def _storage_dir(path: str) -> str:
    if not path:
        raise BadInput("--storage needs a directory", hint="e.g. --storage ~/coi-storage")
    return os.path.realpath(os.path.expanduser(path))
