"""Step-by-step progress for long jobs (setup, image builds) on stderr.

On a terminal the current step shows a spinner and its own elapsed time on one
line; elsewhere (CI logs, pipes) each step prints a plain start and end line.
Each step ends with its own time and the job's total. stdout is never touched: it
carries results only. -q (output.quiet) silences all of it but failures.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from coi_common import output

SPINNER = "|/-\\"


class Progress:
    """Numbered steps `[n/total]`, each with its own time and the job's so far."""

    def __init__(self, prog: str, total: int, stream: IO[str] | None = None,
                 interactive: bool | None = None) -> None:
        self.prog = prog
        self.total = total
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.silent = output.quiet()
        self.started = time.monotonic()
        self.number = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        """One free-form line (a warning, a note) between steps."""
        if self.silent:
            return
        self.stream.write(f"{self.prog}: {text}\n")
        self.stream.flush()

    @contextmanager
    def step(self, label: str) -> Iterator[list[str]]:
        """Run one step; the caller may append a short result to the yielded list."""
        self.number += 1
        head = f"{self.prog}: [{self.number}/{self.total}] {label}"
        outcome: list[str] = []
        stop = threading.Event()
        spinner = None
        began = time.monotonic()
        if self.interactive and not self.silent:
            spinner = threading.Thread(target=self._spin, args=(head, began, stop), daemon=True)
            spinner.start()
        elif not self.silent:
            self.stream.write(f"{head} ...\n")
            self.stream.flush()
        try:
            yield outcome
        except BaseException:
            failed = output.coloured("FAILED", "fail", self.stream)
            self._finish(stop, spinner, f"{head}: {failed} ({self._times(began)})", shown=True)
            raise
        result = outcome[0] if outcome else "done"
        self._finish(stop, spinner, f"{head}: {result} ({self._times(began)})",
                     shown=not self.silent)

    def _times(self, began: float) -> str:
        """`12.1s, 52.1s in all`: the step's own time, then the job's."""
        return f"{time.monotonic() - began:.1f}s, {self.elapsed():.1f}s in all"

    def _spin(self, head: str, began: float, stop: threading.Event) -> None:
        turn = 0
        while not stop.wait(0.2):
            self.stream.write(f"\r{head} {SPINNER[turn % 4]} {time.monotonic() - began:.0f}s"
                              "\x1b[K")
            self.stream.flush()
            turn += 1

    def _finish(self, stop: threading.Event, spinner: threading.Thread | None,
                line: str, *, shown: bool) -> None:
        stop.set()
        if spinner is not None:
            spinner.join()
            self.stream.write("\r\x1b[K")
        if shown:
            self.stream.write(line + "\n")
            self.stream.flush()


SLOW_SECONDS = 2.0
"""A wait longer than this says what it is waiting for."""


@contextmanager
def waiting(what: str, *, prog: str = "coi", after: float = SLOW_SECONDS,
            stream: IO[str] | None = None) -> Iterator[None]:
    """Say `prog: WHAT ...` on stderr once the block has run `after` seconds (at once
    with -v, never with -q), and how long it took when it ends; a block that ends
    sooner prints nothing."""
    if output.quiet():
        yield
        return
    after = 0.0 if output.verbose() else after
    out = stream or sys.stderr
    started = time.monotonic()
    shown = threading.Event()
    stop = threading.Event()

    def announce() -> None:
        if not stop.wait(after):
            shown.set()
            out.write(f"{prog}: {what} ...\n")
            out.flush()

    timer = threading.Thread(target=announce, daemon=True)
    timer.start()
    outcome = "failed"
    try:
        yield
        outcome = "done"
    finally:
        stop.set()
        timer.join()
        if shown.is_set():
            out.write(f"{prog}: {what}: {outcome} ({time.monotonic() - started:.1f}s)\n")
            out.flush()
