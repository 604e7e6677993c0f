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
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Final

from coi_common import naming, progress
from coi_common.errors import CoiError, PermissionDenied

if TYPE_CHECKING:
    from coi_common.incus import Incus

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
        info = os.fstat(parent)
        if info.st_uid not in (0, owner) or info.st_mode & 0o022:
            raise PermissionDenied(f"{path} is in {parent_path}, which others may write to: "
                                   "coi keeps no locks there", hint="put it in a folder only "
                                   "its owner can write to (not straight in /tmp)")
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


@contextlib.contextmanager
def private(folder: str, name: str, *, timeout: float, what: str,
            mode: int = 0o700) -> Iterator[None]:
    """Hold the lock file `name` in `folder`, a directory of the caller's own (made with
    `mode` when missing, its parents too): the store locks of coi-slot, coi-session and
    coi-net, opened as open_folder and open_file do, waiting at most `timeout` s."""
    os.makedirs(os.path.dirname(folder.rstrip("/")), mode=0o700, exist_ok=True)
    directory = open_folder(folder, owner=os.geteuid(), mode=mode)
    try:
        fd = open_file(directory, name)
    finally:
        os.close(directory)
    try:
        with held(fd, timeout=timeout, what=what):
            yield
    finally:
        os.close(fd)


def _take(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# -- the lock of ending a session container ---------------------------------------------


ENDING_LOCK_SECONDS: Final = 240.0
"""How long ending a session waits for another coi command ending the same container: an
attached shell's wait for the stop (30 s), a save (saved_sessions.SAVE_TIMEOUT, 60 s, plus
a start and a stop), the removal of its rules (60 s), and a margin."""
SHARED_LOCKS: Final = "/run/coi/locks"
SHARED_LOCKS_MODE: Final = 0o1770
_ending: set[str] = set()
"""The containers whose ending lock this process holds (ending_lock is reentrant)."""
os.register_at_fork(after_in_child=_ending.clear)  # a fork holds none of them


@contextlib.contextmanager
def ending_lock(client: Incus, name: str) -> Iterator[None]:
    """Hold the lock of ending `name`'s session: end_session takes it, and so does a
    caller deciding whether to end it (an attached shell). Reentrant in a process;
    LockTimeout after ENDING_LOCK_SECONDS.

    Where the lock files are, and why there: everyone who may end a session (root,
    and members of the Incus socket's group, as the member who runs the shell or
    root running `coi shutdown`) must meet on one file per container, and nobody
    else may make, hold, remove or redirect it. /run/coi is root's, so root makes
    /run/coi/locks in it: owned by root, group of the Incus socket, mode 1770, so
    members make and lock files there, the sticky bit keeps them from removing (and
    so splitting) another's lock, and other users cannot even look in. Files are
    opened relative to the checked folder, never through a link (locks.py), and
    every wait is bounded. A member who finds no /run/coi/locks (no root coi
    command or host service since boot) locks in their own ~/.coi/locks, which
    still orders that user's own commands. With no usable folder at all the
    session ends unlocked, with a warning: a lock never keeps a session from ending.
    Lock files stay (one empty file per container name, and names come back with
    their slot): removing one that another process waits on would let a third lock
    a new file of that name beside it.
    """
    if name in _ending:
        yield
        return
    fd, problem = _ending_lock_file(client, name)
    if fd is None:
        print(f"coi: ending {name} without its lock ({problem}); another coi command "
              "ending it at the same time may save it twice", file=sys.stderr)
        yield
        return
    try:
        with held(fd, timeout=ENDING_LOCK_SECONDS,
                        what=f"waiting for another coi command to finish ending {name}"):
            _ending.add(name)
            try:
                yield
            finally:
                _ending.discard(name)
    finally:
        os.close(fd)


def adopt_ending(name: str) -> None:
    """In a fork that goes on ending `name` (forks.detach) inside its parent's
    ending_lock: the lock is this process's now, so taking it again is reentrant."""
    _ending.add(name)


def wait_for_endings(client: Incus, names: Sequence[str]) -> None:
    """Until no coi command is ending any of these containers (a session ending in the
    background is saved then): each ending lock taken and let go, bounded as
    ending_lock is."""
    for name in names:
        with ending_lock(client, name):
            pass


def prepare_ending_locks(client: Incus) -> None:
    """As root: make /run/coi/locks now (at boot: coi setup, coi-host serve), so that
    members lock there from their first session on, not in their own folders."""
    shared = next(_lock_folders(client))
    if os.geteuid() != 0:
        raise PermissionDenied(f"only root makes {shared[0]}", hint="run this as root")
    os.close(_open_lock_folder(*shared))


def _ending_lock_file(client: Incus, name: str) -> tuple[int | None, str]:
    """The open lock file of ending `name` (see ending_lock): in the first folder of
    _lock_folders that is usable; None, and why, when none is."""
    problems = []
    for place in _lock_folders(client):
        try:
            folder = _open_lock_folder(*place)
            try:
                return open_file(folder, f"{naming.validate_container_name(name)}.lock"), ""
            finally:
                os.close(folder)
        except (OSError, CoiError) as exc:
            problems.append(exc.one_line() if isinstance(exc, CoiError)
                            else f"{place[0]}: {exc.strerror}")
    return None, "; ".join(problems)


def _open_lock_folder(path: str, owner: int, mode: int, group: int) -> int:
    if os.geteuid() == owner:  # its parent first: /run/coi (root's) or ~/.coi (the user's)
        os.makedirs(os.path.dirname(path), mode=0o755 if owner == 0 else 0o700, exist_ok=True)
    return open_folder(path, owner=owner, mode=mode, group=group)


def _lock_folders(client: Incus) -> Iterator[tuple[str, int, int, int]]:
    """(path, owner, mode, group) of each folder ending locks may be in, in order: the
    shared one (group: the Incus socket's), then, for a member, their own."""
    try:
        group = os.stat(client.socket).st_gid
    except OSError:
        group = 0  # no local socket: only root uses Incus here
    yield SHARED_LOCKS, 0, SHARED_LOCKS_MODE, group
    uid = os.geteuid()
    if uid != 0:
        import pwd  # noqa: PLC0415

        try:  # pwd, not $HOME: every process of the user must find the same folder
            home = pwd.getpwuid(uid).pw_dir
        except KeyError:  # a uid without an account has none
            return
        yield os.path.join(home, ".coi", "locks"), uid, 0o700, -1
