"""coi_common.incus against the real daemon: requests, lifecycle, and every typed error."""

import json

import pytest

from coi_common import proc
from coi_common.errors import AlreadyExists, IncusUnavailable, NotFound, PermissionDenied
from coi_common.incus import JOIN_GROUP_HINT, Incus

pytestmark = pytest.mark.incus

PROFILE = "coi"


def test_server_version_is_what_the_incus_cli_reports(incus_client):
    lines = proc.run(["incus", "version"]).stdout.splitlines()
    server_line = next(line for line in lines if line.startswith("Server version:"))
    assert incus_client.server_version() == server_line.split(":", 1)[1].strip()


def test_container_goes_through_create_start_clean_stop_delete(incus_client, test_image,
                                                                container_name, wait_for_ipv4):
    incus_client.create_instance(container_name, test_image, profiles=[PROFILE])
    assert incus_client.instance(container_name)["status"] == "Stopped"
    assert incus_client.instance_exists(container_name)

    incus_client.set_state(container_name, "start")
    assert incus_client.instance_state(container_name)["status"] == "Running"
    listed = {i["name"]: i["status"] for i in incus_client.instances(container_name)}
    assert listed == {container_name: "Running"}

    # Once booted (it has an address), systemd shuts down cleanly on Incus's request, ~2 s;
    # right after start it would still ignore it.
    wait_for_ipv4(container_name)
    incus_client.set_state(container_name, "stop", timeout=20)
    assert incus_client.instance(container_name)["status"] == "Stopped"

    incus_client.delete_instance(container_name)
    assert not incus_client.instance_exists(container_name)
    assert incus_client.instances(container_name) == []


@pytest.mark.parametrize("call", [
    lambda client, name: client.instance(name),
    lambda client, name: client.instance_state(name),
    lambda client, name: client.set_state(name, "start"),
    lambda client, name: client.delete_instance(name),
], ids=["instance", "instance_state", "set_state", "delete_instance"])
def test_missing_container_raises_not_found_naming_it(incus_client, container_name, call):
    with pytest.raises(NotFound) as raised:
        call(incus_client, container_name)
    assert f"container {container_name}" in raised.value.message


def test_missing_image_alias_is_none_for_lookup_and_not_found_for_create(incus_client,
                                                                          container_name):
    alias = f"coi-test-missing-{container_name[-8:]}"
    assert incus_client.image_by_alias(alias) is None
    with pytest.raises(NotFound) as raised:
        incus_client.create_instance(container_name, alias, profiles=[PROFILE])
    assert alias in raised.value.message
    assert not incus_client.instance_exists(container_name)


def test_cli_failure_on_a_missing_container_is_not_found(incus_client, container_name):
    with pytest.raises(NotFound) as raised:
        incus_client.cli(["info", container_name])
    assert container_name in raised.value.message


def test_creating_a_duplicate_name_raises_already_exists(incus_client, test_image,
                                                          container_name):
    incus_client.create_instance(container_name, test_image, profiles=[PROFILE])
    with pytest.raises(AlreadyExists) as raised:
        incus_client.create_instance(container_name, test_image, profiles=[PROFILE])
    assert container_name in raised.value.message
    assert incus_client.instance_exists(container_name)


def test_socket_path_that_does_not_exist_raises_incus_unavailable(open_tmp):
    path = open_tmp / "no-such.sock"
    with pytest.raises(IncusUnavailable) as raised:
        Incus(socket=str(path)).server()
    assert str(path) in raised.value.message
    assert "coi setup" in (raised.value.hint or "")


def test_stale_socket_nobody_listens_on_raises_incus_unavailable(stale_socket):
    with pytest.raises(IncusUnavailable) as raised:
        Incus(socket=str(stale_socket)).server_version()
    assert str(stale_socket) in raised.value.message
    assert "coi setup" in (raised.value.hint or "")


SNIPPET = """
import json
from coi_common.errors import CoiError
from coi_common.incus import Incus
try:
    Incus().server()
    print(json.dumps({"error": None}))
except CoiError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": exc.message, "hint": exc.hint}))
"""


def test_uid_outside_incus_admin_gets_permission_denied_with_group_hint(incus_client, nobody):
    done = proc.run([*nobody.argv, nobody.python, "-c", SNIPPET], env=nobody.env, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["error"] == PermissionDenied.__name__
    assert incus_client.socket in seen["message"]
    assert seen["hint"] == JOIN_GROUP_HINT
    assert "incus-admin" in seen["hint"]
