"""The host service's upkeep rounds (coi_host.upkeep), with a recording runner: which
coi-net commands each round runs, and what ping then reports. The commands themselves
run against real containers in tests/integration/test_network_isolation.py."""

from __future__ import annotations

import os
import time

from coi_common.errors import CoiError
from coi_host import upkeep


class Recorder:
    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.fail = fail

    def __call__(self, argv, statuses=(0,)):
        self.calls.append((argv[0], statuses))
        if self.fail and argv[0] == self.fail:
            raise CoiError(f"coi-net {argv[0]}: nft said no")
        if argv[0] == "refresh":
            return {"records": [{"container": "c1", "restored": True},
                                {"container": "c2", "restored": False}], "status": 0}
        return {"records": [], "status": 0}


def test_each_round_refreshes_and_every_sixth_collects_garbage():
    runner = Recorder()
    keeper = upkeep.Upkeep(runner, seconds=1)
    for _ in range(upkeep.GC_TICKS + 1):
        keeper.round()
    verbs = [verb for verb, _ in runner.calls]
    assert verbs.count("refresh") == upkeep.GC_TICKS + 1
    assert [i for i, verb in enumerate(verbs) if verb == "gc"] == [1, upkeep.GC_TICKS + 2]
    assert ("refresh", (0, 1)) in runner.calls  # a name that did not resolve is no failure
    state = keeper.state()
    assert state["rounds"] == upkeep.GC_TICKS + 1
    assert state["restored"] == ["c1"]
    assert state["error"] == ""
    assert state["last"] is not None


def test_a_failing_round_is_reported_once_and_cleared_by_a_good_one(capsys):
    runner = Recorder(fail="refresh")
    keeper = upkeep.Upkeep(runner, seconds=1)
    keeper.round()
    keeper.round()
    assert keeper.state()["error"] == "coi-net refresh: nft said no"
    assert capsys.readouterr().err.count("nft said no") == 1
    runner.fail = ""
    keeper.round()
    assert keeper.state()["error"] == ""


def _until(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_a_watched_child_that_ends_is_started_again_and_says_how_it_ended(tmp_path):
    count = tmp_path / "starts"
    watched = upkeep.Watched(["sh", "-c", f"echo x >> {count}; exit 3"])
    watched.start()
    try:
        assert _until(lambda: count.exists() and len(count.read_text().split()) >= 2)
        assert watched.state()["error"] == "sh ended (exit 3)"
        assert watched.state()["starts"] >= 2
    finally:
        watched.stop()


def test_a_watched_child_runs_until_the_service_stops_it():
    watched = upkeep.Watched(["sleep", "60"])
    watched.start()
    assert _until(lambda: watched.state()["running"])
    pid = watched.state()["pid"]
    watched.stop()
    assert _until(lambda: not watched.state()["running"])
    assert watched.state()["starts"] == 1
    assert _until(lambda: not os.path.exists(f"/proc/{pid}"))  # ended and reaped
