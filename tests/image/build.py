"""Build the small Incus image the real-daemon tests run in, once, and keep it cached.

Usage:
  build.py [--force] [--mirror URI] [--debug]
  build.py (-h | --help)

The image has the alias `coi-test-image` and carries the property
`coi.recipe_hash`: a sha256 over this script, every file under tests/image/,
the dummy tool's script, the package list and the mirror. When the local
image's hash equals the current one, the build prints "test image up to date"
and exits 0 at once. Otherwise it debootstraps a Debian bookworm minbase
rootfs, adds the tool user `code` (uid 1000, passwordless sudo), ifupdown +
dhclient for eth0, the dummy tool and /workspace, packs it and imports it
under a temporary alias `coi-test-tmp-<random>`. Only when the import has
succeeded does `coi-test-image` move to the new image, so a failed or
interrupted build leaves the previous image usable. Needs root.

Options:
  --force       Build even when the image is up to date.
  --mirror URI  Debian mirror for debootstrap (default: the first URI of the
                first non-security stanza of /etc/apt/sources.list.d/debian.sources).
  --debug       Show tracebacks on errors.
  -h --help     Show this help.

Example:
  sudo .venv/bin/python tests/image/build.py
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

RECIPE_DIR: Final = Path(__file__).resolve().parent
ROOT: Final = RECIPE_DIR.parent.parent
sys.path.insert(0, str(ROOT / "lib"))

from coi_common import proc  # noqa: E402 - needs the path above when run as a script
from coi_common.entry import Args, run_main  # noqa: E402
from coi_common.errors import CoiError, CommandFailed, PermissionDenied  # noqa: E402
from coi_common.incus import Incus  # noqa: E402

ALIAS: Final = "coi-test-image"
TMP_ALIAS_PREFIX: Final = "coi-test-tmp-"
SUITE: Final = "bookworm"
PACKAGES: Final = ("systemd", "systemd-sysv", "dbus", "sudo", "tmux", "git", "curl",
                   "ca-certificates", "iproute2", "ifupdown", "isc-dhcp-client", "procps")
SOURCES_FILE: Final = Path("/etc/apt/sources.list.d/debian.sources")
FALLBACK_MIRROR: Final = "http://deb.debian.org/debian"
DUMMY_TOOL: Final = ROOT / "lib" / "coi_common" / "tools" / "dummy"
WORK_PARENT: Final = "/var/tmp"
WORK_PREFIX: Final = "coi-test-image-build-"
LOG_PATH: Final = Path(WORK_PARENT) / "coi-test-image-build.log"
"""The last build's full output; outside the work dir so it survives a failure."""
LOCK_PATH: Final = Path("/run/lock/coi-test-image-build.lock")
USER: Final = "code"
UID: Final = 1000
# Overlay files whose mode is not 0644 (path relative to files/).
MODES: Final = {"etc/sudoers.d/code": 0o440}
TEMPLATES: Final = {"/etc/hostname": "hostname.tpl", "/etc/hosts": "hosts.tpl"}
# Emptied after the install: the image needs no package lists, caches, docs or logs.
PRUNE: Final = ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man",
                "usr/share/info", "usr/share/locale")
KEEP: Final = frozenset({"usr/share/locale/locale.alias"})
TAIL_LINES: Final = 20


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
    if os.geteuid() != 0:
        raise PermissionDenied("building the test image needs root (debootstrap, chroot)",
                               hint="run: sudo make test-image")
    with build_lock():
        # Another build may have finished while this one waited for the lock.
        if not args["--force"] and image_hash(client) == wanted:
            print("test image up to date")
            return 0
        fingerprint, seconds = Builder(client, mirror, wanted).run()
    info = client.image_by_alias(ALIAS) or {}
    size = int(info.get("size", 0))
    print(f"test image built: {ALIAS} {fingerprint[:12]} ({size / 2**20:.0f} MiB) "
          f"in {seconds:.0f}s")
    return 0


# -- the recipe ----------------------------------------------------------------------


def debian_mirror(sources: Path = SOURCES_FILE) -> str:
    """The first URI of the first deb822 `deb` stanza that is not for security updates."""
    try:
        text = sources.read_text(encoding="utf-8")
    except OSError:
        return FALLBACK_MIRROR
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            # Comments, and continuation lines of multi-line fields (an inline key).
            if line.startswith(("#", " ", "\t")) or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        uris = fields.get("uris", "").split()
        if ("deb" in fields.get("types", "").split() and uris
                and "security" not in fields.get("suites", "") and "security" not in uris[0]
                and fields.get("enabled", "yes").lower() != "no"):
            return uris[0]
    return FALLBACK_MIRROR


def recipe_files() -> list[tuple[str, Path]]:
    """(label, path) of every file the image is made from, in a stable order."""
    found = [(str(p.relative_to(RECIPE_DIR)), p) for p in sorted(RECIPE_DIR.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts]
    return [*found, ("dummy", DUMMY_TOOL)]


def recipe_hash(mirror: str) -> str:
    """sha256 over the recipe files (names and contents), the packages and the mirror."""
    digest = hashlib.sha256()
    for label, path in recipe_files():
        digest.update(f"file {label} {path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    digest.update(f"packages {','.join(PACKAGES)}\0mirror {mirror}\0".encode())
    return digest.hexdigest()


def image_hash(client: Incus) -> str | None:
    """The recipe hash the current test image was built from, or None without one."""
    image = client.image_by_alias(ALIAS)
    return (image or {}).get("properties", {}).get("coi.recipe_hash")


# -- building ------------------------------------------------------------------------------


class Builder:
    """One build: a work dir, debootstrap, customising, packing, importing, the alias swap."""

    def __init__(self, client: Incus, mirror: str, recipe: str) -> None:
        self.client = client
        self.mirror = mirror
        self.recipe = recipe
        self.started = time.monotonic()
        self.steps = 5
        self.step = 0

    def progress(self, text: str) -> None:
        self.step += 1
        print(f"build.py: [{self.step}/{self.steps}] {text} "
              f"({time.monotonic() - self.started:.1f}s)", file=sys.stderr, flush=True)

    def run(self) -> tuple[str, float]:
        """Build and import; return the new image's fingerprint and the seconds it took."""
        LOG_PATH.write_text(f"coi test image build, recipe {self.recipe}\n", encoding="utf-8")
        tmp_alias = TMP_ALIAS_PREFIX + secrets.token_hex(4)
        work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=WORK_PARENT))
        try:
            rootfs = work / "rootfs"
            self.progress(f"debootstrap {SUITE} from {self.mirror} (log: {LOG_PATH})")
            self.debootstrap(rootfs)
            self.progress("customise the rootfs (user code, sudo, ifupdown, dummy)")
            customise(rootfs, self.log)
            self.progress("pack rootfs and metadata")
            meta, tarball = pack(work, rootfs, self.recipe)
            self.progress(f"import as {tmp_alias}")
            self.client.cli(["image", "import", str(meta), str(tarball), "--alias", tmp_alias],
                            timeout=600)
            self.progress(f"move alias {ALIAS} to the new image")
            fingerprint = swap_alias(self.client, tmp_alias)
        finally:
            remove_tree(work)
            _drop_tmp_alias(self.client, tmp_alias)
        return fingerprint, time.monotonic() - self.started

    def log(self, result: proc.Result) -> None:
        with LOG_PATH.open("a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(result.argv)}\n{result.stdout}{result.stderr}")

    def debootstrap(self, rootfs: Path) -> None:
        """Run debootstrap with its output in the log; on failure show the log's tail."""
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                SUITE, str(rootfs), self.mirror]
        status = run_logged(argv, LOG_PATH)
        if status != 0:
            lines = LOG_PATH.read_text(encoding="utf-8", errors="replace").splitlines()
            print("\n".join(lines[-TAIL_LINES:]), file=sys.stderr)
            raise CommandFailed(f"debootstrap exited {status}", hint=f"full log: {LOG_PATH}")


def run_logged(argv: Sequence[str], log_path: Path) -> int:
    """Run a long program with its output appended to log_path; return its status.

    The program gets a session of its own so that an interrupted build stops
    it and every child it started (debootstrap runs dpkg, wget, chroot); it is
    asked with SIGTERM first so that debootstrap's exit trap can unmount what
    it mounted in the target.
    """
    import subprocess  # noqa: PLC0415 - only builds stream into a log

    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        child = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return child.wait()
        except BaseException:
            _stop_group(child)
            raise


def _stop_group(child: Any) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        with contextlib.suppress(Exception):
            child.wait(timeout=grace)
            return


def customise(rootfs: Path, log: Any) -> None:
    """Turn the debootstrapped tree into the test image: files, user, services, pruning."""
    for source in sorted((RECIPE_DIR / "files").rglob("*")):
        if source.is_file():
            relative = str(source.relative_to(RECIPE_DIR / "files"))
            target = rootfs / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            os.chown(target, 0, 0)
            target.chmod(MODES.get(relative, 0o644))
    dummy = rootfs / "usr/local/bin/dummy"
    shutil.copyfile(DUMMY_TOOL, dummy)
    dummy.chmod(0o755)
    for argv in (["groupadd", "--gid", str(UID), USER],
                 ["useradd", "--uid", str(UID), "--gid", str(UID), "--create-home",
                  "--home-dir", f"/home/{USER}", "--shell", "/bin/bash", USER],
                 ["systemctl", "enable", "networking.service"],
                 ["visudo", "--check", "--file", "/etc/sudoers.d/code"]):
        log(proc.run(["chroot", str(rootfs), *argv], timeout=120))
    workspace = rootfs / "workspace"
    workspace.mkdir(exist_ok=True)
    os.chown(workspace, UID, UID)
    # Every container must get its own machine id at first boot, not share this one.
    (rootfs / "etc/machine-id").write_text("", encoding="utf-8")
    dbus_id = rootfs / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    prune(rootfs)


def prune(rootfs: Path) -> None:
    """Empty the PRUNE folders (apt recreates what it needs) and drop install logs."""
    for relative in PRUNE:
        for entry in (rootfs / relative).iterdir():
            if str(entry.relative_to(rootfs)) in KEEP:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for entry in (rootfs / "var/log").iterdir():
        if entry.is_file():
            entry.unlink()


def pack(work: Path, rootfs: Path, recipe: str) -> tuple[Path, Path]:
    """The metadata tarball (metadata.yaml + templates) and the rootfs tarball."""
    if _mounts_under(rootfs):
        raise CoiError(f"something is still mounted under {rootfs}; not packing it")
    meta_dir = work / "meta"
    (meta_dir / "templates").mkdir(parents=True)
    for template in TEMPLATES.values():
        shutil.copyfile(RECIPE_DIR / "templates" / template, meta_dir / "templates" / template)
    (meta_dir / "metadata.yaml").write_text(metadata_yaml(recipe), encoding="utf-8")
    meta = work / "metadata.tar.gz"
    proc.run(["tar", "--numeric-owner", "-C", str(meta_dir), "-czf", str(meta),
              "metadata.yaml", "templates"])
    # zstd with all cores packs ~4x faster than gzip; Incus unpacks it natively.
    tarball = work / "rootfs.tar.zst"
    proc.run(["tar", "--numeric-owner", "--one-file-system", "-I", "zstd -T0 -3",
              "-C", str(rootfs), "-cf", str(tarball), "."], timeout=900)
    return meta, tarball


def metadata_yaml(recipe: str) -> str:
    """metadata.yaml of the image; every value is quoted so YAML keeps it a string."""
    lines = [f'architecture: "{platform.machine()}"',
             f"creation_date: {int(time.time())}",
             "properties:",
             '  description: "coi test image (Debian bookworm minbase)"',
             '  os: "debian"',
             f'  release: "{SUITE}"',
             f'  coi.recipe_hash: "{recipe}"',
             '  coi.test_image: "true"',
             "templates:"]
    for path, template in TEMPLATES.items():
        lines += [f'  "{path}":', "    when: [create, copy]", f'    template: "{template}"']
    return "\n".join(lines) + "\n"


def swap_alias(client: Incus, tmp_alias: str) -> str:
    """Point ALIAS at the image imported under tmp_alias; delete the image it left.

    An existing alias is re-pointed in one request, so there is no moment
    without a usable `coi-test-image`; only then is the old image deleted.
    """
    new = client.image_by_alias(tmp_alias)
    if new is None:
        raise CoiError(f"the import did not create image alias {tmp_alias}")
    old = client.image_by_alias(ALIAS)
    if old is None:
        client.rename_alias(tmp_alias, ALIAS)
        return new["fingerprint"]
    client.point_alias(ALIAS, new["fingerprint"])
    client.delete_alias(tmp_alias)
    if old["fingerprint"] != new["fingerprint"]:
        client.delete_image(old["fingerprint"])
    return new["fingerprint"]


def _drop_tmp_alias(client: Incus, tmp_alias: str) -> None:
    """After a failed build: delete the half-way image, if the import got that far.

    If ALIAS already points at it (the swap failed after re-pointing), only
    the temporary alias goes.
    """
    with contextlib.suppress(CoiError):
        image = client.image_by_alias(tmp_alias)
        if image is None:
            return
        current = client.image_by_alias(ALIAS)
        if current is not None and current["fingerprint"] == image["fingerprint"]:
            client.delete_alias(tmp_alias)
        else:
            client.delete_image(image["fingerprint"])


# -- host helpers --------------------------------------------------------------------------------


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


def _mounts_under(path: Path) -> list[str]:
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
    """Remove the work dir, unmounting first what an interrupted debootstrap left mounted.

    rmtree must never run while a mount is left under it: debootstrap may
    bind-mount the host's /dev/pts and /dev/shm into the target.
    """
    if not work.exists():
        return
    for point in _mounts_under(work):
        proc.run(["umount", "--lazy", point], check=False)
    left = _mounts_under(work)
    if left:
        print(f"build.py: NOT removing {work}: still mounted: {', '.join(left)}",
              file=sys.stderr)
        return
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
