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
from coi_common.errors import BadInput, CoiError
from coi_common.protocol import write_record
from coi_slot import pool, slots

FLAG_KEYS = {"--image": "defaults.image", "--tool": "tool.name", "--network": "network.mode",
             "--cpu": "limits.cpu", "--memory": "limits.memory",
             "--processes": "limits.processes"}
"""The flags that are config keys given on the command line."""


def run(args: Args) -> int:
    """Reserve the slot and print the record; exit status 0."""
    write_record(next_record(args).to_record())
    return 0


def next_record(args: Args) -> sessions.SlotRecord:
    """The slot record the flags ask for, its slot reserved (or a pooled container
    claimed)."""
    settings = load_settings(args)
    record = described_record(args, settings)
    wanted = naming.validate_slot(args["--slot"], settings.get("defaults.max_slots"),
                                  allow_auto=True) if args["--slot"] is not None else 0
    storage = record.storage
    if storage and not os.path.isdir(storage) and not plan.step("mkdir", storage):
        os.makedirs(storage, exist_ok=True)
    return in_a_slot(incus.connect(settings), settings, record, wanted or None,
                     for_pool=bool(args["--pool"]))


def described_record(args: Args, settings: Any) -> sessions.SlotRecord:
    """The session the flags describe, every one of them checked, before any slot is
    chosen (slot 0) or anything is made."""
    if settings.get("incus.remote"):
        _check_remote_session(args, settings)
    tools.get_tool(settings.get("tool.name"), tools.registry_from_config(settings))
    limits = naming.validate_limits(settings.get("limits.cpu"), settings.get("limits.memory"),
                                    settings.get("limits.processes"))
    resume = _resume(args)
    mounts = [sessions.Mount.parse(config.expand_path(spec)) for spec in
              settings.get("mounts.default")] + [sessions.Mount.parse(spec)
                                                for spec in args["--mount"]]
    storage = _storage_dir(args["--storage"]) if args["--storage"] is not None else ""
    flags = {"allow_home": bool(args["--allow-home"]), "force": bool(args["--force"])}
    # Every host path is refused before a slot is reserved or a directory is made.
    sessions.host_sources(args["--workspace"], storage, mounts, sessions.invoking_home(),
                          **flags)
    return dataclasses.replace(
        slots.described(settings, args["--workspace"], mounts=mounts, storage=storage),
        limits=limits, mask=not args["--no-mask"], resume=resume,
        config_profile=args["--profile"] or "", **flags)


def _check_remote_session(args: Args, settings: Any) -> None:
    """What a session on a remote cannot have, refused before anything is made: host
    folders (nothing of this host is mounted there), a warm pool, and egress rules
    coi cannot enforce where the container runs (fail closed: docs/remote.md). The
    server's own coi enforces restricted mode; allowlist needs this host's resolver."""
    remote = settings.get("incus.remote")
    if settings.get("network.mode") == "allowlist":
        raise CoiError(f"network mode allowlist cannot be enforced on remote {remote}: its "
                       "names are resolved and answered by coi on the host that runs the "
                       "container", hint="use --network restricted (enforced by the "
                       "server's coi) or open there, or run the session on this machine")
    if args["--mount"] or settings.get("mounts.default") or args["--storage"] is not None:
        raise CoiError(f"a session on remote {remote} cannot mount folders of this host",
                       hint="its workspace is copied there and synced back (coi sync)")
    if args["--pool"]:
        raise CoiError(f"warm pools are not kept on a remote ({remote})")


def in_a_slot(client: incus.Incus, settings: Any, record: sessions.SlotRecord,
              wanted: int | None, *, for_pool: bool = False) -> sessions.SlotRecord:
    """The described session in a slot: an idle pooled container of its shape claimed
    (pool.claim), else a slot reserved; `for_pool`: a slot for a new pooled container
    (the record carries its shape)."""
    instances = slots.workspace_instances(client, record.workspace)
    if for_pool:
        if record.persistent or record.resume:
            raise BadInput("--pool: a warm pool holds ephemeral containers with nothing "
                           "restored yet (no --persistent, --resume)")
        return slots.with_slot(settings, dataclasses.replace(
            record, pool=pool.pool_shape(record, settings)), instances, wanted=wanted)
    uid = sessions.invoking_ids()[0]
    claimed = pool.claim(client, settings, record, instances, uid, wanted=wanted)
    if claimed is not None:
        return claimed
    if wanted is not None and pool.idle_of(instances, record.workspace, uid,
                                           slot=wanted):
        raise CoiError(f"slot {wanted} of {record.workspace} holds a warm pool container "
                       "made for other settings", hint="leave out --slot, or empty the "
                       "pool first: coi pool drain")
    return slots.with_slot(settings, record, instances, wanted=wanted)


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
