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
container is deleted (release()). The user's own project is never changed,
except for the placeholders coi makes first (placeholders()).

Everything inside the project may have been written by the agent: the view is
walked by file descriptors, never by path, and a symbolic link where a
protected path or one of its directories should be is refused, so no mount
ever lands outside the project.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from coi_common import naming
from coi_common.errors import BadInput, CoiError

VIEW_ROOT: Final = "/run/coi/views"
EMPTY_FILE: Final = "/run/coi/empty"
MAX_PATHS: Final = 64
MAX_MASKED: Final = 256
MAX_WALKED: Final = 100_000
"""Masking looks at this many entries at most (then says so): a start stays quick."""
SKIPPED_DIRS: Final = frozenset({".git", "node_modules", ".venv", "venv", "__pycache__",
                                 ".tox", ".mypy_cache", "target"})
"""Trees masking does not enter: tool caches, not where a project keeps its secrets."""
PLACEHOLDER_TEXT: Final = {".json": b"{}\n", "commondir": b".\n"}
"""What a placeholder file holds, by extension or name: `{}` is valid JSON, and a
commondir of "." names the repository itself (git behaves as without one, measured)."""

# The new mount API (same numbers on every architecture since Linux 5.2/5.12).
SYS_OPEN_TREE: Final = 428
SYS_MOVE_MOUNT: Final = 429
SYS_MOUNT_SETATTR: Final = 442
OPEN_TREE_CLONE: Final = 1
AT_EMPTY_PATH: Final = 0x1000
AT_RECURSIVE: Final = 0x8000
MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4
MOVE_MOUNT_T_EMPTY_PATH: Final = 0x40
MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 2

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


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


def masks(name: str, patterns: Sequence[str]) -> bool:
    """True when a file called `name` is masked: it matches a pattern and no '!' one."""
    if any(fnmatch.fnmatchcase(name, p[1:]) for p in patterns if p.startswith("!")):
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in patterns if not p.startswith("!"))


# -- placeholders (run as the user, in the user's own project) ---------------------------------


def placeholders(workspace: str, protect: Sequence[str], owner: tuple[int, int] | None
                 ) -> list[str]:
    """What to protect in this project (protected_targets), after making the missing
    ones, so the agent cannot create them later: an empty directory, or for a
    missing file an empty one (`{}` for JSON). Where the directory holding a
    missing file is missing too, that directory is the placeholder (and is what is
    protected), as empty directories stay out of `git status`. Nothing is made
    inside a missing .git except .git itself, and no file at the top (.coi.toml,
    .mcp.json would show in `git status`; their readers gate them: coi trust,
    Claude Code's approval). `owner` (uid, gid) gets what root makes for a user.
    The result goes to build() as is: decided once, before anything was made."""
    with _opened(workspace, os.O_PATH | os.O_DIRECTORY) as root:
        targets = protected_targets(root, protect)
        for target in targets:
            try:
                _make(root, target, owner)
            except OSError as exc:
                raise BadInput(f"cannot make the placeholder {target!r} in {workspace}: "
                               f"{exc.strerror}", hint="make it yourself, or set "
                               "security.protect = false in your own config") from None
    return targets


def protected_targets(root: int, protect: Sequence[str]) -> list[str]:
    """What each protected path comes down to in this project: the path itself, or
    the first missing directory above a missing file; .git/... paths become '.git/'
    when there is no .git; paths below a .git FILE (a worktree) become '.git'."""
    targets: list[str] = []
    for path in protect:
        parts = path.rstrip("/").split("/")
        target = path
        for depth in range(1, len(parts)):
            kind = _kind(root, "/".join(parts[:depth]))
            if kind is None:
                target = "/".join(parts[:depth]) + "/"
                break
            if kind != "dir":
                target = "/".join(parts[:depth])
                break
        if target not in targets:
            targets.append(target)
    return targets


def _kind(root: int, rel: str) -> str | None:
    try:
        info = os.stat(rel, dir_fd=root, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise _link_refused(rel)
    return "dir" if stat.S_ISDIR(info.st_mode) else "file"


def _make(root: int, target: str, owner: tuple[int, int] | None) -> None:
    rel = target.rstrip("/")
    if _kind(root, rel) is not None or ("/" not in rel and not target.endswith("/")):
        return  # there, or a top-level file (.coi.toml): its reader gates it (coi trust)
    parent, _, name = rel.rpartition("/")
    with _walk(root, parent.split("/") if parent else []) as folder:
        try:
            _create(folder, name, directory=target.endswith("/"))
        except FileExistsError:
            return  # a concurrent coi of the same project made it first (build() checks it)
        if owner is not None:
            os.chown(name, *owner, dir_fd=folder, follow_symlinks=False)


def _create(folder: int, name: str, *, directory: bool) -> None:
    if directory:
        os.mkdir(name, 0o755, dir_fd=folder)
        return
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                 dir_fd=folder)
    with os.fdopen(fd, "wb") as handle:
        handle.write(PLACEHOLDER_TEXT.get(name) or
                     PLACEHOLDER_TEXT.get(os.path.splitext(name)[1], b""))


# -- the view (root) ---------------------------------------------------------------------------


def build(name: str, workspace: str, protect: Sequence[str], mask: Sequence[str]) -> View:
    """The view of `workspace` for container `name`, replacing any earlier one."""
    naming.validate_container_name(name)
    check_rules(protect, mask)
    release(name)
    _private_root()
    target = os.path.join(VIEW_ROOT, name)
    with contextlib.suppress(FileExistsError):  # the empty one an earlier view left
        os.mkdir(target, 0o700)
    try:
        with _opened(workspace, os.O_PATH | os.O_DIRECTORY) as project:
            tree = _clone(project, recursive=True)
    except OSError as exc:  # e.g. a FUSE mount root may not enter
        raise CoiError(f"cannot build the view of the workspace {workspace}: "
                       f"{exc.strerror}") from None
    try:
        _move(tree, target)
        _setattr(tree, propagation=MS_PRIVATE)
        bound: set[str] = set()
        covered = [_protect(tree, rel, bound) for rel in protected_targets(tree, protect)]
        masked, notes = _mask_all(tree, mask)
    except OSError as exc:
        os.close(tree)
        release(name)
        raise CoiError(f"cannot build the view of the workspace {workspace}: "
                       f"{exc.strerror} ({exc.filename or 'a path in it'})") from None
    except BaseException:
        os.close(tree)
        release(name)
        raise
    os.close(tree)
    return View(target, tuple(c for c in covered if c), masked, tuple(notes))


def release(name: str, *, forget: bool = False) -> None:
    """Detach the view of container `name` from the host (the container, once
    started, keeps its own copy). Its empty directory stays, unless `forget`
    (the container is gone): Incus refuses any change to a container whose disk
    source is missing, and a start without a new view shows an empty /workspace."""
    naming.validate_container_name(name)
    target = os.path.join(VIEW_ROOT, name)
    if not os.path.isdir(target):
        return
    if _libc.umount2(target.encode(), MNT_DETACH) != 0 and ctypes.get_errno() != errno.EINVAL:
        raise _failure("detach", target)  # EINVAL: not mounted (a failed build)
    if forget:
        with contextlib.suppress(OSError):
            os.rmdir(target)


def keep_directories(instances: Sequence[Mapping[str, Any]]) -> list[str]:
    """Make the empty view directory again for each container whose /workspace is a
    view (after a reboot emptied /run): Incus refuses any change to a container whose
    disk source is missing, a save's start-for-the-copy included. Returns the names."""
    made = []
    for instance in instances:
        device = (instance.get("devices") or {}).get("workspace") or {}
        source = device.get("source")
        if not is_view_source(source) or os.path.isdir(source):
            continue
        naming.validate_container_name(os.path.basename(source))
        os.makedirs(source, mode=0o700, exist_ok=True)
        made.append(os.path.basename(source))
    return made


def _private_root() -> None:
    """VIEW_ROOT as a private mount of its own, so views never propagate elsewhere."""
    os.makedirs(VIEW_ROOT, mode=0o711, exist_ok=True)
    if not os.path.exists(EMPTY_FILE):
        with open(EMPTY_FILE, "wb"):
            pass
        os.chmod(EMPTY_FILE, 0o444)
    if not _mounted(VIEW_ROOT):
        with _opened(VIEW_ROOT, os.O_PATH | os.O_DIRECTORY) as folder:
            _move(_clone(folder, recursive=False), VIEW_ROOT)
        with _opened(VIEW_ROOT, os.O_PATH | os.O_DIRECTORY) as folder:
            _setattr(folder, propagation=MS_PRIVATE)


def _mounted(path: str) -> bool:
    """Whether `path` is a mount point (os.path.ismount misses a bind of the same
    filesystem), from the kernel's own table."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as table:
        return any(line.split(" ")[4] == path for line in table)


def _protect(tree: int, target: str, bound: set[str]) -> str:
    """Bind `target` read-only onto itself, each directory above it onto itself
    writable (mount points cannot be renamed; `bound` remembers those done).
    Returns the target, or '' when it does not exist (protection was off when
    placeholders were due)."""
    parts = target.rstrip("/").split("/")
    parent = os.dup(tree)
    try:
        for depth, part in enumerate(parts):
            rel, last = "/".join(parts[:depth + 1]), depth == len(parts) - 1
            try:
                child = _open_plain(parent, part, rel)
            except FileNotFoundError:
                return ""
            if last or rel not in bound:
                _bind_onto(child, readonly=last)
                bound.add(rel)
                os.close(child)
                child = _open_plain(parent, part, rel)  # through the new mount
            os.close(parent)
            parent = child
        return target
    finally:
        os.close(parent)


def _open_plain(parent: int, name: str, rel: str) -> int:
    """`name` below `parent` as an O_PATH fd; a symbolic link there is refused."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise _link_refused(rel)
    return fd


def _link_refused(rel: str) -> BadInput:
    return BadInput(f"protected path {rel!r} of the workspace is a symbolic link: coi will "
                    "not start a session on it", hint="replace the link with what it points "
                    "to, or set security.protect = false in your own config")


def _mask_all(tree: int, patterns: Sequence[str]) -> tuple[int, list[str]]:
    if not [p for p in patterns if not p.startswith("!")]:
        return 0, []
    masked, walked, notes = 0, 0, []
    for _top, dirs, files, folder in os.fwalk(".", dir_fd=tree, follow_symlinks=False):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        walked += len(dirs) + len(files)
        for name in files:
            if masks(name, patterns) and _mask(folder, name):
                masked += 1
                if masked > MAX_MASKED:
                    raise BadInput(f"more than {MAX_MASKED} files match security.mask",
                                   hint="narrow security.mask, or start with --no-mask")
        if walked > MAX_WALKED:
            notes.append(f"masking looked at the first {MAX_WALKED} entries only: files "
                         "further in are not masked")
            break
    return masked, notes


def _mask(folder: int, name: str) -> bool:
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=folder)
    except OSError:
        return False  # gone meanwhile: nothing to hide
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        with _opened(EMPTY_FILE, os.O_PATH) as empty:
            tree = _clone(empty, recursive=False)
        _setattr(tree, attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        _move(tree, fd)
        return True
    finally:
        os.close(fd)


def _bind_onto(fd: int, *, readonly: bool) -> None:
    tree = _clone(fd, recursive=True)
    flags = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if readonly else 0)
    _setattr(tree, attr_set=flags)
    _move(tree, fd)


# -- syscalls ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _opened(path: str, flags: int) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _walk(root: int, parts: list[str]) -> Iterator[int]:
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


def _clone(fd: int, *, recursive: bool) -> int:
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    tree = _libc.syscall(SYS_OPEN_TREE, fd, b"", flags)
    if tree < 0:
        raise _failure("clone", f"fd {fd}")
    return tree


def _move(tree: int, target: int | str) -> None:
    if isinstance(target, str):
        done = _libc.syscall(SYS_MOVE_MOUNT, tree, b"", -100, target.encode(),
                             MOVE_MOUNT_F_EMPTY_PATH)
    else:
        done = _libc.syscall(SYS_MOVE_MOUNT, tree, b"", target, b"",
                             MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)
    if done != 0:
        raise _failure("attach", str(target))


def _setattr(fd: int, *, attr_set: int = 0, propagation: int = 0) -> None:
    attr = _MountAttr(attr_set, 0, propagation, 0)
    done = _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE,
                         ctypes.byref(attr), ctypes.sizeof(attr))
    if done != 0:
        raise _failure("set attributes of", f"fd {fd}")


def _failure(action: str, what: str) -> CoiError:
    code = ctypes.get_errno()
    return CoiError(f"cannot {action} a mount of the workspace view ({what}): "
                    f"{os.strerror(code)}")
