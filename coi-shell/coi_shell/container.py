"""The container a session runs in, as coi-shell makes it: its config (the id map, the
seccomp policy, limits, coi's own keys), its devices (the workspace through its view,
storage, mounts, the NIC), the view of the workspace and the network rules put in
before the first start, and the exact environment every exec in it gets.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from coi_common import naming, proc
from coi_common.errors import BadInput, CoiError, PermissionDenied
from coi_common.incus import ExecSpec
from coi_common.sessions import (
    KEY,
    STORAGE_PATH,
    WORKSPACE_PATH,
    Mount,
    SlotRecord,
    coi_net_program,
    invoking_ids,
    release_view,
)
from coi_common.tools import HOME, TOOL_UID
from coi_shell import seccomp

# Docker must run inside every session container: nesting is enough (measured: dockerd
# builds and runs an image under coi's seccomp policy). No mknod interception: with it,
# incusd would make real device nodes (null, zero, tty, ...) wherever the agent asks,
# /workspace on the host included.
NESTING: Final = {"security.nesting": "true"}


CPU_PATTERN: Final = re.compile(r"[1-9][0-9]{0,3}")
MEMORY_PATTERN: Final = re.compile(r"[1-9][0-9]{0,6}(MiB|GiB|MB|GB)|([1-9][0-9]?|100)%")


def limits_config(cpu: str, memory: str, processes: int) -> dict[str, str]:
    """Incus limits.* keys of a session container; each value checked, "" / 0 = none."""
    config = {}
    if cpu:
        if not CPU_PATTERN.fullmatch(cpu):
            raise BadInput(f"--cpu {cpu!r}: expected a number of CPUs such as 2")
        config["limits.cpu"] = cpu
    if memory:
        if not MEMORY_PATTERN.fullmatch(memory):
            raise BadInput(f"--memory {memory!r}: expected a size such as 512MiB or 4GiB, "
                           "or a percentage such as 50%")
        config["limits.memory"] = memory
    if processes < 0:
        raise BadInput(f"--processes {processes}: expected 0 (no limit) or more")
    if processes:
        config["limits.processes"] = str(processes)
    return config


@dataclass(frozen=True)
class IdMap:
    """How /workspace files keep their host owner: raw.idmap maps the container's
    `code` (uid/gid 1000) to one host user's uid/gid, and nothing else.

    Container root stays in Incus's unprivileged range (host uid 1000000 and up), so
    nothing created in a host-backed mount belongs to host root. Idmapped mounts
    (`shift=true`) are not used for that reason: they map container uid 0 to host
    uid 0, and a setuid-root shell planted from inside ran as root on the host.
    `code` is never host root either (session_idmap): when root runs coi, code
    acts as the workspace's owner.
    """

    host_uid: int
    host_gid: int

    def config(self) -> dict[str, str]:
        return {"raw.idmap": f"uid {self.host_uid} {TOOL_UID}\ngid {self.host_gid} {TOOL_UID}"}


def session_idmap(workspace: str) -> IdMap:
    """The host user `code` is mapped to: the invoking user; for root, the workspace's
    owner (with that user's group), since code must never be host root. A workspace
    owned by root is refused: files only root may write cannot be the agent's."""
    import pwd  # noqa: PLC0415

    uid, gid = invoking_ids()
    if uid != 0:
        return IdMap(uid, gid)
    owner = os.stat(workspace)
    try:
        gid = pwd.getpwuid(owner.st_uid).pw_gid
    except KeyError:
        gid = owner.st_gid
    if owner.st_uid == 0 or gid == 0:
        raise PermissionDenied(f"the workspace {workspace} belongs to root, and coi never "
                               "maps the agent to host root",
                               hint="run coi as the user who owns the workspace, or "
                                    "chown it to a normal user")
    return IdMap(owner.st_uid, gid)


def container_config(record: SlotRecord, idmap: IdMap, *, owner: int,
                     allow_setuid: bool = False) -> dict[str, str]:
    """Instance config: Docker nesting, the idmap, no setuid files (seccomp), the
    session's env, coi's own keys. `owner` is the uid coi acts for (host_uid)."""
    config = {**NESTING, **idmap.config(), **seccomp.container_config(allow_setuid)}
    config.update({f"environment.{k}": v for k, v in record.environment.items()})
    config.update({f"{KEY}workspace": record.workspace, f"{KEY}slot": str(record.slot),
                   f"{KEY}persistent": str(record.persistent).lower(),
                   f"{KEY}image": record.image, f"{KEY}tool": record.tool,
                   f"{KEY}network": record.network, f"{KEY}host_uid": str(owner)})
    return config


def host_sources(workspace: str, storage: str, mounts: Sequence[Mount], home: str, *,
                 allow_home: bool = False, force: bool = False) -> dict[str, str]:
    """Device name -> resolved host source of everything a session mounts, each checked
    against naming.check_host_mount for the user whose home is `home` (--allow-home,
    --force); no two targets (/workspace, /storage, each --mount) may be the same or
    nested. The one check of host paths: before a slot is reserved, and again for a
    record that came on stdin."""
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


def container_devices(record: SlotRecord, home: str, *, allow_home: bool = False,
                      force: bool = False) -> dict[str, dict[str, str]]:
    """The workspace at /workspace, the storage dir and extra mounts (never shifted:
    see IdMap), from host_sources."""
    sources = host_sources(record.workspace, record.storage, record.mounts, home,
                           allow_home=allow_home, force=force)
    devices = {"workspace": {"type": "disk", "path": WORKSPACE_PATH,
                             "source": sources["workspace"]}}
    if record.storage:
        devices["storage"] = {"type": "disk", "source": sources["storage"],
                              "path": STORAGE_PATH}
    for number, mount in enumerate(record.mounts):
        device = {"type": "disk", "source": sources[f"mount{number}"], "path": mount.path}
        if mount.readonly:
            device["readonly"] = "true"
        devices[f"mount{number}"] = device
    return devices


def through_view(devices: Mapping[str, dict[str, str]], view: Any
                 ) -> dict[str, dict[str, str]]:
    """`devices` with /workspace coming from the view (views.py) when there is one;
    recursive, so the view's read-only and masking mounts come along."""
    if view is None:
        return dict(devices)
    return {**devices, "workspace": {**devices["workspace"], "source": view.source,
                                     "recursive": "true"}}


def session_env(term: str | None = None) -> dict[str, str]:
    """The only environment a session gets from the host: TERM and LANG."""
    env = {"HOME": HOME, "USER": "code", "LANG": os.environ.get("LANG", "C.UTF-8")}
    if term:
        env["TERM"] = term
    return env


def as_code(name: str, command: Sequence[str], *, tty: bool, env: Mapping[str, str],
            cwd: str = WORKSPACE_PATH) -> ExecSpec:
    """A command run as user code in /workspace with exactly `env`."""
    return ExecSpec(name, tuple(command), user=TOOL_UID, cwd=cwd, env=dict(env), tty=tty)


# -- id maps ----------------------------------------------------------------------------------


def ensure_idmap(idmap: IdMap) -> None:
    """Before anything is created: make sure Incus may map the user's ids (raw.idmap),
    asking coi's host service to delegate them when this user is not root."""
    from coi_common import idmap as subids  # noqa: PLC0415

    if subids.delegated(idmap.host_uid, idmap.host_gid):
        return
    fix = (f"as root, run 'coi setup' (it lets Incus map the ids of every incus-admin "
           f"member), or add 'root:{idmap.host_uid}:1' to /etc/subuid and "
           f"'root:{idmap.host_gid}:1' to /etc/subgid")
    if os.geteuid() == 0:  # root delegates the workspace owner's ids itself, as setup does
        added = subids.add_lines(subids.missing_lines([idmap.host_uid], [idmap.host_gid]))
        print(f"coi: let Incus map uid {idmap.host_uid}/gid {idmap.host_gid} "
              f"({', '.join(added)})", file=sys.stderr)
        return
    from coi_common import hostservice  # noqa: PLC0415

    try:
        hostservice.call("idmap_grant", timeout=30)
    except CoiError as exc:
        raise PermissionDenied(f"Incus may not map your uid {idmap.host_uid} into "
                               f"containers, and coi's host service could not allow it: "
                               f"{exc.one_line()}", hint=fix) from None
    if not subids.delegated(idmap.host_uid, idmap.host_gid):
        raise PermissionDenied(f"coi's host service did not allow uid {idmap.host_uid}",
                               hint=fix)


# -- the workspace view (views.py: as root, or by coi's host service) ---------------------


@contextlib.contextmanager
def workspace_view(record: SlotRecord, settings: Any, idmap: IdMap, *, mask: bool = True,
                   wanted: bool = True, mount_flags: Mapping[str, bool] | None = None
                   ) -> Iterator[Any]:
    """Within: the view of the record's workspace for its container (None when not
    `wanted`, or security.protect is off and nothing is masked); after: detached from
    the host. Missing protected paths are made first, as the user (placeholders)."""
    from coi_common import views  # noqa: PLC0415

    protect = list(settings.get("security.protected_paths")) \
        if settings.get("security.protect") else []
    patterns = list(settings.get("security.mask")) if mask else []
    if not wanted or (not protect and not [p for p in patterns if not p.startswith("!")]):
        yield None
        return
    views.check_rules(protect, patterns)
    owner = (idmap.host_uid, idmap.host_gid) if os.geteuid() == 0 else None
    targets = views.placeholders(record.workspace, protect, owner)
    view = _build_view(record.container, record.workspace, targets, patterns,
                       dict(mount_flags or {}))
    try:
        yield view
    finally:
        release_view(record.container)


def _build_view(name: str, workspace: str, protect: list[str], patterns: list[str],
                mount_flags: dict[str, bool]) -> Any:
    from coi_common import hostservice, views  # noqa: PLC0415

    if os.geteuid() == 0:
        return views.build(name, workspace, protect, patterns)
    reply = hostservice.call("view_build", timeout=120, container=name, workspace=workspace,
                             protect=protect, mask=patterns, **mount_flags)
    return views.View.from_record(reply)


# -- network rules (coi-net as root, or coi's host service) ------------------------------


def network_devices(record: SlotRecord, settings: Any) -> dict[str, dict[str, str]]:
    """The NIC with coi's fixed host-side name, so rules can exist before the first start."""
    if record.network == "open":
        return {}
    from coi_common import netpolicy  # noqa: PLC0415 - ~20 ms, only for filtered sessions

    return netpolicy.net_device_override(record.container, network=settings.get("incus.network"),
                                         mode=record.network,
                                         project=settings.get("incus.project"))


def network_request(record: SlotRecord, settings: Any) -> dict[str, Any]:
    """The validated fields of a rules request (coi-net apply's flags, host service's
    net_apply): checked here, before the container exists."""
    from coi_common import netpolicy  # noqa: PLC0415

    return {"container": naming.validate_container_name(record.container),
            "mode": netpolicy.validate_mode(record.network),
            "allow": [str(a) for a in settings.get("network.allowed_domains")],
            "resolvers": [str(r) for r in settings.get("network.resolvers")],
            "refresh_minutes": netpolicy.validate_refresh_minutes(
                settings.get("network.refresh_interval_minutes"))}


def apply_network(record: SlotRecord, settings: Any) -> None:
    """Put the container's egress rules in place: coi-net itself when we are root, coi's
    host service otherwise (never sudo on a program next to us)."""
    if record.network == "open":
        return
    request = network_request(record, settings)
    if os.geteuid() != 0:
        from coi_common import hostservice  # noqa: PLC0415

        hostservice.call("net_apply", **request)
        return
    from coi_common import netpolicy  # noqa: PLC0415

    argv = netpolicy.apply_argv(request["container"], request["mode"],
                                allowed=request["allow"], resolvers=request["resolvers"],
                                refresh_minutes=request["refresh_minutes"],
                                program=coi_net_program())
    done = proc.run(argv, check=False, timeout=120)
    if not done.ok:
        raise CoiError(f"network rules for {record.container} could not be applied: "
                       f"{proc.last_line(done.stderr) or 'exit ' + str(done.returncode)}")
