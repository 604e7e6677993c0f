"""Remove what crashed test runs left behind, and nothing else.

Usage:
  sweep.py [--force] [--debug]
  sweep.py (-h | --help)

Removes instances named `coi-test-*` (forced), images all of whose aliases are
`coi-test-*` (half-done builds, images tests published), network namespaces
`coi-test-*`, nftables tables `coi_test_*` of any family, workspace views
/run/coi/views/coi-test-*, their lock files in /run/coi/locks, profiles and
networks (bridges) `coi-test-*` and the test accounts
`coi-test-u*` (their processes, /tmp home and the `root:ID:1` lines of their
uid and gid in /etc/subuid and /etc/subgid). The cached test images
`coi-test-image`, `coi-test-full-image` and `coi-test-incus-image` always stay.
Prints one line per removed thing, or nothing; exits 0.

A pytest session that uses Incus holds a shared lock on LOCK_PATH for as long
as it runs; the sweep takes the lock exclusively and does nothing (saying so
on stderr) while a test run is going on, since its containers are not
leftovers. --force sweeps anyway.

Options:
  --force    Sweep even while a test run holds the lock.
  --debug    Show tracebacks on errors.
  -h --help  Show this help.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Final

ROOT: Final = Path(__file__).resolve().parent.parent
for folder in ("lib", "coi-host"):
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))

from coi_common import idmap, locks, proc  # noqa: E402 - needs the path above when run as a script
from coi_common.errors import NotFound  # noqa: E402
from coi_common.incus import Incus  # noqa: E402
from coi_host import views  # noqa: E402

INSTANCE_PREFIX: Final = "coi-test-"
IMAGE_PREFIX: Final = "coi-test-"
KEEP_ALIASES: Final = frozenset({"coi-test-image", "coi-test-full-image", "coi-test-incus-image"})
NETNS_PREFIX: Final = "coi-test-"
NFT_PREFIX: Final = "coi_test_"
USER_PREFIX: Final = "coi-test-u"
HOME_PREFIX: Final = "/tmp/coi-test-home-"
LOCK_PATH: Final = Path("/run/lock/coi-test-run.lock")


def sweep(client: Incus | None = None, *, scope: str = "") -> list[str]:
    """Remove every test leftover; return one line per thing removed.

    `scope` narrows every prefix (`coi-test-<scope>`, `coi_test_<scope>`), so
    a test can prove the sweep on its own objects alone. The caller decides
    whether another test run is active (see RunLock); this function removes
    unconditionally.
    """
    client = client or Incus()
    return [*_sweep_instances(client, INSTANCE_PREFIX + scope),
            *_sweep_images(client, IMAGE_PREFIX + scope),
            *_sweep_netns(NETNS_PREFIX + scope),
            *_sweep_nft(NFT_PREFIX + scope.replace("-", "_")),
            *_sweep_views(INSTANCE_PREFIX + scope),
            *_sweep_locks(INSTANCE_PREFIX + scope),
            *_sweep_incus("profile", INSTANCE_PREFIX + scope),
            *_sweep_incus("network", INSTANCE_PREFIX + scope),
            *_sweep_users(USER_PREFIX + scope)]


def _sweep_instances(client: Incus, prefix: str) -> list[str]:
    removed = []
    for instance in client.instances(prefix):
        name = instance["name"]
        with contextlib.suppress(NotFound):  # an ephemeral one goes away when stopped
            if instance.get("status") != "Stopped":
                client.set_state(name, "stop", force=True)
            client.delete_instance(name)
        removed.append(f"removed container {name}")
    return removed


def _sweep_images(client: Incus, prefix: str) -> list[str]:
    """Images only tests named; on a kept cache image only the stray test aliases go."""
    removed = []
    for image in client.images():
        aliases = [a["name"] for a in image.get("aliases") or []]
        stray = [a for a in aliases if a.startswith(prefix) and a not in KEEP_ALIASES]
        if not stray:
            continue
        with contextlib.suppress(NotFound):
            if len(stray) < len(aliases):
                for alias in stray:
                    client.delete_alias(alias)
                    removed.append(f"removed image alias {alias}")
                continue
            client.delete_image(image["fingerprint"])
            removed.append(f"removed image {image['fingerprint'][:12]} ({', '.join(aliases)})")
    return removed


def _sweep_netns(prefix: str) -> list[str]:
    listing = proc.run(["ip", "-j", "netns", "list"], check=False)
    names = [ns["name"] for ns in json.loads(listing.stdout or "[]")] if listing.ok else []
    removed = []
    for name in names:
        if name.startswith(prefix):
            proc.run(["ip", "netns", "delete", name])
            removed.append(f"removed network namespace {name}")
    return removed


def _sweep_nft(prefix: str) -> list[str]:
    listing = proc.run(["nft", "-j", "list", "tables"])
    removed = []
    for item in json.loads(listing.stdout or "{}").get("nftables", []):
        table = item.get("table")
        if table and table["name"].startswith(prefix):
            proc.run(["nft", "delete", "table", table["family"], table["name"]])
            removed.append(f"removed nft table {table['family']} {table['name']}")
    return removed


def _sweep_incus(kind: str, prefix: str) -> list[str]:
    """Profiles or networks tests made (after the instances, which may have used them)."""
    listing = proc.run(["incus", kind, "list", "--format", "json"], check=False)
    removed = []
    for item in json.loads(listing.stdout or "[]") if listing.ok else []:
        if item["name"].startswith(prefix):
            proc.run(["incus", kind, "delete", item["name"]], check=False)
            removed.append(f"removed {kind} {item['name']}")
    return removed


def sweep_container_files(scope: str = "") -> list[str]:
    """Only the workspace views and session-end lock files of test containers."""
    return [*_sweep_views(INSTANCE_PREFIX + scope), *_sweep_locks(INSTANCE_PREFIX + scope)]


def _sweep_locks(prefix: str) -> list[str]:
    """Session-end lock files of test containers (coi never deletes them itself)."""
    removed = []
    root = Path(locks.SHARED_LOCKS)
    for file in sorted(root.glob(f"{prefix}*.lock")) if root.is_dir() else []:
        file.unlink(missing_ok=True)
        removed.append(f"removed lock file {file.name}")
    return removed


def _sweep_views(prefix: str) -> list[str]:
    """Workspace views (and their empty directories) of test containers."""
    removed = []
    root = Path(views.VIEW_ROOT)
    for folder in sorted(root.glob(f"{prefix}*")) if root.is_dir() else []:
        views.release(folder.name, forget=True)
        removed.append(f"removed workspace view {folder.name}")
    return removed


def _sweep_users(prefix: str) -> list[str]:
    removed = []
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(prefix):
            removed += remove_test_user(entry.pw_name)
    for group in grp.getgrall():  # left when a removal stopped after userdel
        if group.gr_name.startswith(prefix):
            proc.run(["groupdel", group.gr_name])
            removed.append(f"removed group {group.gr_name}")
    return removed


def remove_test_user(name: str) -> list[str]:
    """Remove test account `name`: its processes, subid lines, home, then the account.

    The account goes last, so a removal that stops half-way leaves it for the
    next sweep to find by name. Returns one line per thing removed.
    """
    entry = pwd.getpwnam(name)
    kill_processes_of(entry.pw_uid)
    removed = drop_subid_lines(entry.pw_uid, entry.pw_gid)
    if entry.pw_dir.startswith(HOME_PREFIX) and os.path.isdir(entry.pw_dir):
        shutil.rmtree(entry.pw_dir)
        removed.append(f"removed home {entry.pw_dir}")
    proc.run(["userdel", name])
    with contextlib.suppress(KeyError):  # userdel removes the user's own group itself
        grp.getgrnam(name)
        proc.run(["groupdel", name])
    return [*removed, f"removed user {name} (uid {entry.pw_uid})"]


def kill_processes_of(uid: int, timeout: float = 5.0) -> None:
    """SIGKILL every live process running as `uid` (real, effective or saved), until none is left
    (a dying process may have forked) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while (pids := _live_pids_of(uid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _live_pids_of(uid: int) -> list[int]:
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines()
                          if ":" in line)
        except OSError:  # the process ended while we looked
            continue
        if str(uid) in fields.get("Uid", "").split() and \
                not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(status.parent.name))
    return pids


def drop_subid_lines(uid: int, gid: int, *, subuid: str = idmap.SUBUID,
                     subgid: str = idmap.SUBGID) -> list[str]:
    """Remove the single-id delegations `root:UID:1` (subuid) and `root:GID:1` (subgid)
    that coi's host service or setup granted to a test account; ranges stay."""
    removed = []
    for path, ident in ((subuid, uid), (subgid, gid)):
        file = Path(path)
        if not file.exists():
            continue
        lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
        doomed = {f"{owner}:{ident}:1" for owner in ("root", "0")}
        kept = [line for line in lines if line.strip() not in doomed]
        if len(kept) == len(lines):
            continue
        _replace_file(file, "".join(kept))
        removed += [f"removed {path} line {line.strip()}" for line in lines
                    if line.strip() in doomed]
    return removed


def _replace_file(file: Path, text: str) -> None:
    """Write `text` over `file` atomically, keeping its mode (a reader never sees half)."""
    fd, temp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temp, file.stat().st_mode & 0o7777)
        os.replace(temp, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


class RunLock:
    """The lock a test run holds, shared, for as long as it runs.

    A run that gets it exclusively is the only one on the machine, so every
    `coi-test-*` thing left is a leftover and may be swept; it then shares
    the lock. A run that cannot get it exclusively must not sweep: another
    run's containers are alive.
    """

    def __init__(self, path: Path = LOCK_PATH) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Readable by all, so test runs of different users share one lock.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        self._handle: IO[str] | None = os.fdopen(fd, "r")

    def try_exclusive(self) -> bool:
        """True when no other test run holds the lock (this one now holds it alone)."""
        try:
            fcntl.flock(self._file(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def share(self) -> None:
        """Hold the lock shared (waits while a sweep holds it exclusively)."""
        fcntl.flock(self._file(), fcntl.LOCK_SH)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _file(self) -> IO[str]:
        if self._handle is None:
            raise RuntimeError("the run lock was released")
        return self._handle


def main(argv: list[str] | None = None) -> None:
    from coi_common.entry import Args, run_main  # noqa: PLC0415

    def handler(args: Args) -> int:
        lock = RunLock()
        try:
            if not lock.try_exclusive() and not args["--force"]:
                print("sweep.py: a test run is in progress; not sweeping "
                      "(--force sweeps anyway)", file=sys.stderr)
                return 0
            for line in sweep():
                print(line, flush=True)
        finally:
            lock.release()
        return 0

    run_main("sweep.py", __doc__ or "", handler, argv)


if __name__ == "__main__":
    main()
