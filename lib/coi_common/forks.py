"""coi's own programs started as forks of the running coi, not as new interpreters.

`coi run -- true` runs five coi children (coi-slot next and end, coi-session restore and
save, coi-net remove). Started as new processes, each paid ~70 ms of CPU before its
first line of work: the interpreter, and the imports every coi program shares (typing,
re, dataclasses, coi_common's entry, config and incus). On two cores that CPU is what
the booting container waits for. A fork of the parent has all of that loaded already:
the child only imports its own package and runs its `__main__`, exactly as the
program's launcher would (bin/_launch, or the venv's script).

The child is the program, as far as it can tell: a session of its own (so
proc.stop_group ends it and what it starts), the pipes as stdin and stdout, the
parent's stderr, every other descriptor closed (as exec with close_fds would), fresh
sys.std* objects (a lock another thread of the parent held at the fork stays held in
the copy of the old ones), the signal handlers of a new interpreter, and the
per-process state of coi_common reset (the modules holding some register it with
os.register_at_fork). Nothing of it returns into the parent's code: it ends with
os._exit whatever happens.

Only the main thread forks (the host service's request threads spawn instead), and
only for a program that is this installation's own (plumbing decides). COI_FORK=0
starts every child as a new process, to compare or to rule the forks out.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Final

from coi_common import trace

VARIABLE: Final = "COI_FORK"
FAILED_TO_START: Final = 70
"""The status of a fork that could not become its program (EX_SOFTWARE)."""
_FRESH_SIGNALS: Final = {signal.SIGINT: signal.default_int_handler,
                          signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL,
                          signal.SIGCHLD: signal.SIG_DFL, signal.SIGPIPE: signal.SIG_IGN}
"""The handlers a new Python interpreter starts with, for the signals coi sets."""


def enabled() -> bool:
    """Whether a coi child may be a fork here: not turned off, and on the main thread."""
    return os.environ.get(VARIABLE) != "0" and \
        threading.current_thread() is threading.main_thread()


class Forked:
    """A forked program, as subprocess.Popen's interface is used for coi's children:
    pid, stdin, returncode, poll, wait, communicate."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.pid, self.stdin, self.stdout = pid, stdin, stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Its status; subprocess.TimeoutExpired after `timeout` s, as Popen.wait."""
        if timeout is None:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.005)
        return self.returncode

    def communicate(self, payload: bytes | None = None) -> tuple[bytes, None]:
        """Write `payload` (one record: less than a pipe holds) and close its stdin,
        then read all it prints and wait for its end."""
        if self.stdin is not None:
            stdin, self.stdin = self.stdin, None
            with contextlib.suppress(BrokenPipeError), stdin:
                if payload:
                    stdin.write(payload)
        with self.stdout:
            out = self.stdout.read()
        self.wait()
        return out, None


def fork_program(program: str, module: str, args: Sequence[str],
                 env: Mapping[str, str]) -> Forked:
    """Run `program` (its package `module`) with `args` in a fork of this process, with
    `env` added to its environment; its stdin and stdout are pipes to the caller."""
    argv = (program, *args)
    with trace.span("fork", argv) as call:
        child_in, to_child = os.pipe()
        from_child, child_out = os.pipe()
        ready, leading = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        pid = os.fork()
        if pid == 0:
            _become(argv, module, env, (child_in, child_out, leading))
        for end in (child_in, child_out, leading):
            os.close(end)
        # Until it leads a session of its own (as Popen returns only after its exec):
        # a stop_group() right after this must find the group to signal.
        os.read(ready, 1)
        os.close(ready)
        call.end(f"started pid {pid}")
    return Forked(pid, os.fdopen(to_child, "wb"), os.fdopen(from_child, "rb"))


def _become(argv: tuple[str, ...], module: str, env: Mapping[str, str],
            pipes: tuple[int, int, int]) -> None:
    """In the fork: be `argv` as a fresh start of it would be, then exit. Never returns.
    `pipes`: its stdin, its stdout, and the one closed once it leads its session."""
    status = FAILED_TO_START
    stdin, stdout, leading = pipes
    try:
        gc.freeze()  # the parent's objects are never collected here (no finaliser of
        # theirs may close a descriptor number this program has reused)
        os.setsid()
        os.close(leading)
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        for number, handler in _FRESH_SIGNALS.items():
            signal.signal(number, handler)
        os.environ.update(env)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                          closefd=False, buffering=1)
        sys.argv = list(argv)
        import runpy  # noqa: PLC0415 - in the fork only

        runpy.run_module(module, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BrokenPipeError:  # its reader went away: nobody is left to tell
        status = 1
    except BaseException as exc:  # reported, then the fork ends
        with contextlib.suppress(OSError):
            os.write(2, f"{argv[0]}: could not start: {type(exc).__name__}: {exc}\n".encode())
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)


def detach(log_path: str) -> bool:
    """Go on in the background: True in the caller, which leaves next with os._exit (so
    that nothing it holds, a lock, is undone on its way out); False in the detached
    copy, which leads a session of its own, reads /dev/null, writes to `log_path`
    (appended) and keeps every other descriptor: the locks it holds are its own now.
    Its parent may exit at once: nothing waits for it."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if os.fork():
        os.close(log)
        return True
    os.setsid()
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(nothing)
    os.close(log)
    return False
