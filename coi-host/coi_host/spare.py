"""A root coi-net kept started before the host service needs it (coi_host.service).

Built on coi_common.entry's spare mode (COI_SPARE): the program loads its code,
then waits for its arguments on stdin.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Sequence

from coi_common import trace
from coi_common.entry import SPARE_VARIABLE
from coi_common.proc import Result, program_errors, spawn, stop_group


class Spare:
    """A program kept started before it is needed (coi-host's service keeps a root
    coi-net so): its interpreter and code are loaded while nothing waits for it, and a
    call hands it its arguments on stdin (coi_common.entry.SPARE_VARIABLE) and starts
    the next spare. Calls from several threads each get a process of their own."""

    def __init__(self, program: str) -> None:
        self.program = program
        self.lock = threading.Lock()
        self.waiting: subprocess.Popen[bytes] | None = None

    def run(self, args: Sequence[str], *, timeout: float) -> Result:
        """Like run([program, *args], check=False, timeout=timeout), minus the start-up."""
        argv = (self.program, *args)
        with trace.span("spare", argv) as call, program_errors(argv, timeout):
            with self.lock:
                child = self._take()
                self.waiting = self._start()
            try:
                out, err = child.communicate(json.dumps(list(args)).encode() + b"\n",
                                             timeout=timeout)
            except BaseException:
                stop_group(child, grace=0)
                raise
            call.end(f"exit {child.returncode}")
        return Result(argv, child.returncode, out.decode("utf-8", "replace"),
                      err.decode("utf-8", "replace"))

    def start(self) -> None:
        """Have a spare waiting (none yet, or the last one died)."""
        with self.lock:
            self.waiting = self._take()

    def _take(self) -> subprocess.Popen[bytes]:
        waiting, self.waiting = self.waiting, None
        return waiting if waiting is not None and waiting.poll() is None else self._start()

    def close(self) -> None:
        """End the spare that waits (it reads end of input and exits)."""
        with self.lock:
            if self.waiting is not None:
                with contextlib.suppress(OSError):
                    self.waiting.stdin.close()  # type: ignore[union-attr]
                self.waiting.wait()
                self.waiting = None

    def _start(self) -> subprocess.Popen[bytes]:
        return spawn([self.program], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, env={**os.environ, SPARE_VARIABLE: "1"})
