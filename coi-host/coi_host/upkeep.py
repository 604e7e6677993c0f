"""What the host service does on its own, with no cron: the upkeep of egress rules,
and the allowlist resolver kept running.

Every `tick` seconds it runs root's `coi-net refresh` (its spare): rules that
vanished while their container lives (`nft flush ruleset`, a deleted table)
come back from the recorded policy, and allowlist answers whose TTL ran out
are asked again. Every GC_TICKS ticks, `coi-net gc` drops the rules and
state of containers that no longer exist (`incus delete -f` behind coi's
back). `coi-net dns`, the allowlist resolver, runs as a child of the service
and is started again whenever it ends (Watched). What the last round did, and
the resolver's state, are in the service's `ping` reply, which `coi doctor`
shows.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from coi_common import proc
from coi_common.errors import CoiError

TICK_SECONDS: Final = 10.0
GC_TICKS: Final = 6
"""gc runs every sixth tick: it lists Incus's instances, the refresh does not."""
LONGEST_PAUSE: Final = 30.0
"""The longest wait before a watched child that keeps ending is started again."""
STEADY_SECONDS: Final = 60.0
"""A child that ran this long ended by accident, not at once: its next pause is short."""

Runner = Callable[..., dict[str, Any]]


class Upkeep:
    """The rounds, in a daemon thread; `state()` is what ping reports of them."""

    def __init__(self, run: Runner, seconds: float = TICK_SECONDS) -> None:
        self.run = run
        self.seconds = seconds
        self.rounds = 0
        self.last: float | None = None
        self.error = ""
        self.restored: list[str] = []

    def start(self) -> None:
        threading.Thread(target=self._loop, name="coi-upkeep", daemon=True).start()

    def state(self) -> dict[str, Any]:
        return {"tick_seconds": self.seconds, "rounds": self.rounds, "last": self.last,
                "error": self.error, "restored": list(self.restored)}

    def _loop(self) -> None:
        while True:
            self.round()
            time.sleep(self.seconds)

    def round(self) -> None:
        """One tick: refresh (and restore), then gc on every GC_TICKS-th."""
        try:
            reply = self.run(["refresh", "--format=json"], statuses=(0, 1))
            records = reply.get("records") or []
            self.restored = [r.get("container", "?") for r in records if r.get("restored")]
            if self.rounds % GC_TICKS == 0:
                self.run(["gc", "--format=json"])
            self.error = ""
        except CoiError as exc:
            if exc.one_line() != self.error:
                print(f"coi-host serve: upkeep: {exc.one_line()}", file=sys.stderr, flush=True)
            self.error = exc.one_line()
        self.rounds += 1
        self.last = time.time()


class Watched:
    """A child the service keeps running (`coi-net dns`): started with the service and
    again whenever it ends, after a pause that doubles while it keeps ending at once
    (Incus not up yet, its port taken), up to LONGEST_PAUSE. Its stderr is the
    service's (the service log)."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.starts = 0
        self.error = ""
        self._child: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="coi-watched", daemon=True).start()

    def state(self) -> dict[str, Any]:
        child = self._child
        running = child is not None and child.poll() is None
        return {"running": running, "pid": child.pid if running and child else None,
                "starts": self.starts, "error": self.error}

    def stop(self) -> None:
        self._stopping.set()
        if self._child is not None and self._child.poll() is None:
            proc.stop_group(self._child, grace=2)

    def _loop(self) -> None:
        pause = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self._child = proc.spawn(self.argv, stdout=subprocess.DEVNULL)
                self.starts += 1
                code = self._child.wait()
                self.error = f"{self.argv[0]} ended (exit {code})"
            except CoiError as exc:
                self.error = exc.one_line()
            pause = 1.0 if time.monotonic() - started >= STEADY_SECONDS else \
                min(pause * 2, LONGEST_PAUSE)
            self._stopping.wait(pause)
