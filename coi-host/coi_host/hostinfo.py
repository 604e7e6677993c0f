"""Facts about this host that setup and doctor act on: distribution, packages,
init system, filesystems, networks in use. Functions that decide are pure and
take the facts as arguments, so tests can feed them any distribution.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from coi_common import apt_sources, executables, proc

OS_RELEASE = "/etc/os-release"
BACKPORTS_SOURCES = "/etc/apt/sources.list.d/coi-backports.sources"
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Distro:
    """The distribution, from /etc/os-release."""

    id: str
    version_id: str
    codename: str
    like: tuple[str, ...]
    pretty: str


@dataclass(frozen=True)
class InstallPlan:
    """How Incus gets installed here: apt (maybe from backports) or by the user."""

    apt: bool
    backports_suite: str = ""
    message: str = ""


def parse_os_release(text: str) -> Distro:
    """Read the KEY=value lines of os-release (values may be quoted)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        if sep and re.fullmatch(r"[A-Z_]+", key):
            parts = shlex.split(raw) if raw else [""]
            values[key] = parts[0] if parts else ""
    return Distro(id=values.get("ID", "unknown"), version_id=values.get("VERSION_ID", ""),
                  codename=values.get("VERSION_CODENAME", ""),
                  like=tuple(values.get("ID_LIKE", "").split()),
                  pretty=values.get("PRETTY_NAME", values.get("ID", "unknown")))


def read_distro(path: str = OS_RELEASE) -> Distro:
    with open(path, encoding="utf-8") as f:
        return parse_os_release(f.read())


def _major(version: str) -> float:
    try:
        return float(version)
    except ValueError:
        return 0.0


def install_plan(distro: Distro) -> InstallPlan:
    """Where Incus comes from on this distribution."""
    if distro.id == "debian" and distro.codename == "bookworm":
        return InstallPlan(apt=True, backports_suite="bookworm-backports")
    if distro.id == "debian" and _major(distro.version_id) >= 13:
        return InstallPlan(apt=True)
    if distro.id == "ubuntu" and _major(distro.version_id) >= 24.04:
        return InstallPlan(apt=True)
    hints = {
        "arch": "pacman -S incus, then systemctl enable --now incus.socket",
        "fedora": "dnf install incus, then systemctl enable --now incus.socket",
        "ubuntu": "Ubuntu before 24.04 has no incus package; use the Zabbly repository",
        "debian": "Debian before 12 has no incus package; upgrade, or use the Zabbly repository",
    }
    hint = hints.get(distro.id, "install Incus as its documentation describes for "
                     f"{distro.pretty}, then run coi setup again")
    return InstallPlan(apt=False, message=hint)


def missing_packages(names: Iterable[str]) -> list[str]:
    """The apt packages among `names` that are not installed."""
    wanted = list(names)
    result = proc.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *wanted],
                      check=False)
    installed = {line.split()[0] for line in result.stdout.splitlines()
                 if line.endswith(" installed")}
    return [name for name in wanted if name not in installed]


def backports_stanza(debian_sources: str, suite: str) -> str:
    """A deb822 stanza for `suite` with the URIs and key of the main Debian archive."""
    archive = apt_sources.main_archive(debian_sources)
    lines = ["Types: deb", f"URIs: {archive.uri}", f"Suites: {suite}", "Components: main"]
    if archive.signed_by:
        lines.append(f"Signed-By: {archive.signed_by}")
    return "\n".join(lines) + "\n"


def enable_backports(suite: str) -> None:
    """Add the backports suite to apt's sources once (skipped when any source has it)."""
    folder = Path(BACKPORTS_SOURCES).parent
    sources = [*folder.iterdir(), Path("/etc/apt/sources.list")]
    if any(suite in _read(path) for path in sources):
        return
    Path(BACKPORTS_SOURCES).write_text(backports_stanza(_read(apt_sources.DEBIAN_SOURCES), suite),
                                       encoding="utf-8")


def _read(path: Path) -> str:
    """A text file's content, or "" when it is missing or not a file."""
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def find_program(program: str, extra_dirs: Iterable[str] = SBIN_DIRS) -> str | None:
    """`program` on PATH, else in `extra_dirs`: a normal user's PATH on Debian lacks the
    sbin directories, where programs such as nft live that coi still needs to find."""
    return executables.which(program) or shutil.which(program, path=os.pathsep.join(extra_dirs))


def has_systemd() -> bool:
    """True when systemd is the running init (it then manages incusd)."""
    return os.path.isdir("/run/systemd/system")


def filesystems(path: str = "/proc/filesystems") -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {line.split()[-1] for line in f if line.strip()}


def choose_pool_driver(has_zfs: bool, has_btrfs: bool) -> str:
    """ZFS, then btrfs (both copy-on-write: ~0.35 s launches), else dir (~5 s)."""
    if has_zfs:
        return "zfs"
    return "btrfs" if has_btrfs else "dir"


def best_pool_driver() -> str:
    """ZFS or btrfs need a loop device for their pool file; a container (Incus inside
    Incus) usually has none, and gets a dir pool."""
    loop = loop_devices()
    has_zfs = loop and os.path.isdir("/sys/module/zfs") and executables.which("zpool") is not None
    has_btrfs = loop and "btrfs" in filesystems() and executables.which("mkfs.btrfs") is not None
    return choose_pool_driver(has_zfs, has_btrfs)


def loop_devices(control: str = "/dev/loop-control") -> bool:
    """True when this host can make loop devices (losetup --find)."""
    try:
        return stat.S_ISCHR(os.stat(control).st_mode) and os.access(control, os.R_OK | os.W_OK)
    except OSError:
        return False


def used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks this host routes to, holds addresses in, or sends DNS to."""
    from pyroute2 import IPRoute  # noqa: PLC0415 - 100-200 ms; only setup needs netlink

    used: list[ipaddress.IPv4Network] = []
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=2):
            dst = route.get_attr("RTA_DST")
            if dst and route["dst_len"] > 0:
                used.append(ipaddress.IPv4Network(f"{dst}/{route['dst_len']}", strict=False))
        for addr in ipr.get_addr(family=2):
            used.append(ipaddress.IPv4Network(
                f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False))
    used.extend(_resolver_networks())
    return used


def _resolver_networks(path: str = "/etc/resolv.conf") -> list[ipaddress.IPv4Network]:
    found = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver" and "." in parts[1]:
                    found.append(ipaddress.IPv4Network(f"{parts[1]}/16", strict=False))
    return found


def coi_users(group: str) -> tuple[set[int], set[int]]:
    """uids and gids coi runs as here: root, the sudo caller, the group's members."""
    import grp  # noqa: PLC0415
    import pwd  # noqa: PLC0415

    uids, gids = {0}, {0}
    if os.environ.get("SUDO_UID", "").isdigit():
        uids.add(int(os.environ["SUDO_UID"]))
        gids.add(int(os.environ.get("SUDO_GID", "0") or 0))
    try:
        members = grp.getgrnam(group).gr_mem
    except KeyError:
        members = []
    for member in members:
        try:
            entry = pwd.getpwnam(member)
        except KeyError:
            continue
        uids.add(entry.pw_uid)
        gids.add(entry.pw_gid)
    return uids, gids
