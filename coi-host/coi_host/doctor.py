"""`coi doctor`: check that this machine can run coi and say how to fix what cannot.

Required checks decide the exit status; advisory ones (the `coi` image not
built yet, a pool that is not copy-on-write) are reported with their fix but
do not fail the run. The daemon being unreachable exits 4, a permission
problem 5, anything else failing 1.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from coi_common import config, incus, proc
from coi_common.errors import (
    EXIT_FAILED,
    EXIT_PERMISSION,
    EXIT_UNAVAILABLE,
    CoiError,
    IncusUnavailable,
    PermissionDenied,
)
from coi_common.protocol import make_record, write_record
from coi_host import hostinfo

COW_DRIVERS = ("btrfs", "zfs", "lvm", "ceph")


@dataclass(frozen=True)
class Check:
    """One finding: whether it holds, what was seen, and how to fix it if not."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def run_doctor(*, as_json: bool) -> int:
    """Run every check, print them, and return the exit status they imply."""
    checks = list(gather_checks(config.load(None)))
    status = exit_status(checks)
    if as_json:
        write_record(make_record("doctor", ok=status == 0, checks=[asdict(c) for c in checks]))
    else:
        for check in checks:
            mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
            print(f"{mark} {check.name}: {check.detail}")
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
    yield _tool_check("incus", "the Incus client", "sudo coi setup")
    yield _tool_check("tmux", "sessions run in tmux", "apt-get install tmux")
    yield _tool_check("nft", "network isolation uses nftables", "apt-get install nftables")
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
    yield from _incus_checks(client, server, settings)


def _tool_check(program: str, why: str, fix: str) -> Check:
    path = proc.which(program)
    return Check(program, path is not None, path or f"not found ({why})", fix)


def _incus_checks(client: incus.Incus, server: dict, settings: config.Config) -> Iterator[Check]:
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
    shift = hostinfo.kernel_features(server).get("idmapped_mounts") == "true"
    yield Check("idmapped mounts", shift,
                "supported (shift=true)" if shift else "not supported: raw.idmap is used instead",
                "a kernel of 5.12 or newer with idmapped mounts", required=False)


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
