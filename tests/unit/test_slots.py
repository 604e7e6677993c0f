"""Slot allocation (lib/coi_common/slots.py) and coi-slot's listing and results, no daemon.

The Incus instances below are trimmed captures of `GET /1.0/instances?recursion=2`
from Incus 6.0.4 (test image, profile coi), scrubbed of volatile keys. To
refresh: start a container with user.coi.* keys from coi-test-image, run
`Incus().instances("coi-test-")` and keep name, status, created_at, config
(image.* and user.coi.*) and state.status/state.network.
"""

import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from coi_common import protocol, slots
from coi_common.errors import CoiError, UsageError
from coi_common.naming import container_name
from coi_slot import actions, listing

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


def _reserve_in_child(args):
    state_dir, workspace = args
    return slots.reserve(state_dir, workspace, prefix=PREFIX, existing=(), max_slots=10)


def test_processes_reserving_at_once_get_distinct_slots(state_dir, workspace):
    with multiprocessing.get_context("fork").Pool(6) as pool:
        got = pool.map(_reserve_in_child, [(state_dir, workspace)] * 6)
    assert sorted(got) == list(range(1, 7))


# -- listing: rows from Incus JSON ------------------------------------------------------------


def test_a_running_instance_becomes_a_row_with_its_coi_keys_and_address():
    row = listing.row_from_incus(RUNNING_INSTANCE)
    assert row == listing.ContainerRow(
        name="coi-test-unit-1a2b3c4d-2", status="Running", persistent=True,
        workspace="/home/ana/src/app", slot=2, image="coi", tool="claude",
        network="restricted", ipv4="10.151.43.165",
        created_at="2026-11-27T04:31:05.591882599Z")
    assert row.mode == "persistent"


def test_a_stopped_instance_has_no_address_and_its_mode_comes_from_the_config():
    row = listing.row_from_incus(STOPPED_INSTANCE)
    assert (row.ipv4, row.mode, row.slot, row.image) == ("", "ephemeral", 1, "coi-rust")


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
    assert lines[0].split() == ["NAME", "MODE", "STATUS", "SLOT", "IPV4", "IMAGE", "CREATED",
                                "WORKSPACE"]
    assert lines[1].split() == ["coi-test-unit-1a2b3c4d-2", "persistent", "RUNNING", "2",
                                "10.151.43.165", "coi", "2026-11-27", "04:31", "UTC",
                                "/home/ana/src/app"]
    assert lines[2].split()[:6] == ["coi-test-unit-1a2b3c4d-1", "ephemeral", "STOPPED", "1",
                                    "-", "coi-rust"]
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
                     "tool": "claude", "network": "restricted", "mode": "persistent"}
    assert (second["ipv4"], second["persistent"]) == ("", False)


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


def test_saved_sessions_are_read_from_every_tool_store_newest_first(tmp_path, capsys):
    base = tmp_path / "sessions"
    write_session(base, "claude", "old",
                  session_metadata("old", "claude", "/w/a", "2026-01-01T10:00:00Z"))
    write_session(base, "aider", "new",
                  session_metadata("new", "aider", "/w/b", "2026-02-01T10:00:00Z"))
    write_session(base, "claude", "broken", "{not json")
    found = listing.saved_sessions(str(tmp_path))
    assert [s.to_json() for s in found] == [
        {"ID": "new", "SavedAt": "2026-02-01T10:00:00Z", "Workspace": "/w/b", "Tool": "aider"},
        {"ID": "old", "SavedAt": "2026-01-01T10:00:00Z", "Workspace": "/w/a",
         "Tool": "claude"},
    ]
    assert "broken" in capsys.readouterr().err


def test_no_sessions_directory_means_no_saved_sessions(tmp_path):
    assert listing.saved_sessions(str(tmp_path / "nothing-here")) == []


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
    (actions.ActionResult("c-1", "kill", ok=True, deleted=True), "killed c-1"),
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
        self.status = status
        self.stops_cleanly = stops_cleanly
        self.timeout = 30.0
        self.calls = []

    def instance_state(self, name):
        return {"status": self.status}

    def set_state(self, name, action, *, force=False, timeout=-1):
        self.calls.append(("set_state", action, force, timeout))
        if not force and not self.stops_cleanly:
            raise CoiError("Failed shutting down instance: context deadline exceeded")
        self.status = "Stopped"

    def delete_instance(self, name):
        raise AssertionError("deleted without end_session")

    delete_instance_force = delete_instance


@pytest.fixture
def ended(monkeypatch):
    calls = []
    monkeypatch.setattr(actions.sessions, "end_session",
                        lambda client, name, *, delete: calls.append((name, delete)))
    return calls


def target(persistent=False, status="Running"):
    return {"name": "c-1", "status": status,
            "config": {"user.coi.persistent": str(persistent).lower()}}


def test_kill_stops_at_once_then_ends_the_session_with_delete(ended):
    client = FakeIncus("Running")
    [result] = actions.act(client, "kill", [target(persistent=True)])
    assert client.calls == [("set_state", "stop", True, -1)]
    assert ended == [("c-1", True)]
    assert (result.ok, result.deleted) == (True, True)


@pytest.mark.parametrize(("persistent", "delete"), [(False, True), (True, False)])
def test_shutdown_stops_cleanly_then_ends_the_session_deleting_only_ephemeral(
        ended, persistent, delete):
    client = FakeIncus("Running")
    [result] = actions.act(client, "shutdown", [target(persistent)], timeout=7)
    assert client.calls == [("set_state", "stop", False, 7)]
    assert client.timeout >= 7 + actions.REPLY_TIMEOUT_MARGIN
    assert ended == [("c-1", delete)]
    assert (result.forced, result.deleted) == (False, delete)


def test_shutdown_forces_what_did_not_stop_in_time(ended):
    client = FakeIncus("Running", stops_cleanly=False)
    [result] = actions.act(client, "shutdown", [target()], timeout=2)
    assert client.calls == [("set_state", "stop", False, 2), ("set_state", "stop", True, -1)]
    assert (result.ok, result.forced, result.message) == (True, True, "no clean stop within 2 s")
    assert ended == [("c-1", True)]


def test_shutdown_with_timeout_zero_stops_at_once(ended):
    client = FakeIncus("Running")
    [result] = actions.act(client, "shutdown", [target()], timeout=0)
    assert client.calls == [("set_state", "stop", True, -1)]
    assert (result.forced, result.message) == (True, "stopped at once")


def test_clean_ends_the_session_with_delete(ended):
    [result] = actions.act(FakeIncus("Stopped"), "clean", [target(status="Stopped")])
    assert ended == [("c-1", True)]
    assert result.ok


def test_a_failure_on_one_container_is_a_result_and_the_next_one_still_runs(monkeypatch):
    def end_session(client, name, *, delete):
        if name == "c-1":
            raise CoiError("disk full")

    monkeypatch.setattr(actions.sessions, "end_session", end_session)
    second = {**target(), "name": "c-2"}
    results = list(actions.act(FakeIncus("Stopped"), "kill", [target(), second]))
    assert [(r.name, r.ok, r.message) for r in results] == [("c-1", False, "disk full"),
                                                           ("c-2", True, "")]
