"""`coi doctor` run as a program on this set-up machine: all well, no daemon, no permission;
and as a normal member of incus-admin, with and without coi's host service."""

import json
import os
import socketserver
import subprocess
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from coi_common import idmap
from coi_common.errors import EXIT_FAILED, EXIT_PERMISSION, EXIT_UNAVAILABLE
from coi_common.incus import JOIN_GROUP_HINT
from coi_common.protocol import make_record, parse_record
from coi_host.doctor import START_SERVICE_FIX

pytestmark = pytest.mark.incus

COI = str(Path(__file__).resolve().parents[2] / "bin" / "coi")
REQUIRED = {"daemon", "permission", "storage pool", "bridge", "profile", "network rules"}
USER_CHECKS = {"nft", "network rules", "idmap delegation"}
STAND_IN_VERSION = "9.9.9-stand-in"


def doctor(*args, env, prefix=()):
    return subprocess.run([*prefix, COI, "doctor", *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def test_doctor_json_is_one_ok_record_with_daemon_pool_bridge_profile(coi_env, incus_client):
    done = doctor("--format", "json", env=coi_env.environ())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == 1
    record = parse_record(done.stdout, "doctor")
    assert record["ok"] is True
    checks = {check["name"]: check for check in record["checks"]}
    assert set(checks) >= REQUIRED
    assert all(checks[name]["ok"] for name in REQUIRED), checks
    assert "coi" in checks["storage pool"]["detail"]
    assert "coibr0" in checks["bridge"]["detail"]


def test_doctor_with_a_stale_socket_exits_4_naming_problem_and_fix(coi_env, stale_socket):
    done = doctor(env=coi_env.environ(COI_INCUS_SOCKET=str(stale_socket)))
    assert done.returncode == EXIT_UNAVAILABLE
    assert f"FAIL daemon: Incus is not answering on {stale_socket}" in done.stdout
    assert "fix: sudo coi setup" in done.stdout
    assert "daemon" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_doctor_json_with_a_stale_socket_reports_the_failed_daemon_check(coi_env,
                                                                         stale_socket):
    done = doctor("--format", "json", env=coi_env.environ(COI_INCUS_SOCKET=str(stale_socket)))
    assert done.returncode == EXIT_UNAVAILABLE
    record = parse_record(done.stdout, "doctor")
    daemon = next(check for check in record["checks"] if check["name"] == "daemon")
    assert record["ok"] is False
    assert daemon["ok"] is False
    assert str(stale_socket) in daemon["detail"]
    assert "coi setup" in daemon["fix"]
    assert "Traceback" not in done.stderr


def test_doctor_as_uid_outside_incus_admin_exits_5_with_group_hint(nobody):
    done = doctor(env=nobody.env, prefix=nobody.argv)
    assert done.returncode == EXIT_PERMISSION, done.stdout + done.stderr
    assert "FAIL permission: no permission to use the Incus socket" in done.stdout
    assert f"fix: {JOIN_GROUP_HINT}" in done.stdout
    assert "incus-admin" in done.stdout
    assert "Traceback" not in done.stderr + done.stdout


# -- as a normal member of incus-admin ---------------------------------------------------


UPKEEP = {"tick_seconds": 10.0, "rounds": 3, "last": None, "error": "", "restored": []}
RESOLVER_DOWN = {"running": False, "pid": None, "starts": 3, "error": "coi-net ended (exit 1)"}


class _PingAnswerer(socketserver.StreamRequestHandler):
    result: ClassVar[dict] = {"version": STAND_IN_VERSION, "upkeep": UPKEEP,
                              "resolver": RESOLVER_DOWN}

    def handle(self):
        request = json.loads(self.rfile.readline())
        reply = make_record("host_reply", verb=request["verb"], result=self.result)
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class _OldPingAnswerer(_PingAnswerer):
    result: ClassVar[dict] = {"version": STAND_IN_VERSION}  # from before its upkeep


@pytest.fixture
def answering_service(open_tmp):
    """A stand-in for coi's host service on its own socket, answering every request as
    the service answers a ping: this machine's service may be down, or another version."""
    yield from _stand_in(open_tmp / "host.sock", _PingAnswerer)


@pytest.fixture
def old_service(open_tmp):
    """The stand-in of a host service too old to keep rules up by itself."""
    yield from _stand_in(open_tmp / "old-host.sock", _OldPingAnswerer)


def _stand_in(path, handler):
    server = socketserver.UnixStreamServer(str(path), handler)
    os.chmod(path, 0o666)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path
    server.shutdown()
    server.server_close()


def doctor_as(user, **env):
    done = user.run([COI, "doctor", "--format", "json"], env=env, timeout=60)
    record = parse_record(done.stdout, "doctor")
    assert "Traceback" not in done.stderr
    return done.returncode, {check["name"]: check for check in record["checks"]}


def test_doctor_as_a_normal_user_finds_nft_in_sbin_although_its_path_lacks_it(test_user):
    assert "sbin" not in test_user.login_env()["PATH"]
    _, checks = doctor_as(test_user)
    assert set(checks) >= USER_CHECKS
    assert checks["nft"]["ok"], checks["nft"]
    assert checks["nft"]["detail"] in ("/usr/sbin/nft", "/sbin/nft", "/usr/local/sbin/nft")


def test_doctor_as_a_normal_user_without_the_host_service_requires_it_and_the_idmap(
        make_test_user, open_tmp):
    user = make_test_user()
    status, checks = doctor_as(user, COI_HOST_SOCKET=str(open_tmp / "absent.sock"))
    assert status == EXIT_FAILED
    network, delegation = checks["network rules"], checks["idmap delegation"]
    assert (network["ok"], network["required"]) == (False, True)
    assert "host service is not running" in network["detail"]
    assert network["fix"] == START_SERVICE_FIX
    assert (delegation["ok"], delegation["required"]) == (False, True)
    assert f"uid {user.uid}/gid {user.gid}" in delegation["detail"]
    assert "automatically on first use" in delegation["fix"]
    assert "sudo coi setup" in delegation["fix"]


def test_doctor_as_a_normal_user_with_the_host_service_only_warns_about_the_idmap(
        make_test_user, answering_service):
    user = make_test_user()
    status, checks = doctor_as(user, COI_HOST_SOCKET=str(answering_service))
    assert status == 0, checks
    network, delegation = checks["network rules"], checks["idmap delegation"]
    assert network["ok"], network
    assert STAND_IN_VERSION in network["detail"]
    assert (delegation["ok"], delegation["required"]) == (False, False)
    assert "host service grants it on first use" in delegation["detail"]


def test_doctor_shows_the_rules_upkeep_and_fails_on_a_service_without_it(
        make_test_user, answering_service, old_service):
    user = make_test_user()
    _, checks = doctor_as(user, COI_HOST_SOCKET=str(answering_service))
    assert checks["rules upkeep"]["ok"], checks["rules upkeep"]
    assert "every 10.0 s" in checks["rules upkeep"]["detail"]
    status, checks = doctor_as(user, COI_HOST_SOCKET=str(old_service))
    assert status == 1
    assert checks["rules upkeep"]["ok"] is False
    assert checks["rules upkeep"]["fix"] == START_SERVICE_FIX


def test_doctor_shows_the_real_service_s_allowlist_resolver_running(test_user):
    _, checks = doctor_as(test_user)
    resolver = checks["allowlist resolver"]
    assert resolver["ok"], resolver
    assert "running (pid " in resolver["detail"]


def test_doctor_warns_when_the_allowlist_resolver_is_down_without_failing(
        make_test_user, answering_service, old_service):
    user = make_test_user()
    _, checks = doctor_as(user, COI_HOST_SOCKET=str(answering_service))
    resolver = checks["allowlist resolver"]
    assert (resolver["ok"], resolver["required"]) == (False, False)
    assert "not running: coi-net ended (exit 1) (3 starts)" in resolver["detail"]
    _, checks = doctor_as(user, COI_HOST_SOCKET=str(old_service))
    assert checks["allowlist resolver"]["ok"] is False
    assert "older than this coi" in checks["allowlist resolver"]["detail"]


def test_doctor_as_a_delegated_normal_user_reports_the_idmap_ok(make_test_user,
                                                                answering_service):
    user = make_test_user()  # its finalizer removes the lines added here
    for path, ident in ((idmap.SUBUID, user.uid), (idmap.SUBGID, user.gid)):
        with open(path, "a") as handle:
            handle.write(f"root:{ident}:1\n")
    _, checks = doctor_as(user, COI_HOST_SOCKET=str(answering_service))
    assert checks["idmap delegation"]["ok"], checks["idmap delegation"]
    assert f"root may map uid {user.uid}/gid {user.gid}" in checks["idmap delegation"]["detail"]
