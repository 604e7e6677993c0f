"""`coi setup`: install and start Incus, and create the pool, bridge and profile coi uses.

Each step looks first and changes only what is missing, so a second run
changes nothing. Things the user already has (the `default` profile, other
networks and pools) are never modified. Long package installs stream to a
log file under ~/.coi/logs; one progress line per step goes to stderr.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from coi_common import config, executables, idmap, incus, proc
from coi_common.errors import CoiError, CommandFailed, IncusUnavailable, PermissionDenied
from coi_common.progress import Progress
from coi_common.protocol import make_record, write_record
from coi_host import hostinfo, install

POOL_SIZE = "20GiB"
BRIDGE_CANDIDATES = tuple(f"10.{second}.{third}.0/24" for second, third in
                          ((151, 43), (152, 44), (153, 45), (161, 71), (171, 81), (181, 91)))
DAEMON_LOG = "/var/log/incus/incusd.log"
INCUSD = "/usr/libexec/incus/incusd"
PACKAGES = ("nftables", "tmux", "debootstrap", "btrfs-progs", "ca-certificates", "xz-utils",
            "dnsmasq-base")  # dnsmasq: DHCP and DNS on the bridge


@dataclass
class Step:
    """One thing setup made sure of, and whether it had to change something."""

    name: str
    changed: bool
    detail: str


@dataclass
class Context:
    """What the steps share: the distribution, the config, a log file, the Incus client."""

    distro: hostinfo.Distro
    settings: config.Config
    log_path: str
    client: incus.Incus = field(init=False)

    def __post_init__(self) -> None:
        self.client = incus.connect(self.settings)


def run_setup(*, as_json: bool) -> int:
    """Run every step in order; print progress, then the result."""
    if os.geteuid() != 0:
        raise PermissionDenied("coi setup changes the host and needs root",
                               hint="run: sudo coi setup")
    ctx = Context(hostinfo.read_distro(), config.load(None), _new_log_path())
    steps_to_run: tuple[tuple[str, Callable[[Context], Step]], ...] = (
        ("packages", ensure_packages), ("daemon", ensure_daemon), ("storage pool", ensure_pool),
        ("bridge", ensure_bridge), ("profile", ensure_profile), ("id maps", ensure_idmaps),
        ("host service", ensure_service))
    done: list[Step] = []
    progress = Progress("coi setup", len(steps_to_run))
    for label, step_fn in steps_to_run:
        with progress.step(label) as outcome:
            step = step_fn(ctx)
            outcome.append(f"{step.detail} ({'changed' if step.changed else 'ok'})")
        done.append(step)
    changed = any(s.changed for s in done)
    if as_json:
        write_record(make_record("setup", changed=changed, steps=[asdict(s) for s in done]))
    else:
        print("coi setup: done" + ("" if changed else ", nothing to change"))
    return 0


def _new_log_path() -> str:
    folder = os.path.expanduser("~/.coi/logs")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"setup-{time.strftime('%Y%m%d-%H%M%S')}.log")


# -- packages -------------------------------------------------------------------


def ensure_packages(ctx: Context) -> Step:
    """Install Incus and the host tools coi uses, from the distribution's archive."""
    plan = hostinfo.install_plan(ctx.distro)
    missing = hostinfo.missing_packages(("incus", *PACKAGES)) if plan.apt else []
    if "incus" in missing and not hostinfo.missing_packages(["incus-base"]):
        missing.remove("incus")  # Debian's containers-only Incus (no VM support) will do
    if not plan.apt:
        if executables.which("incus"):
            return Step("packages", False, "incus present (not an apt system: "
                        "install nftables, tmux, debootstrap yourself)")
        raise CoiError(f"cannot install Incus on {ctx.distro.pretty}", hint=plan.message)
    if not missing:
        return Step("packages", False, "incus and host tools present")
    if plan.backports_suite:
        hostinfo.enable_backports(plan.backports_suite)
    _apt(ctx, "update")
    others = [p for p in missing if p != "incus"]
    if others:
        _apt(ctx, "install", "-y", "--no-install-recommends", *others)
    if "incus" in missing:
        target = ["-t", plan.backports_suite] if plan.backports_suite else []
        _apt(ctx, "install", "-y", *target, "incus")
    return Step("packages", True, "installed " + ", ".join(missing))


def _apt(ctx: Context, *args: str) -> None:
    """Run apt-get through `sh`, streaming its output into the setup log."""
    import sh  # noqa: PLC0415 - 55+ ms to import; only setup runs long package commands

    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(ctx.log_path, "a", encoding="utf-8") as log:
        log.write(f"$ apt-get {' '.join(args)}\n")
        log.flush()
        try:
            sh.Command("apt-get")(*args, _env=env, _out=log, _err_to_out=True, _in=os.devnull)
        except sh.ErrorReturnCode as exc:
            lines = Path(ctx.log_path).read_text(encoding="utf-8").splitlines()
            print("\n".join(lines[-20:]), file=sys.stderr)
            raise CommandFailed(f"apt-get {args[0]} failed (exit {exc.exit_code})",
                                hint=f"full log: {ctx.log_path}") from None


# -- daemon -----------------------------------------------------------------------


def ensure_daemon(ctx: Context) -> Step:
    """Make incusd answer: leave it if it does, else start it and wait until ready."""
    try:
        version = ctx.client.server_version()
        return Step("daemon", False, f"incusd {version} answering")
    except IncusUnavailable:
        pass
    if hostinfo.has_systemd():
        proc.run(["systemctl", "start", "incus.socket", "incus.service"])
        how = "started with systemctl"
    else:
        # No init system manages incusd here (containers, minimal VMs): run it ourselves.
        os.makedirs(os.path.dirname(DAEMON_LOG), exist_ok=True)
        group = ctx.settings.get("incus.group")
        proc.spawn_detached([INCUSD, "--group", group, "--logfile", DAEMON_LOG], DAEMON_LOG)
        how = f"started {INCUSD} (no init system)"
    proc.run(["incus", "admin", "waitready", "--timeout", "60"], timeout=70)
    return Step("daemon", True, f"{how}; incusd {ctx.client.server_version()} answering")


# -- storage pool --------------------------------------------------------------------


def ensure_pool(ctx: Context) -> Step:
    """A copy-on-write pool for fast launches: ZFS, else a btrfs loop file, else dir."""
    name = ctx.settings.get("incus.pool")
    existing = ctx.client.get_optional(f"/1.0/storage-pools/{name}")
    if existing:
        return Step("storage pool", False, f"{name!r} ({existing['driver']}) present")
    driver = hostinfo.best_pool_driver()
    body: dict[str, object] = {"name": name, "driver": driver, "config": {}}
    if driver in ("zfs", "btrfs"):
        body["config"] = {"size": POOL_SIZE}
    ctx.client.create("/1.0/storage-pools", body, what=f"storage pool {name}")
    detail = f"created {name!r} ({driver})"
    if driver == "dir":
        detail += "; WARNING: not copy-on-write, every launch unpacks the image (~5 s)"
    return Step("storage pool", True, detail)


# -- bridge ------------------------------------------------------------------------------


def ensure_bridge(ctx: Context) -> Step:
    """coi's own managed bridge, on a subnet no route of the host uses; IPv6 off."""
    name = ctx.settings.get("incus.network")
    existing = ctx.client.get_optional(f"/1.0/networks/{name}")
    if existing:
        subnet = existing.get("config", {}).get("ipv4.address", "no IPv4")
        return Step("bridge", False, f"{name!r} ({subnet}) present")
    subnet = pick_subnet(hostinfo.used_networks(), BRIDGE_CANDIDATES)
    gateway = f"{next(subnet.hosts())}/{subnet.prefixlen}"
    body = {"name": name, "type": "bridge", "description": "coi session containers",
            "config": {"ipv4.address": gateway, "ipv4.nat": "true", "ipv6.address": "none"}}
    ctx.client.create("/1.0/networks", body, what=f"network {name}")
    return Step("bridge", True, f"created {name!r} with {gateway}")


def pick_subnet(used: Iterable[ipaddress.IPv4Network],
                candidates: Iterable[str]) -> ipaddress.IPv4Network:
    """The first candidate /24 that overlaps none of the networks already in use."""
    taken = list(used)
    for text in candidates:
        subnet = ipaddress.IPv4Network(text)
        if not any(subnet.overlaps(net) for net in taken):
            return subnet
    raise CoiError("no free subnet for coi's bridge among " + ", ".join(candidates),
                   hint="create one yourself: incus network create coibr0 ipv4.address=X/24")


# -- profile -------------------------------------------------------------------------------


def ensure_profile(ctx: Context) -> Step:
    """Profile `coi`: root disk on coi's pool, eth0 on coi's bridge. Left alone if present."""
    name = ctx.settings.get("incus.profile")
    existing = ctx.client.get_optional(f"/1.0/profiles/{name}")
    if existing:
        devices = sorted(existing.get("devices", {}))
        return Step("profile", False, f"{name!r} present (devices: {', '.join(devices)})")
    body = {"name": name, "description": "coi session containers", "config": {},
            "devices": profile_devices(ctx.settings.get("incus.pool"),
                                       ctx.settings.get("incus.network"))}
    ctx.client.create("/1.0/profiles", body, what=f"profile {name}")
    return Step("profile", True, f"created {name!r}")


def profile_devices(pool: str, network: str) -> dict[str, dict[str, str]]:
    """The devices every coi container gets from its profile."""
    return {"root": {"type": "disk", "path": "/", "pool": pool},
            "eth0": {"type": "nic", "name": "eth0", "network": network}}


# -- id maps -----------------------------------------------------------------------------


def ensure_idmaps(ctx: Context) -> Step:
    """Let Incus map each coi user's own uid/gid into containers (raw.idmap).

    Files that `code` creates in /workspace then belong to the host user who
    ran coi. Covers root, the user behind sudo and the members of the Incus
    group now; members added later get theirs from the host service on their
    first session (idmap_grant), no root step needed.
    """
    uids, gids = hostinfo.coi_users(ctx.settings.get("incus.group"))
    added = ensure_subids(uids, gids)
    detail = f"root may map {', '.join(map(str, sorted(uids)))}"
    return Step("id maps", bool(added), detail + (f" (added {', '.join(added)})" if added else ""))


def ensure_subids(uids: Iterable[int], gids: Iterable[int]) -> list[str]:
    """Append the `root:ID:1` lines that are missing; return what was added."""
    return idmap.add_lines(idmap.missing_lines(uids, gids))


# -- host service ------------------------------------------------------------------------


def ensure_service(_ctx: Context) -> Step:
    """A root-owned copy of coi and its host service answering on its socket."""
    changed, digest = install.install()
    how = install.ensure_running(digest, systemd=hostinfo.has_systemd())
    return Step("host service", changed or bool(how),
                f"{install.SERVICE_ROOT} ({digest}); {how or 'answering'}")
