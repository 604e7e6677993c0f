"""`coi doctor` run as a program on this set-up machine: all well, no daemon, no permission."""

import subprocess
from pathlib import Path

import pytest

from coi_common.errors import EXIT_PERMISSION, EXIT_UNAVAILABLE
from coi_common.incus import JOIN_GROUP_HINT
from coi_common.protocol import parse_record

pytestmark = pytest.mark.incus

COI = str(Path(__file__).resolve().parents[2] / "bin" / "coi")
REQUIRED = {"daemon", "permission", "storage pool", "bridge", "profile"}


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
