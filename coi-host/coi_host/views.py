"""The workspace view's mounts, as root: build, release, and the directories kept for
its containers (coi_common.views says what a view is and why; this builds it).

Only root runs this: `coi-host serve` for a member (view_build, view_release),
`coi-host view build|release` for coi as root. Every mount is placed through
file descriptors opened without following links (coi_common.views.walk), so a
link the agent left in the project never moves a mount outside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any, Final

from coi_common import naming
from coi_common.entry import Args
from coi_common.errors import BadInput, CoiError, PermissionDenied
from coi_common.protocol import make_record, write_record
from coi_common.views import (
    MAX_WALKED,
    VIEW_ROOT,
    View,
    check_rules,
    is_view_source,
    link_refused,
    opened,
    protected_targets,
    walk_masked,
)

EMPTY_FILE: Final = "/run/coi/empty"
MAX_MASKED: Final = 256
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


# -- the command (plumbing, root) ----------------------------------------------------------


def run_view(args: Args, *, as_json: bool) -> int:
    """`coi-host view build|release`: root's own view, as the host service builds one
    for a member; prints the view record (build) or the name released."""
    if os.geteuid() != 0:
        raise PermissionDenied("coi-host view needs root",
                               hint="a member's view comes from coi's host service")
    name = naming.validate_container_name(args["<name>"])
    if args["release"]:
        release(name, forget=bool(args["--forget"]))
        record = make_record("view_released", container=name)
    else:
        workspace = naming.canonical_workspace(args["<workspace>"])
        record = make_record("view", **build(name, workspace, args["--protect"],
                                             args["--mask"]).to_record())
    if as_json:
        write_record(record)
    elif "source" in record:
        print(record["source"], flush=True)
    return 0


# -- the view ---------------------------------------------------------------------------


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
        with opened(workspace, os.O_PATH | os.O_DIRECTORY) as project:
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
        with opened(VIEW_ROOT, os.O_PATH | os.O_DIRECTORY) as folder:
            _move(_clone(folder, recursive=False), VIEW_ROOT)
        with opened(VIEW_ROOT, os.O_PATH | os.O_DIRECTORY) as folder:
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
        raise link_refused(rel)
    return fd


def _mask_all(tree: int, patterns: Sequence[str]) -> tuple[int, list[str]]:
    masked = 0

    def mask(folder: int, name: str, _path: str) -> None:
        nonlocal masked
        if _mask(folder, name):
            masked += 1
            if masked > MAX_MASKED:
                raise BadInput(f"more than {MAX_MASKED} files match security.mask",
                               hint="narrow security.mask, or start with --no-mask")

    if walk_masked(tree, patterns, mask):
        return masked, []
    return masked, [f"masking looked at the first {MAX_WALKED} entries only: files "
                    "further in are not masked"]


def _mask(folder: int, name: str) -> bool:
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=folder)
    except OSError:
        return False  # gone meanwhile: nothing to hide
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        with opened(EMPTY_FILE, os.O_PATH) as empty:
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
