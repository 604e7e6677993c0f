"""Whose container it is: the recorded owner, the caller, and who sees what."""

import os

import pytest

from coi_common import owners
from coi_common.errors import PermissionDenied


def instance(name, host_uid=None):
    config = {"user.coi.workspace": "/w"}
    if host_uid is not None:
        config["user.coi.host_uid"] = host_uid
    return {"name": name, "config": config}


@pytest.mark.parametrize(("recorded", "expected"), [
    ("1001", 1001), ("0", 0), (None, None), ("", None), ("-1", None), ("10 01", None),
    ("\u0661\u0660\u0660\u0661", None), ("1e3", None), (1001, None)])
def test_owner_uid_is_the_recorded_uid_when_it_is_plain_digits(recorded, expected):
    assert owners.owner_uid(instance("c", recorded)) == expected


def test_owner_uid_of_an_instance_without_config_is_none():
    assert owners.owner_uid({"name": "c"}) is None


MIXED = [instance("a", "1001"), instance("b", "1002"), instance("c"), instance("d", "0")]


def test_a_user_sees_only_their_own_containers():
    assert [i["name"] for i in owners.visible(MIXED, uid=1001, all_users=False)] == ["a"]


def test_all_users_shows_every_container():
    assert owners.visible(MIXED, uid=1001, all_users=True) == MIXED


def test_root_sees_every_container_without_asking():
    assert owners.visible(MIXED, uid=0, all_users=False) == MIXED


def test_acting_on_another_users_container_is_refused_naming_owner_and_flag():
    with pytest.raises(PermissionDenied) as refused:
        owners.refuse_others([MIXED[0], MIXED[1]], uid=1001, all_users=False)
    assert refused.value.exit_code == 5
    assert refused.value.one_line() == \
        "b belongs to uid 1002; you are uid 1001 (add --all-users to act on it anyway)"


def test_a_container_without_an_owner_is_refused_too():
    with pytest.raises(PermissionDenied, match="c has no recorded owner"):
        owners.refuse_others([MIXED[2]], uid=1001, all_users=False)


def test_own_containers_root_and_all_users_are_not_refused():
    owners.refuse_others([MIXED[0]], uid=1001, all_users=False)
    owners.refuse_others(MIXED, uid=0, all_users=False)
    owners.refuse_others(MIXED, uid=1001, all_users=True)


def test_caller_is_the_sudo_user_when_root_runs_through_sudo(monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: 0)
    monkeypatch.setenv("SUDO_UID", "1234")
    monkeypatch.setenv("SUDO_GID", "1234")
    assert owners.caller_uid() == 1234
    monkeypatch.delenv("SUDO_UID")
    assert owners.caller_uid() == 0


def test_sudo_uid_of_a_non_root_caller_is_ignored(monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: 1001)
    monkeypatch.setenv("SUDO_UID", "1234")
    assert owners.caller_uid() == 1001
