"""The Incus layer against the real daemon: one kept-alive connection per client,
listings Incus itself filters by name prefix, and COI_TRACE on a real `coi list`.

The containers are created stopped (`incus init`: no start, no network), named with
the test's own prefix, and removed at the end whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from coi_common import naming, proc
from coi_common.errors import NotFound
from coi_common.incus import Incus, name_filter

pytestmark = pytest.mark.incus

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "coi"


@pytest.fixture
def two_stopped_sessions(coi_env, incus_client, test_image, tmp_path) -> Iterator[list[str]]:
    """Two stopped coi session containers under the test's prefix, and a stopped decoy
    whose name holds that prefix but does not start with it."""
    workspace = naming.canonical_workspace(tmp_path)
    names = [naming.container_name(workspace, slot, coi_env.prefix) for slot in (1, 2)]
    decoy = f"coi-test-{secrets.token_hex(3)}-{coi_env.prefix}x"
    made = []
    try:
        for slot, name in enumerate(names, start=1):
            made.append(name)
            incus_client.create_instance(name, test_image, profiles=[PROFILE], config={
                "user.coi.workspace": workspace, "user.coi.slot": str(slot),
                "user.coi.persistent": "false"})
        made.append(decoy)
        incus_client.create_instance(decoy, test_image, profiles=[PROFILE])
        yield names
    finally:
        for name in made:
            with contextlib.suppress(NotFound):
                incus_client.delete_instance_force(name)


def test_a_client_doing_twenty_requests_opens_one_connection():
    client = Incus()
    versions = {client.server_version() for _ in range(20)}
    assert len(versions) == 1
    assert client.connections_opened == 1


def test_incus_filters_a_listing_by_name_prefix_itself(coi_env, incus_client,
                                                       two_stopped_sessions):
    urls = incus_client.request("GET", "/1.0/instances",
                                params={"filter": name_filter(coi_env.prefix)})
    assert sorted(url.rsplit("/", 1)[-1] for url in urls) == sorted(two_stopped_sessions)


def test_listing_returns_exactly_the_tests_containers_with_or_without_state(coi_env,
                                                                         two_stopped_sessions):
    client = Incus()
    for with_state in (False, True):  # stopped: nothing to add, no request per container
        found = client.instances(coi_env.prefix, with_state=with_state)
        assert sorted(i["name"] for i in found) == sorted(two_stopped_sessions)
        assert all(i["status"] == "Stopped" and "state" not in i
                   and i["config"]["user.coi.workspace"] for i in found)
    assert client.connections_opened == 1


def test_coi_list_traces_its_rest_calls_on_stderr_and_keeps_stdout_json(
        coi_env, two_stopped_sessions):
    done = proc.run([str(ROOT / "bin" / "coi"), "list", "--format", "json"],
                    env=coi_env.environ(COI_TRACE="1"), timeout=60)
    listed = json.loads(done.stdout)
    assert sorted(c["name"] for c in listed["active_containers"]) == sorted(
        two_stopped_sessions)
    lines = done.stderr.splitlines()
    assert lines
    assert all(line.startswith("coi-trace: ") for line in lines), lines
    listing = [line for line in lines if " GET /1.0/instances?" in line]
    assert len(listing) == 1, lines
    assert "filter=" in listing[0]
    assert listing[0].endswith(" ms 200")
