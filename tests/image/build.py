"""Build the small Incus image the real-daemon tests run in, once, and keep it cached.

Usage:
  build.py [--force] [--mirror URI] [--debug]
  build.py (-h | --help)

The image has the alias `coi-test-image` and carries the property
`coi.recipe_hash`: a sha256 over what goes into the image and nothing else:
the overlay files under tests/image/files/, the dummy tool, coi-image's
rootfs recipe (rootfs.recipe()), the package list, the mirror and
IMAGE_VERSION (bump it when the customise steps below change). Paths and
Python bytes are not in it, so a comment or another checkout rebuilds nothing.
When the local image's hash equals the current one, the build prints
"test image up to date" and exits at once. Otherwise it makes an offline
Debian bookworm minbase with coi-image's rootfs module, adds the tool user
`code` (uid 1000, passwordless sudo), tmux, git, curl, the dummy tool and
/workspace, and imports it under a temporary alias; only then does
`coi-test-image` move to it, so a failed build leaves the old image usable.
Needs root.

Options:
  --force       Build even when the image is up to date.
  --mirror URI  Debian mirror for debootstrap (default: the host's main archive).
  --debug       Show tracebacks on errors.
  -h --help     Show this help.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

RECIPE_DIR: Final = Path(__file__).resolve().parent
ROOT: Final = RECIPE_DIR.parent.parent
sys.path[:0] = [str(ROOT / "lib"), str(ROOT / "coi-image")]

from coi_common.apt_sources import host_archive  # noqa: E402 - needs the path above
from coi_common.entry import Args, run_main  # noqa: E402
from coi_common.incus import Incus  # noqa: E402
from coi_common.progress import Progress  # noqa: E402
from coi_image import aliases, rootfs  # noqa: E402

ALIAS: Final = "coi-test-image"
TMP_PREFIX: Final = "coi-test-"
SUITE: Final = "bookworm"
PACKAGES: Final = (*rootfs.BASE_PACKAGES, "tmux", "git", "curl")
DUMMY_TOOL: Final = ROOT / "lib" / "coi_common" / "tools" / "dummy"
OVERLAY_DIR: Final = RECIPE_DIR / "files"
IMAGE_VERSION: Final = 2
"""Bump by hand when customise() or the image's properties change."""
LOG_PATH: Final = Path("/var/tmp/coi-test-image-build.log")
LOCK_PATH: Final = Path("/run/lock/coi-test-image-build.lock")
UID: Final = 1000
# Overlay files whose mode is not 0644 (path relative to files/).
MODES: Final = {"etc/sudoers.d/code": 0o440}


def main(argv: list[str] | None = None) -> None:
    run_main("build.py", __doc__ or "", build, argv)


def build(args: Args) -> int:
    """Check the cached image; build and import a new one when its recipe changed."""
    mirror = args["--mirror"] or debian_mirror()
    client = Incus()
    wanted = recipe_hash(mirror)
    if not args["--force"] and image_hash(client) == wanted:
        print("test image up to date")
        return 0
    rootfs.require_root("building the test image")
    with build_lock():
        # Another build may have finished while this one waited for the lock.
        if not args["--force"] and image_hash(client) == wanted:
            print("test image up to date")
            return 0
        progress = Progress("build.py", 4)
        fingerprint = build_image(client, mirror, wanted, progress)
    size = int((client.image_by_alias(ALIAS) or {}).get("size", 0))
    print(f"test image built: {ALIAS} {fingerprint[:12]} ({size / 2**20:.0f} MiB) "
          f"in {progress.elapsed():.0f}s")
    return 0


def debian_mirror(sources: Path | None = None) -> str:
    """The mirror debootstrap uses: the host's main Debian archive."""
    return (host_archive(sources) if sources else host_archive()).uri


def recipe_files() -> list[tuple[str, Path]]:
    """(label, path) of every file the image is made from, in a stable order."""
    found = [(str(p.relative_to(OVERLAY_DIR)), p) for p in sorted(OVERLAY_DIR.rglob("*"))
             if p.is_file()]
    return [*found, ("dummy", DUMMY_TOOL)]


def recipe_hash(mirror: str) -> str:
    """sha256 over the recipe files (names and contents), the packages and the mirror."""
    digest = hashlib.sha256()
    for label, path in recipe_files():
        digest.update(f"file {label} {path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    digest.update(f"packages {','.join(PACKAGES)}\0mirror {mirror}\0".encode())
    digest.update(f"image {IMAGE_VERSION}\0{rootfs.recipe()}".encode())
    return digest.hexdigest()


def image_hash(client: Incus) -> str | None:
    """The recipe hash the current test image was built from, or None without one."""
    image = client.image_by_alias(ALIAS)
    return (image or {}).get("properties", {}).get("coi.recipe_hash")


def build_image(client: Incus, mirror: str, recipe: str, progress: Progress) -> str:
    """debootstrap, customise, pack, import under a temporary alias, move ALIAS."""
    LOG_PATH.write_text(f"coi test image build, recipe {recipe}\n", encoding="utf-8")
    log = str(LOG_PATH)
    with rootfs.work_dir("coi-test-image-build-") as work, \
            aliases.staged(client, ALIAS, TMP_PREFIX) as tmp_alias:
        tree = work / "rootfs"
        with progress.step(f"debootstrap {SUITE} from {mirror} (log: {LOG_PATH})"):
            rootfs.debootstrap(tree, SUITE, mirror, PACKAGES, log)
        with progress.step("customise (user code, sudo, dummy, networking)"):
            customise(tree, log)
        with progress.step("pack"):
            meta, tarball = rootfs.pack(work, tree, {
                "description": "coi test image (Debian bookworm minbase)", "os": "debian",
                "release": SUITE, "coi.recipe_hash": recipe, "coi.test_image": "true",
                aliases.STAGED_AS: tmp_alias})
        with progress.step(f"import as {tmp_alias}, then move {ALIAS}"):
            aliases.import_tarballs(client, meta, tarball, tmp_alias)
            return aliases.swap_alias(client, tmp_alias, ALIAS)


def customise(tree: Path, log: str) -> None:
    """The overlay files, user `code`, the dummy tool, /workspace, then the base touches."""
    overlay = RECIPE_DIR / "files"
    for source in sorted(overlay.rglob("*")):
        if source.is_file():
            relative = str(source.relative_to(overlay))
            target = tree / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            os.chown(target, 0, 0)
            target.chmod(MODES.get(relative, 0o644))
    dummy = tree / "usr/local/bin/dummy"
    shutil.copyfile(DUMMY_TOOL, dummy)
    dummy.chmod(0o755)
    for argv in (["groupadd", "--gid", str(UID), "code"],
                 ["useradd", "--uid", str(UID), "--gid", str(UID), "--create-home",
                  "--home-dir", "/home/code", "--shell", "/bin/bash", "code"],
                 ["visudo", "--check", "--file", "/etc/sudoers.d/code"]):
        rootfs.in_chroot(tree, argv, log)
    workspace = tree / "workspace"
    workspace.mkdir(exist_ok=True)
    os.chown(workspace, UID, UID)
    rootfs.prepare_base(tree, log)


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One build at a time on this machine; a second waits for the first."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_PATH.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("build.py: waiting for another build of the test image", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


if __name__ == "__main__":
    main()
