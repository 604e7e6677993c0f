"""Offline root filesystems: debootstrap a minimal system and pack it as an Incus image.

This is how coi gets a base image on machines that reach only their
distribution's package mirror (no `images:` remote). A minbase rootfs needs
care to come up on the network: systemd-networkd leaves eth0 pending there,
so ifupdown + dhclient configure it (an address ~1 s after start).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from coi_common import proc
from coi_common.errors import CoiError, CommandFailed

BASE_PACKAGES: Final = ("systemd", "systemd-sysv", "dbus", "ifupdown", "isc-dhcp-client",
                        "iproute2", "ca-certificates", "sudo", "procps")
# Builds run as root; mkdtemp makes a private 0700 folder, and /var/tmp holds the
# rootfs-sized scratch space that /tmp (often tmpfs) may not.
WORK_PARENT: Final = "/var/tmp"  # noqa: S108
INTERFACES: Final = """# Written by coi: ifupdown + dhclient bring eth0 up
# (systemd-networkd leaves it pending in a minbase rootfs).
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
"""
# Incus renders these at create/copy time, so each container gets its own name.
TEMPLATES: Final = {
    "/etc/hostname": ("hostname.tpl", "{{ instance.name }}\n"),
    "/etc/hosts": ("hosts.tpl", "127.0.0.1\tlocalhost\n127.0.1.1\t{{ instance.name }}\n"
                   "::1\tlocalhost ip6-localhost ip6-loopback\n"),
}
# Emptied before packing: apt recreates what it needs; docs and caches are dead weight.
PRUNE: Final = ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man",
                "usr/share/info")
TAIL_LINES: Final = 20
ROOTFS_VERSION: Final = 1
"""Bump by hand when this module makes a base differently in a way recipe() does not see."""


def recipe() -> str:
    """What a base made here contains, as text for its cache key: the version and the
    packages, files and pruned folders."""
    return "\0".join([f"rootfs {ROOTFS_VERSION}", ",".join(BASE_PACKAGES), INTERFACES,
                       repr(sorted(TEMPLATES.items())), ",".join(PRUNE)])


@contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    """A scratch folder under /var/tmp, removed afterwards (never across a live mount)."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=WORK_PARENT))
    try:
        yield work
    finally:
        remove_tree(work)


def debootstrap(rootfs: Path, suite: str, mirror: str, packages: Sequence[str],
                log_path: str) -> None:
    """A minbase system of `suite` from `mirror`; its output goes to the log."""
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
            suite, str(rootfs), mirror]
    status = proc.run_logged(argv, log_path)
    if status != 0:
        print(log_tail(log_path), file=sys.stderr)
        raise CommandFailed(f"debootstrap exited {status}", hint=f"full log: {log_path}")


def in_chroot(rootfs: Path, argv: Sequence[str], log_path: str) -> None:
    """Run a command inside the rootfs (useradd, systemctl enable, ...)."""
    status = proc.run_logged(["chroot", str(rootfs), *argv], log_path)
    if status != 0:
        raise CommandFailed(f"{argv[0]} in the new rootfs exited {status}",
                            hint=f"full log: {log_path}")


def prepare_base(rootfs: Path, log_path: str) -> None:
    """Networking that comes up by itself, a fresh machine id per container, no caches."""
    (rootfs / "etc/network/interfaces").write_text(INTERFACES, encoding="utf-8")
    in_chroot(rootfs, ["systemctl", "enable", "networking.service"], log_path)
    (rootfs / "etc/machine-id").write_text("", encoding="utf-8")
    dbus_id = rootfs / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    prune(rootfs)


def prune(rootfs: Path) -> None:
    """Empty the PRUNE folders and drop install logs."""
    for relative in PRUNE:
        folder = rootfs / relative
        for entry in folder.iterdir() if folder.is_dir() else ():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for entry in (rootfs / "var/log").iterdir():
        if entry.is_file():
            entry.unlink()


def pack(work: Path, rootfs: Path, properties: Mapping[str, str]) -> tuple[Path, Path]:
    """The metadata tarball (metadata.yaml + templates) and the rootfs tarball."""
    if mounts_under(rootfs):
        raise CoiError(f"something is still mounted under {rootfs}; not packing it")
    meta_dir = work / "meta"
    (meta_dir / "templates").mkdir(parents=True)
    for name, content in TEMPLATES.values():
        (meta_dir / "templates" / name).write_text(content, encoding="utf-8")
    (meta_dir / "metadata.yaml").write_text(metadata_yaml(properties), encoding="utf-8")
    meta = work / "metadata.tar.gz"
    proc.run(["tar", "--numeric-owner", "-C", str(meta_dir), "-czf", str(meta),
              "metadata.yaml", "templates"])
    # zstd on all cores packs ~4x faster than gzip; Incus unpacks it natively.
    tarball = work / "rootfs.tar.zst"
    proc.run(["tar", "--numeric-owner", "--one-file-system", "-I", "zstd -T0 -3",
              "-C", str(rootfs), "-cf", str(tarball), "."], timeout=900)
    return meta, tarball


def metadata_yaml(properties: Mapping[str, str]) -> str:
    """metadata.yaml with every value quoted, so YAML keeps them strings."""
    lines = [f'architecture: "{platform.machine()}"', f"creation_date: {int(time.time())}",
             "properties:"]
    lines += [f"  {key}: {_yaml_string(value)}" for key, value in properties.items()]
    lines.append("templates:")
    for path, (name, _) in TEMPLATES.items():
        lines += [f'  "{path}":', "    when: [create, copy]", f'    template: "{name}"']
    return "\n".join(lines) + "\n"


def _yaml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(work: Path) -> None:
    """Remove a work dir, unmounting first what an interrupted debootstrap left mounted.

    rmtree must never run while a mount is left under it: debootstrap may
    bind-mount the host's /dev/pts and /dev/shm into the target.
    """
    if not work.exists():
        return
    for point in mounts_under(work):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    left = mounts_under(work)
    if left:
        print(f"coi: NOT removing {work}: still mounted: {', '.join(left)}", file=sys.stderr)
        return
    shutil.rmtree(work, ignore_errors=True)


def require_root(what: str) -> None:
    """debootstrap and chroot need root."""
    if os.geteuid() != 0:
        from coi_common.errors import PermissionDenied  # noqa: PLC0415

        raise PermissionDenied(f"{what} needs root (debootstrap, chroot)",
                               hint="run it with sudo")


def log_tail(log_path: str, lines: int = TAIL_LINES) -> str:
    """The last lines of a log file, for a failure report."""
    with open(log_path, encoding="utf-8", errors="replace") as log:
        return "\n".join(log.read().splitlines()[-lines:])
