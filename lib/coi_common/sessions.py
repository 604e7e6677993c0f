"""Session containers: the slot record, how a container is set up, how a session ends.

The slot record (kind `slot`, docs/protocol.md) is what `coi-slot next`
prints and `coi-shell` reads. Everything coi needs to know about a
container later is kept on the container itself as `user.coi.*` config
keys, so `coi list` needs one request and no local state.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from coi_common import naming, proc
from coi_common.errors import BadInput, CoiError, NotFound
from coi_common.incus import Incus
from coi_common.protocol import make_record, validate
from coi_common.tools import HOME, TOOL_UID

KEY: Final = "user.coi."
WORKSPACE_PATH: Final = "/workspace"
STORAGE_PATH: Final = "/storage"
TMUX_SESSION: Final = "coi"
# Docker must run inside every session container.
NESTING: Final = {"security.nesting": "true",
                  "security.syscalls.intercept.mknod": "true",
                  "security.syscalls.intercept.setxattr": "true"}


@dataclass(frozen=True)
class Mount:
    """An extra host directory in the container (`--mount SRC:DST[:ro]`)."""

    source: str
    path: str
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> Mount:
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "ro"):
            raise BadInput(f"--mount {text!r}: expected SRC:DST or SRC:DST:ro")
        source = naming.canonical_workspace(os.path.expanduser(parts[0]))
        if not parts[1].startswith("/") or ".." in parts[1].split("/"):
            raise BadInput(f"--mount {text!r}: DST must be an absolute path without '..'")
        return cls(source, parts[1].rstrip("/") or "/", len(parts) == 3)


@dataclass(frozen=True)
class SlotRecord:
    """One workspace slot and the container that serves it."""

    workspace: str
    slot: int
    container: str
    persistent: bool
    image: str
    profile: str
    tool: str = "claude"
    network: str = "restricted"
    environment: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    storage: str = ""

    def to_record(self) -> dict[str, Any]:
        data = asdict(self)
        data["mounts"] = [asdict(m) for m in self.mounts]
        data["environment"] = dict(self.environment)
        return make_record("slot", **data)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SlotRecord:
        """A validated record from stdin; every field is checked, nothing trusted."""
        data = validate(dict(record), "slot")
        try:
            mounts = tuple(Mount(str(m["source"]), str(m["path"]), bool(m.get("readonly")))
                           for m in data.get("mounts") or [])
            environment = {str(k): str(v) for k, v in (data.get("environment") or {}).items()}
            slot = naming.validate_slot(data["slot"], naming.SLOT_CEILING)
        except (KeyError, TypeError, AttributeError) as exc:
            raise BadInput(f"slot record has a malformed field: {exc}") from None
        workspace = naming.canonical_workspace(str(data["workspace"]))
        container = naming.validate_container_name(data["container"])
        if container != naming.container_name(workspace, slot):
            raise BadInput(f"slot record: container {container!r} is not slot {slot} of "
                           f"{workspace} (expected {naming.container_name(workspace, slot)})")
        return cls(workspace, slot, container, bool(data["persistent"]),
                   naming.validate_image_name(data["image"]), str(data["profile"]),
                   str(data.get("tool") or "claude"), str(data.get("network") or "restricted"),
                   environment, mounts, str(data.get("storage") or ""))


@dataclass(frozen=True)
class IdMap:
    """How /workspace files keep their host owner: shift (idmapped mount) or raw.idmap."""

    host_uid: int
    host_gid: int
    shift: bool

    def config(self) -> dict[str, str]:
        if self.shift:
            return {}
        return {"raw.idmap": f"uid {self.host_uid} {TOOL_UID}\ngid {self.host_gid} {TOOL_UID}"}


def invoking_ids() -> tuple[int, int]:
    """The user coi acts for: the one behind sudo when there is one."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0 and os.environ.get("SUDO_UID", "").isdigit():
        return int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", "0") or 0)
    return uid, gid


def choose_idmap(host_uid: int, host_gid: int, idmapped_mounts: bool) -> IdMap:
    """shift=true only where it gives the right owner (host uid 1000 = container code)."""
    return IdMap(host_uid, host_gid,
                 shift=idmapped_mounts and host_uid == TOOL_UID and host_gid == TOOL_UID)


def container_config(record: SlotRecord, idmap: IdMap) -> dict[str, str]:
    """Instance config: Docker nesting, the idmap, the session's env, coi's own keys."""
    config = {**NESTING, **idmap.config()}
    config.update({f"environment.{k}": v for k, v in record.environment.items()})
    config.update({f"{KEY}workspace": record.workspace, f"{KEY}slot": str(record.slot),
                   f"{KEY}persistent": str(record.persistent).lower(),
                   f"{KEY}image": record.image, f"{KEY}tool": record.tool,
                   f"{KEY}network": record.network, f"{KEY}host_uid": str(idmap.host_uid)})
    return config


def container_devices(record: SlotRecord, idmap: IdMap) -> dict[str, dict[str, str]]:
    """The workspace at /workspace, the storage dir and extra mounts."""
    shift = {"shift": "true"} if idmap.shift else {}
    devices = {"workspace": {"type": "disk", "source": record.workspace,
                             "path": WORKSPACE_PATH, **shift}}
    if record.storage:
        devices["storage"] = {"type": "disk", "source": record.storage, "path": STORAGE_PATH,
                              **shift}
    for number, mount in enumerate(record.mounts):
        device = {"type": "disk", "source": mount.source, "path": mount.path, **shift}
        if mount.readonly:
            device["readonly"] = "true"
        devices[f"mount{number}"] = device
    return devices


def session_env(term: str | None = None) -> dict[str, str]:
    """The only environment a session gets from the host: TERM and LANG."""
    env = {"HOME": HOME, "USER": "code", "LANG": os.environ.get("LANG", "C.UTF-8")}
    if term:
        env["TERM"] = term
    return env


def exec_argv(client: Incus, name: str, command: Sequence[str], *, tty: bool,
              env: Mapping[str, str], cwd: str = WORKSPACE_PATH) -> list[str]:
    """`incus exec` as user code in /workspace with exactly `env`."""
    argv = ["incus", "--project", client.project, "exec", "--user", str(TOOL_UID),
            "--group", str(TOOL_UID), "--cwd", cwd, "-t" if tty else "-T"]
    argv += [f"--env={key}={value}" for key, value in env.items()]
    return [*argv, name, "--", *command]


def coi_containers(client: Incus, prefix: str) -> list[dict[str, Any]]:
    """coi's session containers under `prefix`, with state, in one request."""
    return [i for i in client.instances(prefix)
            if f"{KEY}workspace" in (i.get("config") or {})
            and naming.parse_container_name(i["name"], prefix) is not None]


def is_persistent(instance: Mapping[str, Any]) -> bool:
    return (instance.get("config") or {}).get(f"{KEY}persistent") == "true"


def save_session(client: Incus, name: str) -> None:
    """The session-save hook: every path by which coi stops or removes a session
    container comes through here first.

    Copies the tool's state out of the container (coi_common.saved_sessions;
    a stopped one is started briefly without a network), bounded by
    saved_sessions.SAVE_TIMEOUT. It never raises: this runs in cleanup paths,
    so a failure is one line on stderr and the caller goes on (deletes).
    """
    from coi_common import saved_sessions  # noqa: PLC0415 - tarfile & co. only when saving

    try:
        result = saved_sessions.save_container(client, name)
    except (Exception, KeyboardInterrupt) as exc:  # cleanup must go on, whatever failed
        if isinstance(exc, NotFound) and exc.message.startswith(f"container {name}"):
            return  # gone already: nothing left to save
        reason = exc.one_line() if isinstance(exc, CoiError) else f"{type(exc).__name__}: {exc}"
        print(f"coi: could not save the session of {name}: {reason}", file=sys.stderr,
              flush=True)
        return
    if result.session is not None:
        print(f"coi: {result.line()}", file=sys.stderr, flush=True)


def end_session(client: Incus, name: str, *, delete: bool) -> None:
    """Save the session, then delete the container when asked (ephemeral mode),
    and with it its network rules."""
    save_session(client, name)
    if delete:
        try:
            mode = (client.instance_config(name).get("config") or {}).get(f"{KEY}network")
        except NotFound:
            return
        client.delete_instance_force(name)
        if mode and mode != "open":
            remove_network(name)


# -- network rules (coi-net, root) ---------------------------------------------------------


def network_devices(record: SlotRecord, settings: Any) -> dict[str, dict[str, str]]:
    """The NIC with coi's fixed host-side name, so rules can exist before the first start."""
    if record.network == "open":
        return {}
    from coi_common import netpolicy  # noqa: PLC0415 - ~20 ms, only for filtered sessions

    return netpolicy.net_device_override(record.container, network=settings.get("incus.network"),
                                         mode=record.network,
                                         project=settings.get("incus.project"))


def _coi_net() -> str:
    from coi_common.dispatch import find_executable  # noqa: PLC0415

    return find_executable("coi-net") or "coi-net"


def apply_network(record: SlotRecord, settings: Any) -> None:
    """Put the container's egress rules in place (through coi-net, as root via sudo -n)."""
    if record.network == "open":
        return
    from coi_common import netpolicy  # noqa: PLC0415

    argv = netpolicy.apply_argv(record.container, record.network,
                                allowed=settings.get("network.allowed_domains"),
                                resolvers=settings.get("network.resolvers"),
                                refresh_minutes=settings.get("network.refresh_interval_minutes"),
                                program=_coi_net())
    done = proc.run(argv, check=False, timeout=120)
    if not done.ok:
        raise CoiError(f"network rules for {record.container} could not be applied: "
                       f"{proc.last_line(done.stderr) or 'exit ' + str(done.returncode)}",
                       hint="network modes other than open need root: see docs/network.md "
                       "for the sudoers rule, or use --network open")


def remove_network(name: str) -> None:
    """Drop a deleted container's rules; a failure is reported, never raised."""
    from coi_common import netpolicy  # noqa: PLC0415

    done = proc.run(netpolicy.remove_argv(name, program=_coi_net()), check=False, timeout=60)
    if not done.ok:
        print(f"coi: could not remove the network rules of {name} "
              f"({proc.last_line(done.stderr)}); 'coi-net gc' will", file=sys.stderr)


def new_slot_record(client: Incus, settings: Any, workspace: str, *, slot: int | None = None,
                    mounts: Sequence[Mount] = (), storage: str = "") -> SlotRecord:
    """Allocate (or take `slot`) for the workspace and describe its container.

    `settings` is the effective config with command-line flags already applied
    (defaults.persistent, defaults.image, defaults.environment, tool.name, ...).
    """
    from coi_common import slots  # noqa: PLC0415

    prefix = naming.container_prefix()
    path = naming.canonical_workspace(workspace)
    max_slots = settings.get("defaults.max_slots")
    wanted = naming.validate_slot(slot, max_slots) if slot else None
    # Checked before reserving: a bad image name must not hold a slot for two minutes.
    image = naming.validate_image_name(settings.get("defaults.image"))
    existing = [i["name"] for i in client.instances(f"{prefix}{naming.workspace_hash(path)}-")]
    number = slots.reserve(settings.path("paths.state_dir"), path, prefix=prefix,
                           existing=existing, max_slots=max_slots, wanted=wanted)
    return SlotRecord(path, number, naming.container_name(path, number, prefix),
                      bool(settings.get("defaults.persistent")), image,
                      settings.get("incus.profile"), settings.get("tool.name"),
                      settings.get("network.mode"), dict(settings.get("defaults.environment")),
                      tuple(mounts), storage)


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """`--env KEY=VALUE` flags; a malformed one is a one-line error."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise BadInput(f"--env {pair!r}: expected KEY=VALUE with KEY made of letters, "
                           "digits and _")
        env[key] = value
    return env
