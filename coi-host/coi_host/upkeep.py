"""What the host service does on its own, with no cron: the upkeep of egress rules.

Every `tick` seconds it runs root's `coi-net refresh` (its spare): rules that
vanished while their container lives (`nft flush ruleset`, a deleted table)
come back from the recorded policy, and allowlist answers whose TTL ran out
are asked again. Every GC_TICKS ticks, `coi-net gc` drops the rules and
state of containers that no longer exist (`incus delete -f` behind coi's
back). What the last round did is in the service's `ping` reply, which
`coi doctor` shows.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from coi_common.errors import CoiError

TICK_SECONDS: Final = 10.0
GC_TICKS: Final = 6
"""gc runs every sixth tick: it lists Incus's instances, the refresh does not."""

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
