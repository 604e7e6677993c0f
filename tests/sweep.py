"""Remove what crashed test runs left behind, and nothing else.

Usage:
  sweep.py [--force] [--debug]
  sweep.py (-h | --help)

Removes instances named `coi-test-*` (forced), images all of whose aliases
are `coi-test-*` (half-done builds, images tests published), network
namespaces `coi-test-*` and nftables tables `coi_test_*` of any family. The
cached test images `coi-test-image` and `coi-test-full-image` always stay.
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
import json
import os
import sys
from pathlib import Path
from typing import IO, Final

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT / "lib") not in sys.path:
    sys.path.insert(0, str(ROOT / "lib"))

from coi_common import proc  # noqa: E402 - needs the path above when run as a script
from coi_common.errors import NotFound  # noqa: E402
from coi_common.incus import Incus  # noqa: E402

INSTANCE_PREFIX: Final = "coi-test-"
IMAGE_PREFIX: Final = "coi-test-"
KEEP_ALIASES: Final = frozenset({"coi-test-image", "coi-test-full-image"})
NETNS_PREFIX: Final = "coi-test-"
NFT_PREFIX: Final = "coi_test_"
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
            *_sweep_nft(NFT_PREFIX + scope.replace("-", "_"))]


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
