"""`coi file push|pull`: copy files and directories between the host and a container.

The copies behave like cp: a destination that is an existing directory, or
ends with '/', receives the copy under its own name; any other destination
is the copy's name. The bytes go through `incus file push/pull` (Incus.cli).

A push gives what it copies to user `code` (uid/gid 1000 inside, or --uid
and --gid), whatever the host owner: a session container maps its `code` to
the host user, so files pushed into /workspace stay the user's on the host,
and `code` can change them. Files keep their mode unless --mode; directories
keep theirs; missing parents are made 0755. `incus file push -r` takes
neither an owner nor a mode, so a tree is copied directory by directory:
each directory made with its mode and the owner, then its files pushed into
it in one call, its symbolic links made as links. Devices, FIFOs and sockets
are skipped (and counted in the result line).

A pull lands in a staging directory next to the destination and is then
renamed into place, so a failed pull leaves nothing half-written, a file is
replaced atomically, and a directory never merges into an existing one. What
the container sends is hostile: only regular files and directories come out
(links, FIFOs and devices are dropped), and a copy that grows past 8 GiB or
never ends is stopped.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from coi_common import incus, proc
from coi_common.entry import Args
from coi_common.errors import (
    AlreadyExists,
    BadInput,
    CoiError,
    NotFound,
    PermissionDenied,
    UsageError,
)
from coi_common.naming import validate_container_name
from coi_common.tools import TOOL_UID
from coi_container import lifecycle

REMOTE_EXAMPLE: Final = "e.g. my-container:/workspace/file"
RECURSIVE_HINT: Final = "use -r to copy a directory"
ARGV_BUDGET: Final = 64 * 1024
"""Characters of source paths per `incus file push` call, far below ARG_MAX."""
STAGING_PREFIX: Final = ".coi-pull-"
ID_PATTERN: Final = re.compile(r"[0-9]{1,10}")
ID_CEILING: Final = 2**32 - 2
"""The largest uid or gid a Linux file can have ((uid_t)-1 means "unchanged")."""
MODE_PATTERN: Final = re.compile(r"0?[0-7]{3}")


@dataclass(frozen=True)
class Ownership:
    """Who owns what a push makes, and the files' mode (None: each file keeps its own)."""

    uid: int = TOOL_UID
    gid: int = TOOL_UID
    mode: str | None = None

    def flags(self) -> list[str]:
        """The `incus file push` flags for a file."""
        mode = ["--mode", self.mode] if self.mode else []
        return ["--uid", str(self.uid), "--gid", str(self.gid), *mode]

    @classmethod
    def from_args(cls, args: Args) -> Ownership:
        """--uid N, --gid N (default: the --uid value) and --mode MODE, validated."""
        uid = _id_option("--uid", args["--uid"], TOOL_UID)
        gid = _id_option("--gid", args["--gid"], uid)
        mode = args["--mode"]
        if mode is not None and not MODE_PATTERN.fullmatch(mode):
            raise BadInput(f"--mode {mode!r}: expected an octal mode such as 0644")
        return cls(uid, gid, None if mode is None else f"{int(mode, 8):04o}")


def _id_option(flag: str, value: str | None, default: int) -> int:
    if value is None:
        return default
    if not ID_PATTERN.fullmatch(value) or int(value) > ID_CEILING:
        raise BadInput(f"{flag} {value!r}: expected a numeric id from 0 to {ID_CEILING}")
    return int(value)


@dataclass(frozen=True)
class Remote:
    """NAME:PATH on the command line: a container and an absolute path in it."""

    name: str
    path: str
    into: bool
    """The path ended with '/': it is a directory that receives the copy."""

    def __str__(self) -> str:
        return f"{self.name}:{self.path}"


def run(args: Args) -> int:
    """Run `file push` or `file pull`; print the one-line result, return 0."""
    recursive = bool(args["--recursive"])
    if args["push"]:
        owner = Ownership.from_args(args)
        remote = parse_remote(args["<name:path>"], "destination")
        line = push(lifecycle.client(), args["<source>"], remote, recursive=recursive,
                    owner=owner)
    else:
        remote = parse_remote(args["<name:path>"], "source")
        line = pull(lifecycle.client(), remote, args["<target>"], recursive=recursive)
    print(line, flush=True)
    return 0


def parse_remote(value: str, role: str) -> Remote:
    """NAME:PATH split at the first ':'; the name validated, the path absolute."""
    name, colon, path = value.partition(":")
    if not colon:
        raise UsageError(f"{role} {value!r} is not NAME:PATH", hint=REMOTE_EXAMPLE)
    if not name:
        raise BadInput(f"{role} {value!r} has no container name before ':'",
                       hint=REMOTE_EXAMPLE)
    validate_container_name(name)
    if not path.startswith("/"):
        raise BadInput(f"{role} {value!r}: the path in the container must be absolute",
                       hint=REMOTE_EXAMPLE)
    normal = lifecycle.container_path(path, what=f"{role} path")
    return Remote(name, normal, into=path.endswith("/") or normal == "/")


# -- push ----------------------------------------------------------------------------------


def push(client: incus.Incus, source: str, remote: Remote, *, recursive: bool,
         owner: Ownership | None = None) -> str:
    """Copy the host file (directory with recursive) `source` into the container,
    owned by `owner` (default: code, 1000:1000)."""
    owner = owner or Ownership()
    if not source:
        raise BadInput("host path '' is not a usable path")
    if not os.path.exists(source):
        raise NotFound(f"host path {source!r} does not exist")
    is_dir = os.path.isdir(source)
    if is_dir and not recursive:
        raise UsageError(f"{source!r} is a directory", hint=RECURSIVE_HINT)
    lifecycle.require(client, remote.name)
    base = os.path.basename(os.path.normpath(os.path.abspath(source)))
    target = remote.path
    if base and (remote.into or client.file_type(remote.name, remote.path) == "directory"):
        target = posixpath.join(remote.path, base)
    skipped = 0
    if is_dir:
        skipped = _push_directory(client, source, remote.name, target, owner)
    else:
        client.cli(["file", "push", "--quiet", "--create-dirs", *owner.flags(), source,
                    f"{client.ref(remote.name)}{target}"])
    note = f" (skipped {skipped} device, FIFO or socket file{'s' * (skipped != 1)})" \
        if skipped else ""
    return f"pushed {source} to {remote.name}:{target}{note}"


def _push_directory(client: incus.Incus, source: str, name: str, target: str,
                    owner: Ownership) -> int:
    """Make `target` a copy of the directory `source`, top-down: each directory with
    its own mode and `owner`, then its files in batched pushes, its links as links.
    Returns how many special files (devices, FIFOs, sockets) were skipped."""
    skipped = 0
    ids = ["--uid", str(owner.uid), "--gid", str(owner.gid)]
    for here, dirs, files in os.walk(source):
        there = posixpath.normpath(posixpath.join(target, os.path.relpath(here, source)))
        mode = f"{stat.S_IMODE(os.stat(here).st_mode):04o}"
        client.cli(["file", "create", "--quiet", "--create-dirs", "--type", "directory",
                    "--mode", mode, *ids, f"{client.ref(name)}{there}"])
        regular = []
        for entry in sorted(files + dirs):
            path = os.path.join(here, entry)
            kind = os.lstat(path).st_mode
            if stat.S_ISLNK(kind):
                client.cli(["file", "create", "--quiet", "--type", "symlink", *ids,
                            f"{client.ref(name)}{posixpath.join(there, entry)}",
                            os.readlink(path)])
            elif stat.S_ISREG(kind):
                regular.append(path)
            elif not stat.S_ISDIR(kind):
                skipped += 1
        for batch in batches(regular, ARGV_BUDGET):
            client.cli(["file", "push", "--quiet", *owner.flags(), *batch,
                        f"{client.ref(name)}{there.rstrip('/')}/"])
    return skipped


def batches(items: Sequence[str], budget: int) -> Iterator[list[str]]:
    """Consecutive groups of items whose lengths add up to at most `budget` (an item
    longer than that alone in its group), so no command line grows too long."""
    group: list[str] = []
    size = 0
    for item in items:
        if group and size + len(item) + 1 > budget:
            yield group
            group, size = [], 0
        group.append(item)
        size += len(item) + 1
    if group:
        yield group


# -- pull ----------------------------------------------------------------------------------


def pull(client: incus.Incus, remote: Remote, target: str, *, recursive: bool) -> str:
    """Copy a file (directory with recursive) out of the container to `target`."""
    lifecycle.require(client, remote.name)
    kind = client.file_type(remote.name, remote.path)
    if kind is None:
        raise NotFound(f"{remote} does not exist")
    if kind == "directory" and not recursive:
        raise UsageError(f"{remote} is a directory", hint=RECURSIVE_HINT)
    if kind not in ("file", "directory"):
        raise BadInput(f"{remote} is a {kind}; pull the file or directory it points to")
    base = posixpath.basename(remote.path)
    if not base:
        raise BadInput("cannot pull the whole file system; name a directory in it")
    if not target:
        raise BadInput("the host destination is empty")
    dest = target
    if target.endswith("/") or os.path.isdir(target):
        dest = os.path.join(target, base)
    dest = os.path.abspath(dest)
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise AlreadyExists(f"{dest!r} is an existing directory",
                            hint="remove it or choose another name")
    if kind == "directory" and os.path.lexists(dest):
        raise AlreadyExists(f"{dest!r} already exists", hint="remove it or choose another name")
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        _pull_via_staging(client, remote, kind, parent, dest)
    except PermissionError as exc:
        raise PermissionDenied(f"cannot write {exc.filename or dest!r}: permission denied") \
            from None
    except OSError as exc:
        raise CoiError(f"cannot write {exc.filename or dest!r}: {exc.strerror}") from None
    return f"pulled {remote} to {dest}"


def _pull_via_staging(client: incus.Incus, remote: Remote, kind: str, parent: str,
                      dest: str) -> None:
    """Pull into a fresh directory in `parent`, then rename the result to `dest`
    (same file system, so the rename is atomic); the staging directory always goes.

    What the container sends is hostile: the pull is stopped when the staging
    directory grows past PULL_MAX_BYTES or the copy runs PULL_SECONDS (a FIFO or a
    device there would never end), and before the rename everything in it that is
    not a regular file or a directory (links, FIFOs, devices) is removed, so a pull
    never creates a link to a host path, nor a special file.
    """
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent)
    try:
        flags = ["--recursive"] if kind == "directory" else []
        _bounded(client.cli_argv(["file", "pull", "--quiet", *flags,
                                  f"{client.ref(remote.name)}{remote.path}",
                                  staging + "/"]),
                 staging, remote)
        pulled = os.path.join(staging, posixpath.basename(remote.path))
        top = os.lstat(pulled) if os.path.lexists(pulled) else None
        if top is None:
            raise CoiError(f"Incus copied nothing from {remote}")
        if not (stat.S_ISREG(top.st_mode) or stat.S_ISDIR(top.st_mode)):
            raise BadInput(f"{remote} turned into a link or special file during the copy; "
                           "nothing was written")
        _drop_special(pulled)
        os.replace(pulled, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


PULL_MAX_BYTES: Final = 8 << 30
PULL_SECONDS: Final = 3600
PULL_IDLE_SECONDS: Final = 20
"""A pull that writes nothing for this long is stuck (a FIFO with no writer) and stopped."""


def _bounded(argv: list[str], staging: str, remote: Remote) -> None:
    """Run the pull, watching how much it has written; stop it past the bounds."""
    child = proc.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + PULL_SECONDS
    size, grew = 0, time.monotonic()
    try:
        while child.poll() is None:
            now, seen = time.monotonic(), _tree_bytes(staging)
            size, grew = (seen, now) if seen != size else (size, grew)
            if seen > PULL_MAX_BYTES or now > deadline or now - grew > PULL_IDLE_SECONDS:
                proc.stop_group(child)
                raise BadInput(f"{remote}: the copy grew past {PULL_MAX_BYTES >> 30} GiB or "
                               f"stalled for {PULL_IDLE_SECONDS} s (a FIFO or a device in "
                               "it?); nothing was written")
            time.sleep(0.2)
    except BaseException:
        proc.stop_group(child)
        raise
    errors = child.stderr.read().decode("utf-8", "replace") if child.stderr else ""
    if child.returncode != 0:
        raise CoiError(f"incus file pull of {remote} failed: "
                       f"{proc.last_line(errors) or 'exit ' + str(child.returncode)}")


def _tree_bytes(folder: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _drop_special(top: str) -> None:
    """Remove every entry under `top` that is neither a regular file nor a directory."""
    if not os.path.isdir(top) or os.path.islink(top):
        return
    for root, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                os.unlink(path)
        dirs[:] = [d for d in dirs if os.path.isdir(os.path.join(root, d))
                   and not os.path.islink(os.path.join(root, d))]
