"""Session containers: the slot record and what coi keeps on the container.

The slot record (kind `slot`, docs/protocol.md) is what `coi-slot next`
prints and `coi-shell` reads. Everything coi needs to know about a
container later is kept on the container itself as `user.coi.*` config
keys, so `coi list` needs one request and no local state.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Final

from coi_common import naming
from coi_common.errors import BadInput
from coi_common.incus import Incus
from coi_common.protocol import make_record, validate

KEY: Final = "user.coi."
WORKSPACE_PATH: Final = "/workspace"
STORAGE_PATH: Final = "/storage"
TMUX_SESSION: Final = "coi"
RESUME_LATEST: Final = "latest"
NO_LIMITS: Final = {"cpu": "", "memory": "", "processes": 0}


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
        return cls.checked(parts[0], parts[1], len(parts) == 3, spec=text)

    @classmethod
    def checked(cls, source: str, path: str, readonly: bool, *, spec: str) -> Mount:
        """SRC an existing directory (resolved), DST absolute without '..'."""
        real = naming.canonical_workspace(os.path.expanduser(source))
        if not path.startswith("/") or ".." in path.split("/"):
            raise BadInput(f"--mount {spec!r}: DST must be an absolute path without '..'")
        return cls(real, path.rstrip("/") or "/", readonly)


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
    limits: Mapping[str, Any] = field(default_factory=lambda: dict(NO_LIMITS))
    """cpu (string, "" all), memory (string, "" none), processes (0 none): naming.limits."""
    mask: bool = True
    """The workspace's secret files appear empty inside (--no-mask: false)."""
    allow_home: bool = False
    force: bool = False
    """The host-path policy flags the mounts were checked with (--allow-home, --force)."""
    resume: str = ""
    """"" starts the tool fresh, "latest" restores the newest saved session of the
    workspace and tool, anything else is the id of the session to restore."""
    config_profile: str = ""
    """The [profiles.NAME] of the config the session was asked with (--profile)."""
    pool: str = ""
    """A warm pool's container to make (`coi-slot next --pool`): the session shape it
    serves (pool_shape), written on it as user.coi.pool; "" for a session."""
    pooled: bool = False
    """The container is a warm pool's, claimed for this session: up and ready already."""

    def to_record(self) -> dict[str, Any]:
        data = asdict(self)
        data["mounts"] = [asdict(m) for m in self.mounts]
        data["environment"] = dict(self.environment)
        data["limits"] = dict(self.limits)
        return make_record("slot", **data)

    def host_sources(self, home: str) -> dict[str, str]:
        """Every host path it mounts, checked (host_sources) with its own flags."""
        return host_sources(self.workspace, self.storage, self.mounts, home,
                            allow_home=self.allow_home, force=self.force)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SlotRecord:
        """A validated record from stdin; every field is checked, nothing trusted: each
        has its JSON type, names pass their validators, mounts and environment are
        what --mount and --env would take. A refusal names the field."""
        data = validate(dict(record), "slot")
        slot = _checked("slot", naming.validate_slot, data["slot"], naming.SLOT_CEILING)
        workspace = _checked("workspace", naming.canonical_workspace,
                             _record_field(data, "workspace", str))
        container = _checked("container", naming.validate_container_name, data["container"])
        if container != naming.container_name(workspace, slot):
            raise BadInput(f"slot record: container {container!r} is not slot {slot} of "
                           f"{workspace} (expected {naming.container_name(workspace, slot)})")
        network = _record_field(data, "network", str, "restricted")
        if network not in naming.NETWORK_MODES:
            raise BadInput(f"slot record: network {network!r} is not one of "
                           f"{', '.join(naming.NETWORK_MODES)}")
        storage = _record_field(data, "storage", str, "")
        if storage and not os.path.isabs(storage):
            raise BadInput(f"slot record: storage {storage!r} is not an absolute path")
        resume = _record_field(data, "resume", str, "")
        if resume not in ("", RESUME_LATEST):
            _checked("resume", naming.validate_session_id, resume)
        profile = _record_field(data, "config_profile", str, "")
        if profile:
            _checked("config_profile", naming.validate_profile_name, profile)
        pool = _record_field(data, "pool", str, "")
        if pool and not is_pool_shape(pool):
            raise BadInput(f"slot record: pool {pool!r} is not a session shape "
                           "(16 hex digits)")
        return cls(workspace, slot, container, _record_field(data, "persistent", bool),
                   _checked("image", naming.validate_image_name, data["image"]),
                   _checked("profile", naming.validate_profile_name,
                            _record_field(data, "profile", str)),
                   _checked("tool", naming.validate_tool_name,
                            _record_field(data, "tool", str, "claude")),
                   network, _checked("environment", _record_environment, data),
                   tuple(_checked("mounts", _record_mount, m)
                         for m in _record_field(data, "mounts", list, [])),
                   storage, _checked("limits", _record_limits,
                                     _record_field(data, "limits", dict, dict(NO_LIMITS))),
                   *(_record_field(data, key, bool, default) for key, default in
                     (("mask", True), ("allow_home", False), ("force", False))),
                   resume, profile, pool, _record_field(data, "pooled", bool, False))


def is_pool_shape(text: str) -> bool:
    """16 lower-case hex digits: a session shape's fingerprint, or a view's coverage."""
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def _checked(field_name: str, check: Callable[..., Any], *values: Any) -> Any:
    """check(*values), a refusal naming the record's field it came from."""
    try:
        return check(*values)
    except BadInput as exc:
        prefix = "slot record: "
        message = exc.message.removeprefix(prefix)
        raise BadInput(f"{prefix}{field_name}: {message}", hint=exc.hint) from None


def _record_environment(data: Mapping[str, Any]) -> dict[str, str]:
    environment = _record_field(data, "environment", dict, {})
    if not all(isinstance(value, str) for value in environment.values()):
        raise BadInput("values must be strings")
    parse_env([f"{key}={value}" for key, value in environment.items()])
    return environment


def _record_field(data: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """data[key] when it is a `kind` (bool is not an int here); missing: `default`, or
    refused when there is none."""
    value = data.get(key, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadInput(f"slot record: {key} must be a JSON {_JSON_NAMES[kind]}, "
                       f"got {type(value).__name__}")
    return value


_JSON_NAMES: Final = {str: "string", bool: "boolean", dict: "object", list: "array"}


def _record_limits(limits: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(limits) - set(NO_LIMITS))
    if unknown:
        raise BadInput(f"slot record: limits has unknown key {unknown[0]!r}")
    values = {key: _record_field(limits, key, type(default), default)
              for key, default in NO_LIMITS.items()}
    return naming.validate_limits(values["cpu"], values["memory"], values["processes"])


def _record_mount(item: object) -> Mount:
    """One mount of a slot record, checked as `--mount` is (host paths: when mounted)."""
    if not isinstance(item, dict):
        raise BadInput("slot record: each mount must be a JSON object")
    source, path = _record_field(item, "source", str), _record_field(item, "path", str)
    return Mount.checked(source, path, _record_field(item, "readonly", bool, False),
                         spec=f"{source}:{path}")


def host_sources(workspace: str, storage: str, mounts: Sequence[Mount], home: str, *,
                 allow_home: bool = False, force: bool = False) -> dict[str, str]:
    """Device name -> resolved host source of everything a session mounts, each checked
    against naming.check_host_mount for the user whose home is `home` (--allow-home,
    --force); no two targets (/workspace, /storage, each --mount) may be the same or
    nested. The one check of host paths: by coi-slot next before a slot is reserved,
    and by coi-shell for the devices of the container it creates."""
    naming.check_mount_targets([
        ("the workspace", WORKSPACE_PATH),
        *([("--storage", STORAGE_PATH)] if storage else []),
        *((f"--mount {m.source}", m.path) for m in mounts)])

    def source(path: str, what: str) -> str:
        return naming.check_host_mount(path, what, home, allow_home=allow_home, force=force)

    sources = {"workspace": source(workspace, "workspace")}
    if storage:
        sources["storage"] = source(storage, "--storage")
    for number, mount in enumerate(mounts):
        sources[f"mount{number}"] = source(mount.source, "--mount")
    return sources


def invoking_home() -> str:
    """The home directory of the user coi acts for (invoking_ids)."""
    import pwd  # noqa: PLC0415

    try:
        return pwd.getpwuid(invoking_ids()[0]).pw_dir
    except KeyError:
        return os.path.expanduser("~")


def invoking_ids() -> tuple[int, int]:
    """The user coi acts for: the one behind sudo when there is one."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0 and os.environ.get("SUDO_UID", "").isdigit():
        return int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", "0") or 0)
    return uid, gid


@dataclass(frozen=True)
class SessionContainer:
    """What coi keeps on a session container, as its `user.coi.*` keys (docs/protocol.md,
    "Instance keys (v1)"): written once at create (to_config), read back by every
    command that acts on the container (from_instance), each value checked."""

    workspace: str
    slot: int
    persistent: bool
    image: str
    tool: str
    network: str
    host_uid: int | None
    session_id: str = ""
    session_base: str = ""
    ended_run: str = ""
    pool: str = ""
    """An idle warm pool container's `SHAPE.COVERAGE` (pool_shape, views.coverage);
    "" for a session's."""
    origin: str = ""
    """On a remote: origin_id() of the host that made it (its workspace is that host's
    path); "" for a container of the local daemon."""

    CREATE_KEYS: ClassVar[tuple[str, ...]] = (
        "workspace", "slot", "persistent", "image", "tool", "network", "host_uid")
    LATER_KEYS: ClassVar[tuple[str, ...]] = ("session_id", "session_base", "ended_run")

    @classmethod
    def from_instance(cls, instance: Mapping[str, Any]) -> SessionContainer | None:
        """The keys of an instance (Incus's JSON); None when it is not a coi session or
        a key does not parse (such a container is not treated as coi's)."""
        keys = instance.get("config") or {}
        get = lambda key: keys.get(f"{KEY}{key}")  # noqa: E731
        workspace, slot, uid = get("workspace"), get("slot"), get("host_uid")
        if not (isinstance(workspace, str) and workspace.startswith("/")
                and _digits(slot) and 1 <= int(slot) <= naming.SLOT_CEILING
                and get("persistent") in ("true", "false")
                and (uid is None or _digits(uid))):
            return None
        values = {key: str(get(key) or "") for key in ("image", "tool", "session_id",
                                                      "session_base", "ended_run", "pool",
                                                      "origin")}
        network = str(get("network") or "restricted")
        if network not in naming.NETWORK_MODES or not ORIGIN.fullmatch(values["origin"]):
            return None
        return cls(workspace, int(slot), get("persistent") == "true", values["image"],
                   values["tool"] or "claude", network, int(uid) if uid is not None else None,
                   values["session_id"], values["session_base"], values["ended_run"],
                   values["pool"], values["origin"])

    @property
    def idle_in_pool(self) -> bool:
        """Waiting in a warm pool: made for sessions, used by none yet."""
        return bool(self.pool)

    def to_config(self) -> dict[str, str]:
        """The keys written at create (the later ones are set by restore, save, end)."""
        values = {"workspace": self.workspace, "slot": str(self.slot),
                  "persistent": str(self.persistent).lower(), "image": self.image,
                  "tool": self.tool, "network": self.network,
                  "host_uid": "" if self.host_uid is None else str(self.host_uid),
                  "pool": self.pool, "origin": self.origin}
        return {f"{KEY}{key}": value for key, value in values.items() if value}


ORIGIN: Final = re.compile(r"(?:[0-9a-f]{16})?")


def origin_id() -> str:
    """This host on a remote: 16 hex digits of sha256 over its machine-id (the id
    itself is not told to the server), or of its host name when it has none."""
    import hashlib  # noqa: PLC0415
    import socket  # noqa: PLC0415

    try:
        with open("/etc/machine-id", "rb") as handle:
            seed = handle.read(64).strip()
    except OSError:
        seed = b""
    seed = seed or socket.gethostname().encode()
    return hashlib.sha256(b"coi-origin\0" + seed).hexdigest()[:16]


def _digits(value: object) -> bool:
    return isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 12


def coi_containers(client: Incus, prefix: str, *, with_state: bool = False
                   ) -> list[dict[str, Any]]:
    """coi's session containers under `prefix` (their keys parse), in one request
    (with_state: and the state of each running one, for `coi list`)."""
    return [i for i in client.instances(prefix, with_state=with_state)
            if naming.parse_container_name(i["name"], prefix) is not None
            and SessionContainer.from_instance(i) is not None]


def is_persistent(instance: Mapping[str, Any]) -> bool:
    return (instance.get("config") or {}).get(f"{KEY}persistent") == "true"


def is_idle_in_pool(instance: Mapping[str, Any]) -> bool:
    """Waiting in a warm pool (user.coi.pool set): no session ran in it."""
    return bool((instance.get("config") or {}).get(f"{KEY}pool"))


# -- the view and the rules of an ended session -------------------------------------------


def has_view(instance: Mapping[str, Any]) -> bool:
    """Whether a container's /workspace comes from a view (made since views exist)."""
    from coi_common import views  # noqa: PLC0415

    device = (instance.get("devices") or {}).get("workspace") or {}
    return views.is_view_source(device.get("source"))


def release_view(name: str, *, forget: bool = False) -> None:
    """Detach a container's view from the host (`forget`: its directory goes too): root
    runs `coi-host view release`, a member asks coi's host service."""
    if os.geteuid() == 0:
        from coi_common import plumbing  # noqa: PLC0415

        plumbing.call("coi-host", ["view", "release", naming.validate_container_name(name),
                                   *(["--forget"] if forget else [])], kind="view_released")
    else:
        from coi_common import hostservice  # noqa: PLC0415

        hostservice.call("view_release", timeout=30, container=name, forget=forget)


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """`--env KEY=VALUE` flags (naming.env_pair); a malformed one is a one-line error."""
    return dict(naming.env_pair(pair) for pair in pairs)
