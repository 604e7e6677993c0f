"""`coi doctor`: check that this machine can run coi and say how to fix what cannot.

Required checks decide the exit status; advisory ones (the `coi` image not
built yet, a pool that is not copy-on-write) are reported with their fix but
do not fail the run. The daemon being unreachable exits 4, a permission
problem 5, anything else failing 1.

The checks are for the user running doctor (the sudo caller under sudo):
whether their sessions' network rules can be applied (root: nft itself;
anyone else: coi's host service) and whether Incus may map their uid.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from coi_common import config, hostservice, idmap, incus, output, proc, sessions
from coi_common.errors import (
    EXIT_FAILED,
    EXIT_PERMISSION,
    EXIT_UNAVAILABLE,
    CoiError,
    IncusUnavailable,
    PermissionDenied,
)
from coi_common.protocol import Record, make_record, write_record
from coi_host import hostinfo

COW_DRIVERS = ("btrfs", "zfs", "lvm", "ceph")
START_SERVICE_FIX = "sudo coi setup (starts coi's host service)"
PING_SECONDS = 3


@dataclass(frozen=True)
class Check:
    """One finding: whether it holds, what was seen, and how to fix it if not."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


@dataclass(frozen=True)
class ServiceState:
    """What coi's host service answered to a ping, or why it did not and what fixes that."""

    result: Record | None
    problem: str = ""
    fix: str = ""


def run_doctor(*, as_json: bool) -> int:
    """Run every check, print them, and return the exit status they imply."""
    checks = list(gather_checks(config.load(None)))
    status = exit_status(checks)
    if as_json:
        write_record(make_record("doctor", ok=status == 0, checks=[asdict(c) for c in checks]))
    else:
        for check in checks:
            mark, style = ("ok  ", "ok") if check.ok else (
                ("FAIL", "fail") if check.required else ("warn", "warn"))
            print(f"{output.coloured(mark, style, sys.stdout)} {check.name}: {check.detail}")
            if not check.ok and check.fix:
                print(f"     fix: {check.fix}")
    if status:
        failed = [c.name for c in checks if c.required and not c.ok]
        print(f"coi doctor: {len(failed)} problem(s): {', '.join(failed)}", file=sys.stderr)
    return status


def exit_status(checks: list[Check]) -> int:
    """0 when all required checks hold; 4 daemon unavailable; 5 permission; else 1."""
    failed = {c.name for c in checks if c.required and not c.ok}
    if not failed:
        return 0
    if "daemon" in failed:
        return EXIT_UNAVAILABLE
    if "permission" in failed:
        return EXIT_PERMISSION
    return EXIT_FAILED


def gather_checks(settings: config.Config) -> Iterator[Check]:
    """Host tools first, then everything that needs the daemon."""
    if settings.get("incus.remote"):
        yield from remote_checks(settings)
        return
    yield _tool_check("incus", "the Incus client", "sudo coi setup")
    yield _tool_check("tmux", "sessions run in tmux", "apt-get install tmux")
    yield _tool_check("nft", "network isolation uses nftables", "apt-get install nftables")
    service = ping_host_service()
    yield _network_rules_check(service)
    yield _upkeep_check(service)
    yield _resolver_check(service)
    client = incus.connect(settings)
    try:
        server = client.server()
    except IncusUnavailable as exc:
        yield Check("daemon", False, exc.message, "sudo coi setup (starts incusd)")
        return
    except PermissionDenied as exc:
        yield Check("daemon", True, "incusd is running")
        yield Check("permission", False, exc.message, exc.hint or "")
        return
    version = server.get("environment", {}).get("server_version", "?")
    yield Check("daemon", True, f"incusd {version} answering on {client.socket}")
    yield Check("permission", True, f"trusted ({server.get('auth', 'unknown')})")
    yield from _incus_checks(client, settings, service)


def _tool_check(program: str, why: str, fix: str) -> Check:
    path = hostinfo.find_program(program)
    return Check(program, path is not None, path or f"not found ({why})", fix)


def ping_host_service() -> ServiceState:
    """Ask coi's host service whether it answers; never raises."""
    try:
        return ServiceState(hostservice.call("ping", timeout=PING_SECONDS))
    except PermissionDenied as exc:  # not in incus-admin: its hint says how to join
        return ServiceState(None, exc.message, exc.hint or START_SERVICE_FIX)
    except CoiError as exc:
        return ServiceState(None, exc.message, START_SERVICE_FIX)


def _network_rules_check(service: ServiceState) -> Check:
    """Root applies session rules with nft itself; everyone else through the host service."""
    if os.geteuid() == 0:
        return _nft_usable_check()
    if service.result is not None:
        version = service.result.get("version", "?")
        return Check("network rules", True, f"coi's host service {version} answers on "
                     f"{hostservice.socket_path()}")
    return Check("network rules", False, service.problem, service.fix)


def _nft_usable_check() -> Check:
    nft = hostinfo.find_program("nft")
    if nft is None:
        return Check("network rules", False, "nft not found", "apt-get install nftables")
    try:
        proc.run([nft, "list", "tables"], timeout=10)
    except CoiError as exc:
        return Check("network rules", False, exc.one_line(),
                     "run coi on the host itself, with nf_tables in its kernel")
    return Check("network rules", True, f"applied as root with {nft}")


def _upkeep_check(service: ServiceState) -> Check:
    """The service's own upkeep of egress rules (coi_host.upkeep): restore, refresh, gc."""
    if service.result is None:  # said by the network rules check already
        return Check("rules upkeep", False, "unknown: coi's host service does not answer",
                     service.fix, required=False)
    upkeep = service.result.get("upkeep")
    if not isinstance(upkeep, dict):
        return Check("rules upkeep", False, "coi's host service does not keep rules up "
                     "(not running, or older than this coi)", START_SERVICE_FIX)
    last, error = upkeep.get("last"), upkeep.get("error") or ""
    when = "not run yet" if not isinstance(last, int | float) else \
        f"last {time.time() - last:.0f} s ago"
    detail = (f"every {upkeep.get('tick_seconds')} s: missing rules restored, expired "
              f"allowlist answers renewed, rules of deleted containers removed; {when}")
    if error:
        return Check("rules upkeep", False, f"{detail}; failing: {error}",
                     "see /var/log/coi/host-service.log")
    return Check("rules upkeep", True, detail)


def _resolver_check(service: ServiceState) -> Check:
    """The allowlist resolver the service keeps running (coi-net dns): without it an
    allowlist container's names do not resolve (nothing else answers them)."""
    if service.result is None:  # said by the network rules check already
        return Check("allowlist resolver", False, "unknown: coi's host service does not "
                     "answer", service.fix, required=False)
    state = service.result.get("resolver")
    if not isinstance(state, dict):
        return Check("allowlist resolver", False, "coi's host service runs none (older "
                     "than this coi)", START_SERVICE_FIX, required=False)
    if not state.get("running"):
        return Check("allowlist resolver", False, f"not running: {state.get('error') or '?'} "
                     f"({state.get('starts')} starts); allowlist containers resolve no names",
                     "see /var/log/coi/host-service.log", required=False)
    return Check("allowlist resolver", True, f"running (pid {state.get('pid')}): "
                 "allowlist containers get only their allowed names")


def _idmap_check(service: ServiceState) -> Check:
    """Sessions map the user's uid/gid to the container's code with raw.idmap, which only
    starts when /etc/subuid and /etc/subgid let root map them (container.IdMap)."""
    uid, gid = sessions.invoking_ids()
    ids = f"uid {uid}/gid {gid}"
    if idmap.delegated(uid, gid):
        return Check("idmap delegation", True,
                     f"root may map {ids} ({idmap.SUBUID}, {idmap.SUBGID})")
    fix = "coi setup" if os.geteuid() == 0 else (
        "coi grants it automatically on first use through coi's host service; "
        "or run: sudo coi setup")
    if service.result is not None:
        return Check("idmap delegation", False,
                     f"{ids} not delegated yet: coi's host service grants it on first use",
                     fix, required=False)
    return Check("idmap delegation", False,
                 f"{ids} not delegated in {idmap.SUBUID} and {idmap.SUBGID}: "
                 "sessions would not start", fix)


def remote_checks(settings: config.Config) -> Iterator[Check]:
    """`coi doctor --remote NAME`: the server (reached as the incus client knows it),
    its cluster members, coi's objects there, and which network modes a session
    there may have (docs/remote.md: a mode coi cannot enforce there is refused)."""
    yield _tool_check("incus", "the Incus client", "sudo coi setup")
    try:
        client = incus.connect(settings)
        server = client.server()
    except CoiError as exc:
        yield Check("daemon", False, exc.one_line(), exc.hint or "")
        return
    environment = server.get("environment", {})
    yield Check("daemon", True, f"incusd {environment.get('server_version', '?')} answering "
                f"on {client.socket}, trusted ({server.get('auth', 'unknown')})")
    if environment.get("server_clustered"):
        members = client.request("GET", "/1.0/cluster/members",
                                 params={"recursion": "1"}) or []
        down = [m.get("server_name", "?") for m in members if m.get("status") != "Online"]
        yield Check("cluster", not down, f"{len(members)} members: " + ", ".join(
            f"{m.get('server_name', '?')} ({m.get('status', '?')})" for m in members),
            "--target a member that is online", required=False)
    objects = list(_incus_checks(client, settings, None))
    yield from objects
    set_up = any(c.name == "profile" and c.ok for c in objects)  # coi setup ran there
    yield Check("egress", set_up,
                "restricted: put in force by the server's own coi at every start (its "
                "coi-net-hook; a start without the rules fails); allowlist: refused on a "
                "remote; open: as asked", "run 'coi setup' as root on the server (and on "
                "each cluster member)", required=False)


def _incus_checks(client: incus.Incus, settings: config.Config,
                  service: ServiceState | None) -> Iterator[Check]:
    pool_name = settings.get("incus.pool")
    profile_name = settings.get("incus.profile")
    network_name = settings.get("incus.network")
    image = settings.get("defaults.image")
    try:
        pool = client.get_optional(f"/1.0/storage-pools/{pool_name}")
        bridge = client.get_optional(f"/1.0/networks/{network_name}")
        profile = client.get_optional(f"/1.0/profiles/{profile_name}")
        image_info = client.image_by_alias(image)
    except CoiError as exc:
        yield Check("incus objects", False, exc.one_line(), "sudo coi setup")
        return
    yield from _pool_checks(pool_name, pool)
    yield Check("bridge", bool(bridge and bridge.get("managed")),
                _describe_bridge(network_name, bridge), "sudo coi setup")
    yield Check("profile", bool(profile and {"root", "eth0"} <= set(profile["devices"])),
                f"profile {profile_name!r} " + ("has root and eth0" if profile else "is missing"),
                "sudo coi setup")
    yield Check("image", image_info is not None,
                f"image {image!r} " + ("present" if image_info else "not built yet"),
                "coi build", required=False)
    if service is not None:  # a remote maps no host ids: nothing of this host is mounted
        yield _idmap_check(service)


def _pool_checks(name: str, pool: dict | None) -> Iterator[Check]:
    if pool is None:
        yield Check("storage pool", False, f"pool {name!r} is missing", "sudo coi setup")
        return
    driver = pool.get("driver", "?")
    yield Check("storage pool", True, f"pool {name!r} ({driver})")
    yield Check("copy-on-write", driver in COW_DRIVERS,
                f"{driver} " + ("clones images instantly" if driver in COW_DRIVERS
                                else "unpacks every image at launch (~5 s)"),
                "apt-get install btrfs-progs, delete the pool, run sudo coi setup",
                required=False)


def _describe_bridge(name: str, bridge: dict | None) -> str:
    if not bridge:
        return f"network {name!r} is missing"
    return f"network {name!r} ({bridge.get('config', {}).get('ipv4.address', 'no IPv4')})"
