"""The warm pool's rules without a daemon: the session shape (coi_slot.pool), what a
view covers (views.coverage), which containers are idle and claimable, the record
and key fields, and forks.detach, which hands a held lock to a background copy."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from pathlib import Path

import pytest

from coi_common import config, forks, sessions, views
from coi_common.errors import BadInput
from coi_slot import listing, pool

KEY = sessions.KEY
WORKSPACE = "/home/ana/src/app"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config.Config:
    for name in list(os.environ):
        if name.startswith("COI_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("COI_SYSTEM_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return config.load(None)


def record(**changes: object) -> sessions.SlotRecord:
    base = sessions.SlotRecord(WORKSPACE, 0, "", False, "coi", "coi", "claude")
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("change", [
    {"image": "coi-rust"}, {"network": "open"}, {"environment": {"A": "1"}},
    {"mounts": (sessions.Mount("/srv/data", "/data"),)}, {"mask": False},
    {"limits": {"cpu": "2", "memory": "4GiB", "processes": 100}}, {"tool": "dummy"},
    {"storage": "/srv/storage"}, {"force": True}, {"config_profile": "rust"}])
def test_every_setting_baked_into_a_container_changes_the_shape(settings, change) -> None:
    assert pool.pool_shape(record(**change), settings) != pool.pool_shape(record(), settings)


def test_the_slot_name_resume_and_claim_do_not_change_the_shape(settings) -> None:
    other = record(slot=3, container="coi-1a2b3c4d-3", resume="latest", pooled=True)
    assert pool.pool_shape(other, settings) == pool.pool_shape(record(), settings)
    assert sessions.is_pool_shape(pool.pool_shape(record(), settings))


def test_the_config_that_shapes_the_view_changes_the_shape(settings, monkeypatch) -> None:
    before = pool.pool_shape(record(), settings)
    monkeypatch.setenv("COI_SECURITY_ALLOW_SETUID", "true")
    assert pool.pool_shape(record(), config.load(None)) != before


def coverage(workspace: Path) -> str:
    return views.coverage(str(workspace), [".git/hooks/", ".coi.toml"], [".env", "*.pem",
                                                                          "!.env.example"])


def test_a_new_secret_anywhere_changes_the_coverage_and_a_plain_file_does_not(
        tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    before = coverage(tmp_path)
    (tmp_path / "src" / "main.py").write_text("print()\n")
    (tmp_path / ".env.example").write_text("A=\n")
    assert coverage(tmp_path) == before
    (tmp_path / "src" / "key.pem").write_text("secret\n")
    assert coverage(tmp_path) != before


def test_a_protected_path_made_or_changed_in_kind_changes_the_coverage(tmp_path) -> None:
    before = coverage(tmp_path)
    (tmp_path / ".coi.toml").write_text("")
    made = coverage(tmp_path)
    assert made != before
    (tmp_path / ".git").mkdir()
    assert coverage(tmp_path) != made


def test_secrets_under_skipped_trees_do_not_count_as_they_are_not_masked(tmp_path) -> None:
    before = coverage(tmp_path)
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / ".env").write_text("x\n")
    assert coverage(tmp_path) == before


def instance(slot: int, *, key: str = "s.c", uid: str = "1000", status: str = "Running",
             image: str = "abc") -> dict:
    return {"name": f"coi-1a2b3c4d-{slot}", "status": status,
            "config": {f"{KEY}workspace": WORKSPACE, f"{KEY}slot": str(slot),
                       f"{KEY}persistent": "false", f"{KEY}host_uid": uid,
                       f"{KEY}pool": key, "volatile.base_image": image}}


def test_idle_containers_are_the_callers_own_of_the_workspace_by_slot() -> None:
    found = pool.idle_of([instance(3), instance(1), instance(2, uid="1001"),
                          instance(4, key="")], WORKSPACE, 1000)
    assert [keys.slot for _i, keys in found] == [1, 3]
    assert [keys.slot for _i, keys in pool.idle_of([instance(3), instance(1)], WORKSPACE,
                                                   1000, slot=3)] == [3]


def test_only_a_running_container_of_the_key_and_the_current_image_is_claimable() -> None:
    assert pool.claimable(instance(1), "s.c", "abc")
    assert not pool.claimable(instance(1, status="Stopped"), "s.c", "abc")
    assert not pool.claimable(instance(1), "s.other", "abc")
    assert not pool.claimable(instance(1, image="rebuilt"), "s.c", "abc")


def test_a_claimed_container_emptied_of_its_key_is_a_session_again() -> None:
    keys = sessions.SessionContainer.from_instance(instance(1, key=""))
    assert keys is not None
    assert not keys.idle_in_pool


def test_coi_list_marks_an_idle_pooled_container() -> None:
    row = listing.row_from_incus(instance(1))
    assert row.to_json()["pooled"] is True
    assert "RUNNING (POOL)" in listing.render_text([row])


def test_a_slot_record_carries_pool_and_pooled_and_refuses_a_bad_shape(tmp_path) -> None:
    workspace = str(tmp_path)
    made = record(workspace=workspace, slot=1, container=sessions.naming.container_name(
        workspace, 1), pool="0123456789abcdef", pooled=True).to_record()
    again = sessions.SlotRecord.from_record(made)
    assert (again.pool, again.pooled) == ("0123456789abcdef", True)
    with pytest.raises(BadInput, match="pool"):
        sessions.SlotRecord.from_record({**made, "pool": "../../etc"})
    with pytest.raises(BadInput, match="pooled"):
        sessions.SlotRecord.from_record({**made, "pooled": "yes"})


def test_a_detached_copy_keeps_the_lock_after_its_parent_left(tmp_path: Path) -> None:
    lock_path, log = tmp_path / "lock", tmp_path / "log"
    pid = os.fork()
    if pid == 0:  # the parent of the detached copy, as coi-slot end --background is
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if forks.detach(str(log)):
            os._exit(0)
        os.write(1, f"detached {os.getpid()}\n".encode())
        time.sleep(1.5)
        os._exit(0)
    os.waitpid(pid, 0)
    fd = os.open(lock_path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the copy holds it still
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            pytest.fail("the detached copy never let the lock go")
    finally:
        os.close(fd)
    assert log.read_text().startswith("detached ")
