"""Exclusive locks that several users share: flock on a file in a checked directory.

The lock files live in a directory the caller opened with open_folder, and
every name is opened relative to that directory's file descriptor, never by
path, without following a symlink and without blocking on a FIFO: nobody can
swap the directory, or plant a link or a pipe in it, to make coi open
something else. A flock ends with the process that held it, so a crashed
holder never leaves a lock behind, and waiting is always bounded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from typing import Final

from coi_common import progress
from coi_common.errors import CoiError, PermissionDenied

POLL_SECONDS: Final = 0.1
FILE_MODE: Final = 0o644
"""Lock files: readable by all who may enter the directory, since each user takes the lock
through a read-only descriptor (flock needs no write access)."""


class LockTimeout(CoiError):
    """Another process held the lock for longer than the caller would wait (exit 1, code
    `failed`, as CoiError: a kind of its own only so that callers can tell it apart)."""


def open_folder(path: str, *, owner: int, mode: int, group: int = -1) -> int:
    """A descriptor of the directory `path` for lock files; made with `mode` (and `group`)
    when missing and the caller is `owner`.

    Refused (PermissionDenied) unless `path` is a directory itself (not a symlink)
    owned by `owner` and not writable by others, in a parent that only its owner
    (root or `owner`) may write to: then nobody else made it or can replace it.
    FileNotFoundError when it is missing and the caller cannot make it.
    """
    parent_path, base = os.path.split(path.rstrip("/"))
    parent = os.open(parent_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check(os.fstat(parent), parent_path, owners=(0, owner), forbidden=0o022)
        made = False
        if os.geteuid() == owner:
            with contextlib.suppress(FileExistsError):
                os.mkdir(base, mode, dir_fd=parent)
                made = True
        folder = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):  # a symlink, or a file
            raise
        raise PermissionDenied(f"{path} is not a directory; coi does not use it for "
                               "locks") from None
    finally:
        os.close(parent)
    try:
        if made:  # the umask took bits off, and mkdir ignores the sticky bit
            os.fchown(folder, -1, group)
            os.fchmod(folder, mode)
        info = os.fstat(folder)
        _check(info, path, owners=(owner,), forbidden=0o002)
    except BaseException:
        os.close(folder)
        raise
    return folder


def _check(info: os.stat_result, path: str, *, owners: tuple[int, ...],
           forbidden: int) -> None:
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in owners \
            or info.st_mode & forbidden:
        raise PermissionDenied(f"{path} is not a safe directory for locks (owner uid "
                               f"{info.st_uid}, mode {stat.filemode(info.st_mode)}); coi "
                               "does not use it", hint="remove it; coi makes it again")


def open_file(folder: int, name: str) -> int:
    """The lock file `name` in the directory `folder`, opened read-only; made (FILE_MODE,
    whatever the umask) when missing. PermissionDenied when it cannot be opened, or is
    not a regular file. Opening first without O_CREAT keeps fs.protected_regular from
    refusing a file that another user made in a shared sticky directory."""
    if "/" in name or name in ("", ".", ".."):
        raise PermissionDenied(f"{name!r} is not a lock file name")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        for _ in range(3):  # made or removed between two tries: try again
            try:
                fd = os.open(name, flags, dir_fd=folder)
            except FileNotFoundError:
                try:
                    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, FILE_MODE,
                                 dir_fd=folder)
                except FileExistsError:
                    continue
                os.fchmod(fd, FILE_MODE)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise PermissionDenied(f"lock file {name} is not a regular file; coi does "
                                       "not use it")
            return fd
    except OSError as exc:  # ELOOP: a symlink in its place; EACCES: not ours to make
        raise PermissionDenied(f"lock file {name} cannot be opened: {exc.strerror}") from None
    raise PermissionDenied(f"lock file {name} keeps appearing and disappearing")


@contextlib.contextmanager
def held(fd: int, *, timeout: float, what: str) -> Iterator[None]:
    """Hold an exclusive flock on the open lock file `fd` (open_file; the caller closes
    it). Waits at most `timeout` s for another holder, saying `what` it waits for once
    the wait is longer than progress.SLOW_SECONDS; then LockTimeout."""
    if not _take(fd):
        with progress.waiting(what):
            deadline = time.monotonic() + timeout
            while not _take(fd):
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{what}: still held by another process after "
                                      f"{timeout:g} s")
                time.sleep(POLL_SECONDS)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _take(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
