"""COI_TRACE: one line per external call as it ends, so a slow step can be found.

    coi-trace: <pid> <what> <ms> ms <outcome>

`what` is the call: `GET /1.0/instances?...` (a REST exchange), `exec NAME CMD...`,
`run ARGV...`, `spawn ARGV...` (a process; the name is the coi_common.proc function),
shortened to WHAT_MAX characters. Each coi process ends with `coi-trace: <pid> end
<program> <ms> ms cpu (...), peak <MB> MB`. A retry adds `coi-trace: <pid> retry <what> <pause>
ms <why>` before it is tried again.

COI_TRACE=1 (or any value that is not an absolute path) writes the lines to stderr;
COI_TRACE=/absolute/path appends them to that file, one write per line, so the lines
of coi's child processes (which inherit the variable; the pid tells them apart) land
whole in one file. Unset, empty or 0: nothing. The variable is read once per process,
and with tracing off a call costs one function call and one comparison.

The callers are the few choke points: the REST exchange of coi_common.incus, the
process starters of coi_common.proc, and Incus's exec (which names the container and
command, so the proc call under it is not traced again but gives it its outcome).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Final

VARIABLE: Final = "COI_TRACE"
LINE_PREFIX: Final = "coi-trace:"
WHAT_MAX: Final = 120
OUTCOME_MAX: Final = 100
STDERR: Final = "-"
FILE_MODE: Final = 0o600
"""Trace lines show command lines, which may carry secrets: only the owner reads them."""

_UNREAD: Final = object()
_target: object = _UNREAD
_fd: int | None = None
_local = threading.local()


def _start_afresh() -> None:
    """In a fork (coi_common.forks): the file is opened again, by the new program, and
    the span the parent had open around the fork (`fork ...`) is not this program's:
    its calls would be folded into it, unwritten."""
    global _fd  # noqa: PLW0603 - the file is opened once per process
    _fd = None
    _local.span = None


os.register_at_fork(after_in_child=_start_afresh)


def target() -> str | None:
    """Where lines go: STDERR, an absolute file path, or None (tracing off)."""
    global _target  # noqa: PLW0603 - read once per process, by design
    if _target is _UNREAD:
        value = os.environ.get(VARIABLE, "")
        _target = None if value in ("", "0") else value if os.path.isabs(value) else STDERR
    return _target  # type: ignore[return-value]


Words = str | Sequence[str]


def span(kind: str, words: Words) -> Span | _Quiet:
    """A context manager tracing one call: `with trace.span("run", argv) as call:` ...
    `call.end("exit 0")`. Without end() the outcome is "ok"; an exception leaving the
    block becomes the outcome. A span opened inside another of the same thread writes
    nothing and hands its outcome to the outer one."""
    if target() is None:
        return _QUIET
    return Span(kind, words)


def note(kind: str, words: Words, started: float, outcome: str) -> None:
    """A call that ran beside others (a child started early, finished later), as its
    own line: timed from `started` (time.perf_counter()), never nested in a span."""
    if target() is not None:
        _write_call(kind, words, started, outcome)


def process_end(prog: str) -> None:
    """The line of this process as it ends: the CPU it used and its peak memory, so the
    cost of each of a session's coi processes can be read beside its calls."""
    if target() is None:
        return
    import resource  # noqa: PLC0415 - only when tracing

    used = resource.getrusage(resource.RUSAGE_SELF)
    _write(f"end {prog} {(used.ru_utime + used.ru_stime) * 1000:.1f} ms cpu "
           f"({used.ru_utime * 1000:.0f} user, {used.ru_stime * 1000:.0f} sys), "
           f"peak {used.ru_maxrss / 1024:.1f} MB")


def retry(kind: str, words: Words, pause: float, why: str) -> None:
    """Note that a call is tried again after `pause` seconds, and why."""
    if target() is not None:
        _write(f"retry {what(kind, words)} {pause * 1000:.1f} ms {_short(why, OUTCOME_MAX)}")


class Span:
    """One traced call (see span())."""

    def __init__(self, kind: str, words: Words) -> None:
        self.kind, self.words = kind, words
        self.outcome = "ok"
        self._outer: Span | None = None
        self._started = 0.0

    def end(self, outcome: str) -> None:
        """How the call ended ("exit 1", "200", "started pid 42")."""
        self.outcome = outcome

    def __enter__(self) -> Span:
        self._outer = getattr(_local, "span", None)
        _local.span = self
        self._started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 _tb: TracebackType | None) -> None:
        _local.span = self._outer
        if error is not None:
            self.outcome = _failure(error)
        if self._outer is not None:
            self._outer.outcome = self.outcome
            return
        _write_call(self.kind, self.words, self._started, self.outcome)


class _Quiet:
    """The span of tracing off: does nothing, shared by every call."""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def end(self, outcome: str) -> None:
        """Nothing to note."""


_QUIET: Final = _Quiet()


def _write_call(kind: str, words: Words, started: float, outcome: str) -> None:
    """The line of one call that ends now, timed from `started` (time.perf_counter())."""
    milliseconds = (time.perf_counter() - started) * 1000
    _write(f"{what(kind, words)} {milliseconds:.1f} ms {_short(outcome, OUTCOME_MAX)}")


def what(kind: str, words: Words) -> str:
    """How a trace line names a call (and a --dry-run plan step, coi_common.plan)."""
    text = words if isinstance(words, str) else " ".join(words)
    return _short(f"{kind} {text}", WHAT_MAX)


def _short(text: str, limit: int) -> str:
    """One line of at most `limit` characters (the pid and the duration must stay in
    their places, whatever an argv holds)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _failure(error: BaseException) -> str:
    message = getattr(error, "message", None) or str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _write(text: str) -> None:
    """One line, in one write; a trace that cannot be written never fails the command."""
    global _fd  # noqa: PLW0603 - the file is opened once per process
    line = f"{LINE_PREFIX} {os.getpid()} {text}\n"
    destination = target()
    try:
        if destination == STDERR:
            sys.stderr.write(line)
            sys.stderr.flush()
            return
        if _fd is None:
            _fd = os.open(str(destination), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                          FILE_MODE)
        os.write(_fd, line.encode("utf-8", "replace"))
    except (OSError, ValueError):
        return
