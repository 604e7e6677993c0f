"""The one place coi starts external programs (incus CLI, nft, tmux, apt-get, ...).

Built on subprocess rather than the `sh` package on purpose: importing sh
costs 55-135 ms (measured on these machines; see README), which most coi
commands cannot afford, and its foreground mode lets Ctrl-C reach the Python
parent during an interactive hand-off. `sh` is used only by host setup,
where start-up time does not matter (coi_host.setup).

Every start is traced with COI_TRACE (coi_common.trace), named after the
function that started it: `run ARGV`, `spawn ARGV`, ...

coi's own programs run as plumbing children start as forks of the caller instead
(coi_common.forks, `fork ARGV` in a trace); stop_group ends either kind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from coi_common import trace
from coi_common.errors import CommandFailed, NotFound

if TYPE_CHECKING:
    from coi_common.forks import Forked


class Result(NamedTuple):
    """What a finished program left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class BinaryResult(NamedTuple):
    """What a finished program left behind, its output as bytes (nothing decoded)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes


@contextlib.contextmanager
def program_errors(argv: Sequence[str], timeout: float | None = None) -> Iterator[None]:
    """A missing program as NotFound, a run past its timeout as CommandFailed."""
    try:
        yield
    except FileNotFoundError:
        raise NotFound(f"program {argv[0]!r} is not installed") from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"{argv[0]} did not finish within {timeout:g} s") from None


def last_line(text: str) -> str:
    """The last non-empty line of `text`, for one-line error messages."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run(argv: Sequence[str], *, input_text: str | None = None, check: bool = True,
        timeout: float | None = None, env: Mapping[str, str] | None = None,
        cwd: str | None = None) -> Result:
    """Run argv to completion, capturing text output.

    With check=True a non-zero exit raises CommandFailed carrying the program's
    last stderr line; a missing program raises NotFound either way.
    """
    # Without input, stdin is closed: an `incus exec` would otherwise eat ours.
    stdin = {"input": input_text} if input_text is not None else {"stdin": subprocess.DEVNULL}
    with trace.span("run", argv) as call, program_errors(argv, timeout):
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env=dict(env) if env is not None else None, cwd=cwd, check=False,
                              **stdin)
        call.end(f"exit {done.returncode}")
    result = Result(tuple(argv), done.returncode, done.stdout, done.stderr)
    if check and not result.ok:
        reason = last_line(result.stderr) or last_line(result.stdout) or "no output"
        raise CommandFailed(f"{argv[0]} exited {result.returncode}: {reason}")
    return result


def run_bytes(argv: Sequence[str], *, timeout: float | None = None) -> BinaryResult:
    """Run argv to completion with stdin inherited, keeping stdout and stderr as bytes.

    Never raises on a non-zero exit (callers pass the status on); a missing
    program raises NotFound.
    """
    with trace.span("run_bytes", argv) as call, program_errors(argv, timeout):
        done = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
        call.end(f"exit {done.returncode}")
    return BinaryResult(tuple(argv), done.returncode, done.stdout, done.stderr)


class HandOver(NamedTuple):
    """How an interactive child ended: its status and, when its stderr was watched,
    the first line it printed if that line began with the watched prefix (held back
    from the user until the caller decides; see hand_over)."""

    returncode: int
    held_line: bytes = b""


def hand_over(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              terminal: IO[bytes] | None = None, hold_prefix: bytes = b"") -> HandOver:
    """Run an interactive child that owns the terminal; return how it ended.

    `terminal` (an open /dev/tty) replaces stdin, stdout and stderr when the
    caller's own stdin is a pipe. The parent ignores SIGINT while waiting so
    Ctrl-C goes to the child alone; a child killed by a signal reports
    128+signal, as shells do. If the parent is stopped (SIGTERM), the child
    is ended too.

    With `hold_prefix`, the child's stderr passes through a pipe: when its
    first bytes start with the prefix, that first line is held back and
    returned (HandOver.held_line) instead of printed, so a caller can retry
    a child that failed before it ran without showing the failure; any other
    output is forwarded at once, byte for byte.
    """
    streams: dict[str, Any] = {"stdin": terminal, "stdout": terminal, "stderr": terminal} \
        if terminal else {}
    sink = terminal if terminal is not None else sys.stderr.buffer
    if hold_prefix:
        streams["stderr"] = subprocess.PIPE
    with trace.span("hand_over", argv) as call:
        # The child is started before SIGINT is ignored here: an ignored signal
        # would stay ignored across exec, and preexec_fn is unsafe with threads.
        with program_errors(argv):
            child = subprocess.Popen(list(argv), env=dict(env) if env is not None else None,
                                     **streams)
        relay = _StderrRelay(child.stderr, sink, hold_prefix) if hold_prefix else None
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            returncode = child.wait()
        except BaseException:
            child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
            child.kill()
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
        held = relay.finish() if relay else b""
        ended = HandOver(128 - returncode if returncode < 0 else returncode, held)
        call.end(f"exit {ended.returncode}")
    return ended


class _StderrRelay:
    """Copies a child's stderr to `sink` in a thread, holding back a first line that
    starts with `prefix` (at most HELD_MAX bytes of it)."""

    HELD_MAX = 4096

    def __init__(self, source: IO[bytes] | None, sink: IO[bytes], prefix: bytes) -> None:
        assert source is not None
        self.source, self.sink, self.prefix = source, sink, prefix
        self.held = b""
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        pending, holding = b"", True
        while chunk := os.read(self.source.fileno(), 65536):
            if not holding:
                self._write(chunk)
                continue
            pending += chunk
            line_done = b"\n" in pending or len(pending) > self.HELD_MAX
            if not (pending.startswith(self.prefix) or self.prefix.startswith(pending)):
                holding = False
                self._write(pending)
            elif line_done:
                line, _, rest = pending.partition(b"\n")
                if rest:  # more than the one line: it was the program speaking, not Incus
                    holding, self.held = False, b""
                    self._write(pending)
                else:
                    self.held = line
        if holding and pending and not self.held:
            self.held = pending.rstrip(b"\n")

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.sink.write(data)
            self.sink.flush()

    def finish(self) -> bytes:
        self.thread.join(timeout=5)
        self.source.close()
        return self.held


def spawn(argv: Sequence[str], *, stdin: int | IO[bytes] | None = subprocess.DEVNULL,
          stdout: int | IO[bytes] | None = None, stderr: int | IO[bytes] | None = None,
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start argv with the given byte streams and return at once; the caller streams
    and waits. The child gets a session of its own, so stop_group() ends it and
    everything it started (an `incus exec` and its forwarder)."""
    with trace.span("spawn", argv) as call, program_errors(argv):
        child = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=stderr,
                                 start_new_session=True,
                                 env=dict(env) if env is not None else None)
        call.end(f"started pid {child.pid}")
    return child


def spawn_detached(argv: Sequence[str], log_path: str) -> int:
    """Start a long-lived daemon in its own session, output to log_path; return its pid."""
    with trace.span("spawn_detached", argv) as call, open(log_path, "ab") as log:
        child = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        call.end(f"started pid {child.pid}")
    return child.pid


def run_logged(argv: Sequence[str], log_path: str) -> int:
    """Run a long program with its output appended to log_path; return its status.

    The program gets a session of its own so an interrupted build stops it and
    every child it started (debootstrap runs dpkg and chroot; `incus exec`
    runs a whole script); it is asked with SIGTERM first so exit traps can
    unmount what they mounted.
    """
    with trace.span("run_logged", argv) as call, open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        with program_errors(argv):
            child = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = child.wait()
        except BaseException:
            stop_group(child)
            raise
        call.end(f"exit {status}")
    return status


class Watchdog:
    """Stops a streaming child's process group (stop_group, at once) when `timeout`
    seconds pass before cancel(); `fired` says whether it did."""

    def __init__(self, child: subprocess.Popen[bytes], timeout: float) -> None:
        self.fired = False
        self._child = child
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        stop_group(self._child, grace=0)

    def cancel(self) -> None:
        self._timer.cancel()


def stop_group(child: subprocess.Popen[bytes] | Forked, *, grace: float = 10.0) -> None:
    """SIGTERM a child's process group, then SIGKILL what is left after `grace` seconds
    (0: SIGKILL at once, for a child that is only copying data)."""
    steps = ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)) if grace else \
        ((signal.SIGKILL, 5.0),)
    for sig, wait in steps:
        # PermissionError: the group's leader is gone and its pid taken by another user.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=wait)
            return
