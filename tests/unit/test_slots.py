"""Slot allocation (coi-slot/coi_slot/slots.py) and coi-slot's listing and results, no daemon.

The Incus instances below are trimmed captures of `GET /1.0/instances?recursion=2`
from Incus 6.0.4 (test image, profile coi), scrubbed of volatile keys. To
refresh: start a container with user.coi.* keys from coi-test-image, run
`Incus().instances("coi-test-")` and keep name, status, created_at, config
(image.* and user.coi.*) and state.status/state.network.
"""

import json
import os
import threading
import time
from pathlib import Path

import pytest

from coi_common import protocol
from coi_common.errors import CoiError, NotFound, PermissionDenied, UsageError
from coi_common.naming import container_name
from coi_slot import actions, listing, slots

PREFIX = "coi-test-unit-"

RUNNING_INSTANCE = {
    "name": "coi-test-unit-1a2b3c4d-2",
    "status": "Running",
    "created_at": "2026-11-27T04:31:05.591882599Z",
    "config": {
        "image.description": "coi test image (Debian bookworm minbase)",
        "image.os": "debian",
        "user.coi.host_uid": "1000",
        "user.coi.image": "coi",
        "user.coi.network": "restricted",
        "user.coi.persistent": "true",
        "user.coi.slot": "2",
        "user.coi.tool": "claude",
        "user.coi.workspace": "/home/ana/src/app",
    },
    "state": {
        "status": "Running",
        "network": {
            "eth0": {"addresses": [
                {"family": "inet", "address": "10.151.43.165", "netmask": "24",
                 "scope": "global"},
                {"family": "inet6", "address": "fe80::1266:6aff:fe3a:e1c0", "netmask": "64",
                 "scope": "link"}]},
            "lo": {"addresses": [
                {"family": "inet", "address": "127.0.0.1", "netmask": "8",
                 "scope": "local"}]},
        },
    },
}

STOPPED_INSTANCE = {
    "name": "coi-test-unit-1a2b3c4d-1",
    "status": "Stopped",
    "created_at": "2026-11-26T22:00:00.000000001Z",
    "config": {
        "user.coi.image": "coi-rust",
        "user.coi.network": "open",
        "user.coi.persistent": "false",
        "user.coi.slot": "1",
        "user.coi.tool": "claude",
        "user.coi.workspace": "/home/ana/src/app",
    },
    "state": {"status": "Stopped", "network": None},
}


@pytest.fixture
def workspace(tmp_path: Path) -> str:
    path = tmp_path / "ws"
    path.mkdir()
    return str(path)


@pytest.fixture
def state_dir(tmp_path: Path) -> str:
    return str(tmp_path / "state")


def reserve(state_dir, workspace, existing=(), max_slots=10, wanted=None):
    return slots.reserve(state_dir, workspace, prefix=PREFIX, existing=existing,
                         max_slots=max_slots, wanted=wanted)


# -- lowest_free -----------------------------------------------------------------------------


@pytest.mark.parametrize(("taken", "max_slots", "expected"), [
    ((), 10, 1),
    ((1, 2, 3), 10, 4),
    ((1, 3), 10, 2),
    ((2, 3), 3, 1),
    ((1, 2, 3), 3, None),
    ((11, 12), 10, 1),
])
def test_lowest_free_is_the_smallest_slot_not_taken(taken, max_slots, expected):
    assert slots.lowest_free(taken, max_slots) == expected


# -- reserve and release -----------------------------------------------------------------------


def test_each_reservation_takes_the_next_lowest_slot(state_dir, workspace):
    assert [reserve(state_dir, workspace) for _ in range(3)] == [1, 2, 3]


def test_slots_whose_container_exists_are_skipped(state_dir, workspace):
    existing = [container_name(workspace, n, PREFIX) for n in (1, 2, 4)]
    assert reserve(state_dir, workspace, existing) == 3
    assert reserve(state_dir, workspace, existing) == 5


def test_containers_of_another_prefix_or_workspace_do_not_take_a_slot(state_dir, workspace,
                                                                      tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    existing = [container_name(workspace, 1, "coi-"), container_name(other, 1, PREFIX)]
    assert reserve(state_dir, workspace, existing) == 1


def test_when_every_slot_is_taken_the_error_says_so_in_one_line(state_dir, workspace):
    for _ in range(3):
        reserve(state_dir, workspace, max_slots=3)
    with pytest.raises(CoiError, match=r"^all 3 slots of .* are in use$") as caught:
        reserve(state_dir, workspace, max_slots=3)
    assert "\n" not in caught.value.one_line()


def test_reservations_expire(state_dir, workspace, monkeypatch):
    start = time.time()
    monkeypatch.setattr(slots.time, "time", lambda: start)
    assert reserve(state_dir, workspace) == 1
    monkeypatch.setattr(slots.time, "time", lambda: start + slots.RESERVATION_SECONDS - 1)
    assert reserve(state_dir, workspace) == 2
    monkeypatch.setattr(slots.time, "time", lambda: start + slots.RESERVATION_SECONDS + 1)
    assert reserve(state_dir, workspace) == 1  # slot 1's reservation ran out, slot 2's not


def test_expired_reservations_are_dropped_from_the_file(state_dir, workspace, monkeypatch):
    start = time.time()
    monkeypatch.setattr(slots.time, "time", lambda: start)
    reserve(state_dir, workspace)
    monkeypatch.setattr(slots.time, "time", lambda: start + slots.RESERVATION_SECONDS + 1)
    reserve(state_dir, workspace, wanted=5)
    data = json.loads(slots.slot_file(state_dir, workspace).read_text())
    assert list(data) == ["5"]


def test_release_frees_the_slot_at_once(state_dir, workspace):
    assert reserve(state_dir, workspace) == 1
    assert reserve(state_dir, workspace) == 2
    slots.release(state_dir, workspace, 1)
    assert reserve(state_dir, workspace) == 1


def test_releasing_a_slot_not_reserved_changes_nothing(state_dir, workspace):
    reserve(state_dir, workspace)
    before = slots.slot_file(state_dir, workspace).read_text()
    slots.release(state_dir, workspace, 7)
    assert slots.slot_file(state_dir, workspace).read_text() == before


def test_a_wanted_free_slot_is_granted_and_then_skipped_by_others(state_dir, workspace):
    assert reserve(state_dir, workspace, wanted=3) == 3
    assert [reserve(state_dir, workspace) for _ in range(3)] == [1, 2, 4]


def test_a_wanted_slot_whose_container_exists_is_granted(state_dir, workspace):
    existing = [container_name(workspace, 2, PREFIX)]
    assert reserve(state_dir, workspace, existing, wanted=2) == 2
    assert reserve(state_dir, workspace, existing, wanted=2) == 2  # attach again


def test_a_wanted_slot_being_set_up_by_another_caller_is_refused(state_dir, workspace):
    assert reserve(state_dir, workspace, wanted=2) == 2
    with pytest.raises(CoiError, match=r"slot 2 of .* is being set up by another coi command"):
        reserve(state_dir, workspace, wanted=2)


def test_a_damaged_reservation_file_counts_as_no_reservations(state_dir, workspace):
    path = slots.slot_file(state_dir, workspace)
    path.parent.mkdir(parents=True)
    path.write_text('{"1": "soon", "2": null, "3": true, "4": 9e99}')
    assert [reserve(state_dir, workspace) for _ in range(2)] == [1, 2]  # only 4 was valid
    path.write_text("not json")
    assert reserve(state_dir, workspace) == 1


# -- the lock ------------------------------------------------------------------------------------


def test_reserve_waits_while_another_holder_has_the_lock(state_dir, workspace):
    got = []
    with slots._locked(slots.slot_file(state_dir, workspace)):
        worker = threading.Thread(target=lambda: got.append(reserve(state_dir, workspace)))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive(), "reserve did not wait for the lock"
        assert got == []
    worker.join(5)
    assert got == [1]


def test_threads_reserving_at_once_get_distinct_slots(state_dir, workspace):
    got = []
    barrier = threading.Barrier(8)

    def take():
        barrier.wait()
        got.append(reserve(state_dir, workspace))

    workers = [threading.Thread(target=take) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert sorted(got) == list(range(1, 9))


def _reserve_in_child(state_dir, workspace):
    """A forked child reserving a slot; its number comes back through a pipe. Plain
    fork from the test's own thread: multiprocessing.Pool forks from a helper thread
    while others hold locks, and a child hung on one (seen once in CI)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        status = 1
        try:
            os.close(read)
            slot = slots.reserve(state_dir, workspace, prefix=PREFIX, existing=(), max_slots=10)
            os.write(write, str(slot).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    return pid, read


def test_processes_reserving_at_once_get_distinct_slots(state_dir, workspace):
    children = [_reserve_in_child(state_dir, workspace) for _ in range(6)]
    got = []
    for pid, read in children:
        with os.fdopen(read, "rb") as pipe:
            got.append(int(pipe.read() or b"0"))
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert sorted(got) == list(range(1, 7))


# -- listing: rows from Incus JSON ------------------------------------------------------------


def test_a_running_instance_becomes_a_row_with_its_coi_keys_and_address():
    row = listing.row_from_incus(RUNNING_INSTANCE)
    assert row == listing.ContainerRow(
        name="coi-test-unit-1a2b3c4d-2", status="Running", persistent=True,
        workspace="/home/ana/src/app", slot=2, image="coi", tool="claude",
        network="restricted", ipv4="10.151.43.165",
        created_at="2026-11-27T04:31:05.591882599Z", owner_uid=1000)
    assert row.mode == "persistent"


def test_a_stopped_instance_has_no_address_and_its_mode_comes_from_the_config():
    row = listing.row_from_incus(STOPPED_INSTANCE)
    assert (row.ipv4, row.mode, row.slot, row.image) == ("", "ephemeral", 1, "coi-rust")
    assert row.owner_uid is None  # no user.coi.host_uid recorded


def test_a_row_with_a_garbled_slot_key_shows_no_slot():
    raw = json.loads(json.dumps(STOPPED_INSTANCE))
    raw["config"]["user.coi.slot"] = "²"
    assert listing.row_from_incus(raw).slot is None


def test_only_a_global_inet_address_of_eth0_counts():
    state = {"network": {"eth0": {"addresses": [
        {"family": "inet6", "address": "fd42::1", "scope": "global"},
        {"family": "inet", "address": "169.254.1.1", "scope": "link"}]},
        "eth1": {"addresses": [{"family": "inet", "address": "10.0.0.2", "scope": "global"}]}}}
    assert listing.ipv4_of(state) == ""
    assert listing.ipv4_of(None) == ""


# -- listing: rendering -------------------------------------------------------------------------


def rows():
    return [listing.row_from_incus(RUNNING_INSTANCE), listing.row_from_incus(STOPPED_INSTANCE)]


def test_an_empty_list_is_one_friendly_line():
    assert listing.render_text([]) == "no coi containers"


def test_the_table_has_a_header_and_one_aligned_line_per_container():
    lines = listing.render_text(rows()).splitlines()
    assert lines[0].split() == ["NAME", "MODE", "STATUS", "SLOT", "IPV4", "IMAGE", "OWNER",
                                "CREATED", "WORKSPACE"]
    assert lines[1].split() == ["coi-test-unit-1a2b3c4d-2", "persistent", "RUNNING", "2",
                                "10.151.43.165", "coi", "1000", "2026-11-27", "04:31", "UTC",
                                "/home/ana/src/app"]
    assert lines[2].split()[:7] == ["coi-test-unit-1a2b3c4d-1", "ephemeral", "STOPPED", "1",
                                    "-", "coi-rust", "-"]
    column = lines[0].index("WORKSPACE")
    assert all(line[column:] == "/home/ana/src/app" for line in lines[1:])


def test_the_list_record_keeps_the_original_keys_and_adds_ours():
    record = protocol.validate(listing.list_record(rows()), "container_list")
    assert "saved_sessions" not in record
    first, second = record["active_containers"]
    assert first == {"name": "coi-test-unit-1a2b3c4d-2", "status": "Running",
                     "persistent": True, "workspace": "/home/ana/src/app",
                     "ipv4": "10.151.43.165", "image": "coi",
                     "created_at": "2026-11-27T04:31:05.591882599Z", "slot": 2,
                     "tool": "claude", "network": "restricted", "mode": "persistent",
                     "owner_uid": 1000, "pooled": False, "remote": "local",
                     "location": ""}
    assert (second["ipv4"], second["persistent"], second["owner_uid"]) == ("", False, None)


def test_an_empty_list_record_has_an_empty_list_and_sessions_only_when_asked():
    assert listing.list_record([])["active_containers"] == []
    assert listing.list_record([], [])["saved_sessions"] == []


def test_short_time_is_utc_to_the_minute_and_leaves_garbage_alone():
    assert listing.short_time("2026-11-27T06:31:05+02:00") == "2026-11-27 04:31 UTC"
    assert listing.short_time("yesterday") == "yesterday"
    assert listing.short_time("") == "-"


# -- listing: saved sessions ---------------------------------------------------------------------


def write_session(base, tool, session_id, metadata):
    directory = Path(f"{base}-{tool}") / session_id
    directory.mkdir(parents=True)
    if metadata is not None:
        (directory / "metadata.json").write_text(
            metadata if isinstance(metadata, str) else json.dumps(metadata))


def session_metadata(session_id, tool, workspace, updated_at):
    return {"coi": 1, "kind": "session", "id": session_id, "tool": tool,
            "workspace": workspace, "updated_at": updated_at}


@pytest.fixture
def listed_state_dir(tmp_path, monkeypatch, coi_env):
    """coi's state directory for `coi-session list --all`, the child listing.saved_sessions
    runs (from this checkout's bin/: coi_env)."""
    monkeypatch.setenv("COI_PATHS_STATE_DIR", str(tmp_path))
    return tmp_path


def test_saved_sessions_are_read_from_every_tool_store_newest_first(listed_state_dir, capfd):
    tmp_path = listed_state_dir
    base = tmp_path / "sessions"
    write_session(base, "claude", "old",
                  session_metadata("old", "claude", "/w/a", "2026-01-01T10:00:00Z"))
    write_session(base, "aider", "new",
                  session_metadata("new", "aider", "/w/b", "2026-02-01T10:00:00Z"))
    write_session(base, "claude", "broken", "{not json")
    found = listing.saved_sessions()
    assert [s.to_json() for s in found] == [
        {"ID": "new", "SavedAt": "2026-02-01T10:00:00Z", "Workspace": "/w/b", "Tool": "aider"},
        {"ID": "old", "SavedAt": "2026-01-01T10:00:00Z", "Workspace": "/w/a",
         "Tool": "claude"},
    ]
    assert "broken" in capfd.readouterr().err


def test_no_sessions_directory_means_no_saved_sessions(listed_state_dir):
    assert listing.saved_sessions() == []


def test_the_text_with_sessions_asked_for_has_a_second_part():
    saved = [listing.SavedSession("20260201-100000-abc", "2026-02-01T10:00:00Z", "/w/b",
                                  "claude")]
    text = listing.render_text([], saved)
    assert text.splitlines() == ["no coi containers", "", "Saved sessions:",
                                 "SESSION              TOOL    SAVED                 WORKSPACE",
                                 "20260201-100000-abc  claude  2026-02-01 10:00 UTC  /w/b"]
    assert listing.render_text([], []).splitlines() == ["no coi containers", "",
                                                        "no saved sessions"]


# -- actions: results and arguments ----------------------------------------------------------


@pytest.mark.parametrize(("result", "line"), [
    (actions.ActionResult("c-1", "kill", ok=True, deleted=True, saved=True), "killed c-1"),
    (actions.ActionResult("c-1", "kill", ok=True, deleted=True), "killed c-1 (session not saved)"),
    (actions.ActionResult("c-1", "shutdown", ok=True, persistent=True, changed=False),
     "c-1 was stopped already (persistent, kept)"),
    (actions.ActionResult("c-1", "clean", ok=True, deleted=True),
     "removed c-1 (stopped, ephemeral)"),
    (actions.ActionResult("c-1", "persist", ok=True, persistent=True), "c-1 is now persistent"),
    (actions.ActionResult("c-1", "persist", ok=True, persistent=True, changed=False),
     "c-1 was persistent already"),
    (actions.ActionResult("c-1", "shutdown", ok=True, deleted=True), "shut down c-1, deleted"),
    (actions.ActionResult("c-1", "shutdown", ok=True, persistent=True),
     "shut down c-1, kept (persistent)"),
    (actions.ActionResult("c-1", "shutdown", ok=True, deleted=True, forced=True,
                          message="no clean stop within 5 s"),
     "forced c-1 to stop (no clean stop within 5 s), deleted"),
])
def test_each_result_reads_as_one_line(result, line):
    assert result.line() == line


def test_a_result_record_is_a_valid_container_action():
    record = actions.ActionResult("c-1", "kill", ok=False, message="boom").record()
    assert protocol.validate(record, "container_action")["ok"] is False
    assert record["message"] == "boom"


@pytest.mark.parametrize("text", ["", "-1", "1.5", "ten", " 5", "1234567"])
def test_a_timeout_that_is_not_whole_seconds_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--timeout must be a whole number"):
        actions.stop_timeout(text)


def test_a_timeout_of_whole_seconds_is_taken():
    assert actions.stop_timeout("0") == 0
    assert actions.stop_timeout("30") == 30


def test_the_question_names_every_container():
    targets = [{"name": "c-1"}, {"name": "c-2"}]
    assert actions.question("kill", targets) == "Kill 2 containers (c-1, c-2)? [y/N] "
    assert actions.question("clean", targets[:1]) == "Remove 1 container (c-1)? [y/N] "


# -- actions: every stop and removal goes through the session hook ------------------------------


class FakeIncus:
    """Just enough of coi_common.incus.Incus for the verbs; deleting directly is a failure."""

    def __init__(self, status, *, stops_cleanly=True):
        self.state = status
        self.stops_cleanly = stops_cleanly
        self.calls = []

    def status(self, name):
        return self.state

    def set_state(self, name, action, *, force=False, timeout=-1):
        self.calls.append(("set_state", action, force, timeout))
        if not force and not self.stops_cleanly:
            raise CoiError("Failed shutting down instance: context deadline exceeded")
        self.state = "Stopped"

    def delete_instance(self, name):
        raise AssertionError("deleted without end_session")

    delete_instance_force = delete_instance


class EndSession:
    """sessions.end_session as its contract says: a container whose save failed
    (save_fails) is kept, with the reason; otherwise a persistent one is kept unless
    `remove`, an ephemeral one deleted. Records each call."""

    def __init__(self, persistent=(), save_fails=()):
        self.persistent = set(persistent)
        self.save_fails = set(save_fails)
        self.calls = []

    def __call__(self, client, name, *, save=True, remove=False):
        self.calls.append((name, save, remove))
        if save and name in self.save_fails:
            return actions.ending.Ending(
                saved=False, deleted=False,
                message=f"could not save the session of {name}: disk full; the container "
                        "is kept")
        deleted = remove or name not in self.persistent
        return actions.ending.Ending(saved=save, deleted=deleted)


@pytest.fixture
def ended(monkeypatch):
    fake = EndSession(persistent={"c-p", "c-p-bad"}, save_fails={"c-bad", "c-p-bad"})
    monkeypatch.setattr(actions.ending, "end_session", fake)
    return fake


def target(persistent=False, status="Running", name=None):
    return {"name": name or ("c-p" if persistent else "c-1"), "status": status,
            "config": {"user.coi.persistent": str(persistent).lower()}}


def test_kill_stops_at_once_then_ends_the_session_removing_the_container(ended):
    client = FakeIncus("Running")
    [result] = actions.act(client, "kill", [target()])
    assert client.calls == [("set_state", "stop", True, -1)]
    assert ended.calls == [("c-1", True, True)]
    assert (result.ok, result.deleted, result.saved) == (True, True, True)


def test_kill_removes_a_persistent_container_too(ended):
    [result] = actions.act(FakeIncus("Running"), "kill", [target(persistent=True)])
    assert ended.calls == [("c-p", True, True)]
    assert (result.ok, result.deleted, result.persistent) == (True, True, True)


def test_kill_no_save_ends_the_session_without_saving(ended):
    [result] = actions.act(FakeIncus("Running"), "kill", [target()], save=False)
    assert ended.calls == [("c-1", False, True)]
    assert (result.ok, result.deleted, result.saved) == (True, True, False)
    assert result.line() == "killed c-1 (session not saved)"


@pytest.mark.parametrize("persistent", [False, True])
def test_shutdown_stops_cleanly_then_ends_the_session(ended, persistent):
    client = FakeIncus("Running")
    [result] = actions.act(client, "shutdown", [target(persistent)], timeout=7)
    assert client.calls == [("set_state", "stop", False, 7)]
    assert ended.calls == [(result.name, True, False)]
    assert (result.ok, result.forced, result.deleted) == (True, False, not persistent)


def test_shutdown_forces_what_did_not_stop_in_time(ended):
    client = FakeIncus("Running", stops_cleanly=False)
    [result] = actions.act(client, "shutdown", [target()], timeout=2)
    assert client.calls == [("set_state", "stop", False, 2), ("set_state", "stop", True, -1)]
    assert (result.ok, result.forced, result.message) == (True, True, "no clean stop within 2 s")
    assert ended.calls == [("c-1", True, False)]


def test_shutdown_with_timeout_zero_stops_at_once(ended):
    client = FakeIncus("Running")
    [result] = actions.act(client, "shutdown", [target()], timeout=0)
    assert client.calls == [("set_state", "stop", True, -1)]
    assert (result.forced, result.message) == (True, "stopped at once")


def test_clean_ends_the_session(ended):
    [result] = actions.act(FakeIncus("Stopped"), "clean", [target(status="Stopped")])
    assert ended.calls == [("c-1", True, False)]
    assert (result.ok, result.deleted) == (True, True)


@pytest.mark.parametrize("action", ["kill", "shutdown", "clean"])
def test_a_session_that_could_not_be_saved_keeps_the_container_and_fails(ended, action):
    [result] = actions.act(FakeIncus("Stopped"), action,
                           [target(status="Stopped", name="c-bad")])
    assert (result.ok, result.deleted, result.saved) == (False, False, False)
    assert result.message.startswith("could not save the session of c-bad: disk full")


@pytest.mark.parametrize("action", ["kill", "shutdown"])
def test_a_persistent_container_whose_save_failed_fails_too(ended, action):
    [result] = actions.act(FakeIncus("Running"), action,
                           [target(persistent=True, name="c-p-bad")], timeout=0)
    assert (result.ok, result.deleted, result.persistent) == (False, False, True)
    assert result.message.startswith("could not save the session of c-p-bad")


def test_shutdown_all_leaves_a_stopped_persistent_container_alone_as_unchanged(ended):
    stopped, running = target(persistent=True, status="Stopped"), target()
    results = list(actions.act(FakeIncus("Stopped"), "shutdown", [stopped, running],
                               skip_stopped=True))
    assert [(r.name, r.ok, r.changed) for r in results] == [("c-p", True, False),
                                                           ("c-1", True, True)]
    assert [name for name, _, _ in ended.calls] == ["c-1"]


def test_kill_all_still_removes_a_stopped_persistent_container(ended):
    [result] = actions.act(FakeIncus("Stopped"), "kill",
                           [target(persistent=True, status="Stopped")], skip_stopped=True)
    assert (result.changed, result.deleted) == (True, True)


def test_named_stopped_persistent_container_is_saved_again(ended):
    [result] = actions.act(FakeIncus("Stopped"), "shutdown",
                           [target(persistent=True, status="Stopped")])
    assert ended.calls == [("c-p", True, False)]
    assert result.changed


def test_a_failure_on_one_container_is_a_result_and_the_next_one_still_runs(monkeypatch):
    def end_session(client, name, *, save=True, remove=False):
        if name == "c-1":
            raise CoiError("disk full")
        return actions.ending.Ending(saved=True, deleted=True)

    monkeypatch.setattr(actions.ending, "end_session", end_session)
    second = {**target(), "name": "c-2"}
    results = list(actions.act(FakeIncus("Stopped"), "kill", [target(), second]))
    assert [(r.name, r.ok, r.message) for r in results] == [("c-1", False, "disk full"),
                                                           ("c-2", True, "")]


# -- actions: whose containers ------------------------------------------------------------------


class Listing:
    """An Incus that lists session containers of two users (1001 and 1002)."""

    remote = None

    def __init__(self):
        self.found = [self.session("1a2b3c4d-1", "1001"), self.session("1a2b3c4d-2", "1002"),
                      self.session("5e6f7a8b-1", "1001", status="Stopped")]

    @staticmethod
    def session(suffix, host_uid, status="Running"):
        return {"name": f"{PREFIX}{suffix}", "status": status,
                "config": {"user.coi.workspace": "/w", "user.coi.host_uid": host_uid,
                           "user.coi.persistent": "false",
                           "user.coi.slot": suffix.rpartition("-")[2]}}

    def instances(self, prefix="", *, with_state=False):
        return [i for i in self.found if i["name"].startswith(prefix)]


def chosen(names=(), *, uid, all_users=False, every=False, action="kill"):
    targets = actions.select(Listing(), PREFIX, action, list(names), every=every, uid=uid,
                             all_users=all_users)
    return [t["name"].removeprefix(PREFIX) for t in targets]


def test_all_takes_only_the_callers_own_containers():
    assert chosen(uid=1001, every=True) == ["1a2b3c4d-1", "5e6f7a8b-1"]
    assert chosen(uid=1001, every=True, action="clean") == ["5e6f7a8b-1"]
    assert chosen(uid=1003, every=True) == []


def test_all_users_and_root_take_everyones():
    every = ["1a2b3c4d-1", "1a2b3c4d-2", "5e6f7a8b-1"]
    assert chosen(uid=1001, every=True, all_users=True) == every
    assert chosen(uid=0, every=True) == every


def test_naming_another_users_container_is_refused_before_anything_happens():
    with pytest.raises(PermissionDenied) as refused:
        chosen([f"{PREFIX}1a2b3c4d-1", f"{PREFIX}1a2b3c4d-2"], uid=1001)
    assert "belongs to uid 1002" in refused.value.one_line()
    assert "--all-users" in refused.value.one_line()
    assert chosen([f"{PREFIX}1a2b3c4d-2"], uid=1001, all_users=True) == ["1a2b3c4d-2"]


def test_a_name_that_is_not_coi_s_is_not_found_even_for_root():
    with pytest.raises(NotFound):
        chosen([f"{PREFIX}99999999-1"], uid=0)


def test_the_listing_shows_only_the_callers_containers_unless_all_users():
    mine = listing.list_containers(Listing(), PREFIX, uid=1002, all_users=False)
    assert [(r.name.removeprefix(PREFIX), r.owner_uid) for r in mine] == [("1a2b3c4d-2", 1002)]
    assert len(listing.list_containers(Listing(), PREFIX, uid=1002, all_users=True)) == 3
