"""A disposable coi host for tests that must not touch this machine's own coi objects:
an Incus container with nesting, on coi's bridge, with Incus inside (Incus in Incus).

The image `coi-test-incus-image` is coi-test-image plus Debian's containers-only Incus
(incus-base from bookworm-backports), the host tools `coi setup` wants, and Python.
It is built offline: the packages a simulated `apt-get install` in the builder names
are taken from this host's apt cache, or fetched by this host's apt (as `coi setup`
fetches Incus), pushed in and installed with dpkg; the builder itself sends no
packet. The image carries the hash of its recipe and is kept between runs (the
sweeper spares it), like the test image.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from coi_common.incus import ExecSpec, Incus, exec_not_started, retry_exec
from fixtures_users import copy_checkout

ALIAS: Final = "coi-test-incus-image"
PACKAGES: Final = ("incus-base/bookworm-backports", "incus-client/bookworm-backports",
                   "nftables", "tmux", "debootstrap", "btrfs-progs", "ca-certificates",
                   "xz-utils", "zstd", "dnsmasq-base", "python3", "python3-venv")
RECIPE_VERSION: Final = 2
NESTING: Final = {"security.nesting": "true"}
APT_CACHE: Final = Path("/var/cache/apt/archives")
VENV_PACKAGES: Final = ("dns", "docopt", "pyroute2", "sh")
"""coi's own dependencies, pure Python: copied from this checkout's venv (no download)."""
SOURCE: Final = "/opt/coi"
_INST: Final = re.compile(r"Inst (\S+) (?:\[\S+\] )?\((\S+) .*?\[(\S+)\]\)")


def run(client: Incus, name: str, command: str, *, timeout: float = 300,
        stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """`sh -c COMMAND` as root in `name`, bytes on its stdin (never raises on a non-zero
    exit; an exec Incus failed to start is tried again, by coi's own retry)."""
    spec = ExecSpec(name, ("sh", "-c", command))
    argv = client.exec_argv(spec)

    def attempt() -> subprocess.CompletedProcess[str]:
        done = subprocess.run(argv, input=stdin or b"", capture_output=True,
                              timeout=timeout, check=False)
        return subprocess.CompletedProcess(argv, done.returncode,
                                           done.stdout.decode(errors="replace"),
                                           done.stderr.decode(errors="replace"))

    return retry_exec(spec, attempt,
                      lambda done: done.returncode != 0 and exec_not_started(done.stderr))


def _tar_of(root: Path, names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in names:
            archive.add(root / name, arcname=name)
    return buffer.getvalue()


def recipe(test_image_fingerprint: str) -> str:
    text = f"{RECIPE_VERSION}\n{test_image_fingerprint}\n" + "\n".join(PACKAGES)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_image(client: Incus, test_image: str) -> str:
    """coi-test-incus-image, built now when missing or of another recipe."""
    wanted = recipe(client.image_by_alias(test_image)["fingerprint"])
    found = client.image_by_alias(ALIAS)
    if found and found.get("properties", {}).get("coi.test_recipe") == wanted:
        return ALIAS
    builder = f"coi-test-nestbuild-{secrets.token_hex(3)}"
    try:
        client.create_instance(builder, test_image, profiles=["coi"], config=NESTING,
                               start=True)
        _install_packages(client, builder)
        client.set_state(builder, "stop", force=True)
        if found:
            client.delete_alias(ALIAS)
        client.publish(builder, alias=ALIAS, properties={"coi.test_recipe": wanted})
        if found:  # the image of the older recipe goes with its alias
            client.delete_image(found["fingerprint"])
    finally:
        client.delete_instance_force(builder)
    return ALIAS


def _install_packages(client: Incus, builder: str) -> None:
    lists = ["var/lib/apt/lists", "etc/apt/sources.list.d",
             "usr/share/keyrings/debian-archive-keyring.gpg"]
    done = run(client, builder, "rm -f /etc/apt/sources.list; tar -C / -xf -",
               stdin=_tar_of(Path("/"), lists))
    assert done.returncode == 0, done.stderr
    done = run(client, builder, "apt-get -s install -y --no-install-recommends "
               + " ".join(PACKAGES))
    wanted = [m.groups() for m in map(_INST.match, done.stdout.splitlines()) if m]
    assert wanted, done.stdout[-2000:] + done.stderr[-2000:]
    with tempfile.TemporaryDirectory(prefix="coi-test-debs-") as folder:
        _fetch(Path(folder), wanted)
        debs = sorted(os.listdir(folder))
        # dpkg orders by pre-dependencies only within a pass: a few passes settle it.
        done = run(client, builder, "mkdir -p /tmp/debs && tar -C /tmp/debs -xf - && "
                   "cd /tmp/debs && for pass in 1 2 3 4; do "
                   "DEBIAN_FRONTEND=noninteractive dpkg -i ./*.deb >/tmp/dpkg.log 2>&1 "
                   "&& break; done; status=$?; rm -rf /tmp/debs /var/lib/apt/lists/*; "
                   "tail -20 /tmp/dpkg.log; exit $status",
                   stdin=_tar_of(Path(folder), debs), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr


def _fetch(folder: Path, wanted: list[tuple[str, str, str]]) -> None:
    """Each package's .deb into `folder`: this host's cached file, else apt's download."""
    missing = []
    for name, version, arch in wanted:
        cached = APT_CACHE / f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
        if cached.is_file():
            shutil.copy(cached, folder / cached.name)
        else:
            missing.append(f"{name}={version}")
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=folder, check=True,
                       capture_output=True, timeout=900)
    for deb in folder.iterdir():
        deb.chmod(0o644)


def install_coi(client: Incus, name: str) -> None:
    """This checkout at /opt/coi in `name`, with a venv of Debian's Python holding
    coi's dependencies: bin/coi runs there as from a checkout."""
    with tempfile.TemporaryDirectory(prefix="coi-test-src-") as folder:
        copy_checkout(Path(folder))
        source = _tar_of(Path(folder), sorted(os.listdir(folder)))
    done = run(client, name, f"mkdir -p {SOURCE} && tar -C {SOURCE} -xf - && "
               f"python3 -m venv --without-pip {SOURCE}/.venv", stdin=source)
    assert done.returncode == 0, done.stderr
    site = next(Path(__file__).resolve().parents[1].glob(".venv/lib/python3*/site-packages"))
    names = [p.name for p in site.iterdir()
             if p.name in VENV_PACKAGES or p.name == "sh.py"
             or any(p.name.lower().startswith(f"{d}-") or p.name.startswith(f"{d}_ng-")
                    for d in ("dnspython", "docopt", "pyroute2", "sh"))]
    done = run(client, name, f"tar -C {SOURCE}/.venv/lib/python3.11/site-packages -xf - && "
               f"{SOURCE}/bin/coi version", stdin=_tar_of(site, names))
    assert done.returncode == 0, done.stdout + done.stderr


WAIT_READY: Final = ("for i in $(seq 60); do incus admin waitready --timeout 2 >/dev/null "
                     "2>&1 && exit 0; sleep 1; done; exit 1")
# What Incus inside needs to start containers of its own here. This host has cgroup v1
# with cpu and cpuacct as two hierarchies; the outer LXC links both to a `cpu,cpuacct`
# it never mounts, so the inner LXC finds neither: they are mounted for real. And the
# inner daemon's default map (root:1000000:1000000000) passes the end of the ids this
# container has (0-999999999): it gets 100000000 of them.
FOR_CONTAINERS: Final = (
    "mount -o remount,rw /sys/fs/cgroup && cd /sys/fs/cgroup && for c in cpu cpuacct; do "
    "rm -f $c && mkdir -p $c && mount -t cgroup -o $c cgroup $c || exit 1; done; "
    "rm -rf cpu,cpuacct; mount -o remount,ro /sys/fs/cgroup; "
    "sed -i 's/^root:1000000:1000000000$/root:1000000:100000000/' /etc/subuid /etc/subgid && "
    "systemctl restart incus.service")


def nested_host(client: Incus, test_image: str, *, runs_containers: bool = False
                ) -> Iterator[str]:
    """A started Incus-in-Incus container with coi at /opt/coi, Incus answering (and,
    `runs_containers`, able to start containers of its own); removed afterwards, also
    on failure."""
    image = ensure_image(client, test_image)
    name = f"coi-test-nest-{secrets.token_hex(3)}"
    try:
        client.create_instance(name, image, profiles=["coi"], config=NESTING, start=True)
        done = run(client, name, WAIT_READY, timeout=120)
        assert done.returncode == 0, f"Incus inside {name} did not answer: {done.stderr}"
        if runs_containers:
            done = run(client, name, f"{FOR_CONTAINERS} && {WAIT_READY}", timeout=180)
            assert done.returncode == 0, f"Incus inside {name}: {done.stderr}"
        install_coi(client, name)
        yield name
    finally:
        client.delete_instance_force(name)
