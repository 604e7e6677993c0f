"""The container a session runs in, as coi-shell makes it: its config (the id map, the
seccomp policy, limits, coi's own keys), its devices (the workspace through its view,
storage, mounts, the NIC), the view of the workspace and the network rules put in
before the first start, and the exact environment every exec in it gets.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coi_common import plan, plumbing, seccomp
from coi_common.errors import CoiError, PermissionDenied
from coi_common.incus import ExecSpec
from coi_common.sessions import (
    STORAGE_PATH,
    WORKSPACE_PATH,
    SessionContainer,
    SlotRecord,
    invoking_ids,
    release_view,
)
from coi_common.tools import HOME, TOOL_UID


def limits_config(limits: Mapping[str, Any]) -> dict[str, str]:
    """Incus limits.* keys of a session container from a record's limits (checked by
    naming.validate_limits); "" / 0 = none."""
    config = {"limits.cpu": limits["cpu"], "limits.memory": limits["memory"],
              "limits.processes": str(limits["processes"] or "")}
    return {key: value for key, value in config.items() if value}


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


def container_config(record: SlotRecord, idmap: IdMap | None, *, owner: int,
                     allow_setuid: bool = False, coverage: str = "",
                     origin: str = "") -> dict[str, str]:
    """Instance config: Docker nesting, the idmap (none on a remote: nothing of this
    host is mounted there), no setuid files (seccomp), the session's env, coi's own
    keys. `owner` is the uid coi acts for (host_uid); a warm pool's container gets
    user.coi.pool, its shape and its view's `coverage`; one on a remote its `origin`."""
    config = {**seccomp.container_config(allow_setuid),
              **(idmap.config() if idmap is not None else {})}
    config.update({f"environment.{k}": v for k, v in record.environment.items()})
    config.update(SessionContainer(record.workspace, record.slot, record.persistent,
                                   record.image, record.tool, record.network, owner,
                                   pool=f"{record.pool}.{coverage}" if record.pool else "",
                                   origin=origin).to_config())
    return config


def container_devices(record: SlotRecord, home: str) -> dict[str, dict[str, str]]:
    """The workspace at /workspace, the storage dir and extra mounts (never shifted:
    see IdMap), from the record's host_sources."""
    sources = record.host_sources(home)
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
        if plan.step("write", ("/etc/subuid", "/etc/subgid"), uid=idmap.host_uid,
                     gid=idmap.host_gid):
            return
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
    if not subids.delegated(idmap.host_uid, idmap.host_gid) and not plan.active():
        raise PermissionDenied(f"coi's host service did not allow uid {idmap.host_uid}",
                               hint=fix)


# -- the workspace view (views.py: as root, or by coi's host service) ---------------------


@dataclass(frozen=True)
class Viewed:
    """A session's workspace view (views.View; None when there is none) and, for a warm
    pool's container, what it covers (views.coverage, taken before it was built: a file
    made meanwhile only makes the container unclaimable, never unmasked)."""

    view: Any
    coverage: str = ""


@contextlib.contextmanager
def workspace_view(record: SlotRecord, settings: Any, idmap: IdMap, *, wanted: bool = True
                   ) -> Iterator[Viewed]:
    """Within: the view of the record's workspace for its container (none when not
    `wanted`, or security.protect is off and nothing is masked); after: detached from
    the host. Missing protected paths are made first, as the user (placeholders)."""
    from coi_common import views  # noqa: PLC0415
    from coi_shell import placeholders  # noqa: PLC0415

    protect, patterns = views.rules(settings, record.mask)
    if not wanted:
        yield Viewed(None)
        return
    views.check_rules(protect, patterns)
    owner = (idmap.host_uid, idmap.host_gid) if os.geteuid() == 0 else None
    targets = placeholders.placeholders(record.workspace, protect, owner) if protect else []
    coverage = views.coverage(record.workspace, protect, patterns) if record.pool else ""
    if not targets and not [p for p in patterns if not p.startswith("!")]:
        yield Viewed(None, coverage)
        return
    view = _build_view(record.container, record.workspace, targets, patterns,
                       {"allow_home": record.allow_home, "force": record.force})
    try:
        yield Viewed(view, coverage)
    finally:
        release_view(record.container)


def _build_view(name: str, workspace: str, protect: list[str], patterns: list[str],
                mount_flags: dict[str, bool]) -> Any:
    from coi_common import hostservice, views  # noqa: PLC0415

    # What a --dry-run assumes the build answers: the view, nothing masked yet.
    assumed = {"kind": "view", "source": os.path.join(views.VIEW_ROOT, name),
               "protected": protect, "masked": 0, "notes": []}
    if os.geteuid() == 0:
        [record] = plumbing.call("coi-host", ["view", "build", name, workspace,
                                              *(f"--protect={p}" for p in protect),
                                              *(f"--mask={m}" for m in patterns)], kind="view",
                                 dry_run=[assumed])
        return views.View.from_record(record)
    reply = hostservice.call("view_build", timeout=120, assumed=assumed, container=name,
                             workspace=workspace, protect=protect, mask=patterns, **mount_flags)
    return views.View.from_record(reply)


# -- network rules (coi-net as root, or coi's host service) ------------------------------


def network_child(record: SlotRecord) -> plumbing.Child | None:
    """`coi-net apply`, started early (it waits for the record); None for open mode."""
    return None if record.network == "open" else \
        plumbing.Child("coi-net", ["apply"], kind="net_rules")


def apply_network(record: SlotRecord, applier: plumbing.Child | None) -> None:
    """Put the container's egress rules in place: `coi-net apply` (network_child) given
    the slot record (as root it writes them itself; for a member, coi's host service
    does), with the container created and not yet started: it gives the NIC coi's fixed
    host-side name, so the rules are there before the first packet. Its warnings (a
    name that did not resolve) reach the user on stderr."""
    if applier is not None:
        applier.finish(record.to_record())
