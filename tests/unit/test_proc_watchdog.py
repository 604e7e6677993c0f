"""coi_common.proc.Watchdog: a streaming child past its time is stopped, with its
whole process group; one cancelled in time is left alone."""

from __future__ import annotations

import signal
import subprocess

from coi_common import proc


def test_a_child_past_its_time_is_stopped_with_its_group() -> None:
    child = proc.spawn(["sh", "-c", "sleep 30 & wait"], stdout=subprocess.DEVNULL)
    watchdog = proc.Watchdog(child, 0.2)
    try:
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.stop_group(child, grace=0)
    assert watchdog.fired is True


def test_a_cancelled_watchdog_leaves_the_child_alone() -> None:
    child = proc.spawn(["sleep", "0.5"])
    watchdog = proc.Watchdog(child, 0.2)
    watchdog.cancel()
    assert child.wait(timeout=10) == 0
    assert watchdog.fired is False
