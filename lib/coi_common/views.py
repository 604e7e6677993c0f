"""The workspace a session sees: the project, with protected paths read-only and
secret files shown empty, in a way root inside the container cannot undo.

Incus mounts a disk device's source with a plain bind, so mounts on the host
under the source are not seen; with `recursive=true` they are, and the kernel
LOCKS them in the container (they came from a more privileged mount
namespace): root inside cannot unmount them, remount them writable, move
them, or bind the workspace without them (all measured: EINVAL / EPERM).

So before a container starts, a view of the workspace is built on the host
under VIEW_ROOT/<container> (root only: the host service builds it for a
member): a recursive clone of the project, then on it
- every protected path bound onto itself read-only, and every directory
  between it and the workspace bound onto itself writable, because a mount
  point cannot be renamed: without that, `mv .git .git-old` and a fresh
  `.git/hooks` would undo the protection;
- every file whose name matches a mask pattern covered by an empty read-only
  file.
The container starts with the view as its /workspace; the view is detached
from the host right after the start (the container keeps its own copy), so
nothing stays mounted on the host; its empty directory stays until the
container is deleted. The user's own project is never changed, except for
the placeholders coi makes first (coi_shell.placeholders, as the user).

This module is what every side shares: the rules, the view record, the walk
by file descriptors. The mounts themselves are root's:
coi_host.views (the host service for a member, `coi-host view` for root).

Everything inside the project may have been written by the agent: the view is
walked by file descriptors, never by path, and a symbolic link where a
protected path or one of its directories should be is refused, so no mount
ever lands outside the project.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from coi_common import naming
from coi_common.errors import BadInput, CoiError

VIEW_ROOT: Final = "/run/coi/views"
MAX_PATHS: Final = 64
MAX_WALKED: Final = 100_000
"""Masking looks at this many entries at most (then says so): a start stays quick."""
SKIPPED_DIRS: Final = frozenset({".git", "node_modules", ".venv", "venv", "__pycache__",
                                 ".tox", ".mypy_cache", "target"})
"""Trees masking does not enter: tool caches, not where a project keeps its secrets."""

@dataclass(frozen=True)
class View:
    """What a view holds: its path (the disk device's source) and what it covers."""

    source: str
    protected: tuple[str, ...]
    masked: int
    notes: tuple[str, ...] = ()

    def to_record(self) -> dict[str, Any]:
        return {"source": self.source, "protected": list(self.protected),
                "masked": self.masked, "notes": list(self.notes)}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> View:
        """The host service's reply, checked: the source must be a view's path."""
        source, protected = data.get("source"), data.get("protected")
        masked, notes = data.get("masked"), data.get("notes", [])
        if not (is_view_source(source) and isinstance(protected, list)
                and all(isinstance(p, str) for p in protected)
                and isinstance(masked, int) and not isinstance(masked, bool) and masked >= 0
                and isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
            raise CoiError("coi's host service answered view_build with a malformed view")
        naming.validate_container_name(os.path.basename(source))
        return cls(source, tuple(protected), masked, tuple(notes))

    def summary(self) -> str:
        """One line for the user: what is protected and masked."""
        line = (f"{len(self.protected)} paths read-only inside (security.protected_paths), "
                f"{self.masked} secret file{'s' if self.masked != 1 else ''} shown empty "
                "(security.mask; --no-mask shows them)")
        return "; ".join([line, *self.notes])


def is_view_source(source: object) -> bool:
    """Whether a disk device's source is a view's path (VIEW_ROOT/<container>)."""
    return isinstance(source, str) and os.path.dirname(source) == VIEW_ROOT


# -- the rules, shared by the client and the service -------------------------------------------


def check_rules(protect: Sequence[str], mask: Sequence[str]) -> None:
    """Protected paths are relative and plain (a trailing / marks a directory); mask
    patterns are names (no /). BadInput naming the first bad one."""
    if len(protect) > MAX_PATHS or len(mask) > MAX_PATHS:
        raise BadInput(f"at most {MAX_PATHS} protected paths and {MAX_PATHS} mask patterns")
    for path in protect:
        parts = path.rstrip("/").split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise BadInput(f"protected path {path!r} must be relative to the workspace, "
                           "without '.' or '..' (security.protected_paths)")
    for pattern in mask:
        if not pattern.lstrip("!") or "/" in pattern or "\0" in pattern:
            raise BadInput(f"mask pattern {pattern!r} must be a file name pattern "
                           "(security.mask)")


def rules(settings: Any, mask: bool) -> tuple[list[str], list[str]]:
    """The protected paths and mask patterns a session's view follows: the config's,
    none protected when security.protect is off, none masked with --no-mask."""
    protect = list(settings.get("security.protected_paths")) \
        if settings.get("security.protect") else []
    return protect, list(settings.get("security.mask")) if mask else []


def masks(name: str, patterns: Sequence[str]) -> bool:
    """True when a file called `name` is masked: it matches a pattern and no '!' one."""
    if any(fnmatch.fnmatchcase(name, p[1:]) for p in patterns if p.startswith("!")):
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in patterns if not p.startswith("!"))


# -- what each protected path comes down to (as the user: coi_shell.placeholders) ----------


def protected_targets(root: int, protect: Sequence[str]) -> list[str]:
    """What each protected path comes down to in this project: the path itself, or
    the first missing directory above a missing file; .git/... paths become '.git/'
    when there is no .git; paths below a .git FILE (a worktree) become '.git'."""
    targets: list[str] = []
    for path in protect:
        parts = path.rstrip("/").split("/")
        target = path
        for depth in range(1, len(parts)):
            kind = path_kind(root, "/".join(parts[:depth]))
            if kind is None:
                target = "/".join(parts[:depth]) + "/"
                break
            if kind != "dir":
                target = "/".join(parts[:depth])
                break
        if target not in targets:
            targets.append(target)
    return targets


def path_kind(root: int, rel: str) -> str | None:
    """"dir", "file" or None (missing) for `rel` below `root`; a link is refused."""
    try:
        info = os.stat(rel, dir_fd=root, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise link_refused(rel)
    return "dir" if stat.S_ISDIR(info.st_mode) else "file"


def link_refused(rel: str) -> BadInput:
    return BadInput(f"protected path {rel!r} of the workspace is a symbolic link: coi will "
                    "not start a session on it", hint="replace the link with what it points "
                    "to, or set security.protect = false in your own config")


def walk_masked(tree: int, patterns: Sequence[str],
                visit: Callable[[int, str, str], None]) -> bool:
    """visit(folder fd, name, path) for every entry of `tree` not in a directory
    (SKIPPED_DIRS left out) whose name is masked; False when the walk stopped at
    MAX_WALKED entries."""
    if not [p for p in patterns if not p.startswith("!")]:
        return True
    walked = 0
    for top, dirs, files, folder in os.fwalk(".", dir_fd=tree, follow_symlinks=False):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        walked += len(dirs) + len(files)
        for name in files:
            if masks(name, patterns):
                visit(folder, name, os.path.normpath(os.path.join(top, name)))
        if walked > MAX_WALKED:
            return False
    return True


def coverage(workspace: str, protect: Sequence[str], patterns: Sequence[str]) -> str:
    """A digest of what a view of the workspace built now would cover: each protected
    target with its kind, and every file masking would hide. A warm pool's container
    (made earlier) may serve a session only while its view covers what a new one
    would: the digest taken before its view was built must equal the one now."""
    masked: list[str] = []

    def regular(folder: int, name: str, path: str) -> None:
        with contextlib.suppress(OSError):  # gone meanwhile: nothing to hide
            if stat.S_ISREG(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
                masked.append(f"mask {path}")

    with opened(workspace, os.O_PATH | os.O_DIRECTORY) as root:
        protected = [f"protect {target} {path_kind(root, target.rstrip('/'))}"
                     for target in protected_targets(root, protect)]
        complete = walk_masked(root, patterns, regular)
    text = "\n".join([*protected, *sorted(masked), f"complete {complete}"])
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


# -- walking by file descriptor --------------------------------------------------------------------


@contextlib.contextmanager
def opened(path: str, flags: int) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def walk(root: int, parts: list[str]) -> Iterator[int]:
    """A directory fd below `root`, reached without following any link."""
    fd = os.dup(root)
    try:
        for part in parts:
            child = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


