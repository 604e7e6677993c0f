"""The instance keys v1 (sessions.SessionContainer) against an instance captured from a
real incusd (tests/unit/data/session_instance.json: `incus query` of a coi session
container during a test run, its volatile keys trimmed)."""

import json
from pathlib import Path

import pytest

from coi_common.sessions import KEY, SessionContainer

CAPTURED = json.loads((Path(__file__).parent / "data" / "session_instance.json").read_text())


def test_a_captured_session_container_reads_back_every_key():
    keys = SessionContainer.from_instance(CAPTURED)
    assert keys == SessionContainer(
        workspace="/tmp/coi-test-1elwlpag/ws", slot=1, persistent=False,
        image="coi-test-image", tool="claude", network="restricted", host_uid=0)


def test_the_keys_written_at_create_are_the_ones_read_back():
    keys = SessionContainer.from_instance(CAPTURED)
    written = keys.to_config()
    assert set(written) == {f"{KEY}{key}" for key in SessionContainer.CREATE_KEYS}
    assert all(CAPTURED["config"][key] == value for key, value in written.items())
    assert SessionContainer.from_instance({"config": written}) == keys


@pytest.mark.parametrize(("key", "value"), [
    ("workspace", "relative/path"), ("slot", "0"), ("slot", "x1"), ("slot", "\u0661"),
    ("persistent", "yes"), ("host_uid", "-1"), ("network", "wide"), ("slot", "9" * 40),
    ("origin", "not-hex"), ("origin", "0123456789ABCDEF")])
def test_a_container_whose_key_does_not_parse_is_not_a_coi_session(key, value):
    hostile = {**CAPTURED, "config": {**CAPTURED["config"], f"{KEY}{key}": value}}
    assert SessionContainer.from_instance(hostile) is None


def test_a_container_without_coi_keys_is_not_a_coi_session():
    assert SessionContainer.from_instance({"name": "web", "config": {"image.os": "debian"}}) \
        is None


def test_a_remote_containers_origin_is_written_and_read_back():
    keys = SessionContainer.from_instance(CAPTURED)
    remote = SessionContainer(**{**keys.__dict__, "origin": "0123456789abcdef"})
    written = remote.to_config()
    assert written[f"{KEY}origin"] == "0123456789abcdef"
    assert SessionContainer.from_instance({"config": written}) == remote
