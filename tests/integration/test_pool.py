"""The warm pool (docs/pool.md) as a non-root member uses it, in the default
(restricted) network mode: `coi pool fill` makes containers up and under their rules,
`coi run` claims one and the pool is refilled behind it, a container is claimed only
when it would show the workspace as a new one would, and drain ends them unsaved."""

from __future__ import annotations

import json
import time

import pytest

from coi_common import naming, proc
from coi_net import policy as np

pytestmark = pytest.mark.incus
REFILL_SECONDS = 90


def idle(user_coi) -> list[dict]:
    """The pool's containers of the workspace, as `coi pool status --format json`."""
    done = user_coi("pool", "status", "--format", "json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    return record["containers"]


def filled(user_coi, size: int = 1) -> list[dict]:
    done = user_coi("pool", "fill", "--size", str(size), timeout=240)
    assert done.returncode == 0, done.stderr
    found = idle(user_coi)
    assert [c["ready"] for c in found] == [True] * size
    return found


def saved(user_coi) -> list[str]:
    """The ids of the user's saved sessions."""
    done = user_coi("session", "list", "--all", "--format", "json")
    assert done.returncode == 0, done.stderr
    return [s["id"] for s in json.loads(done.stdout)["sessions"]]


def hostname_of_run(user_coi, *flags: str, env: dict | None = None) -> str:
    done = user_coi("run", *flags, "--", "hostname", env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_filled_pool_serves_the_next_run_which_deletes_it_and_refills(user_coi,
                                                                         incus_client):
    [pooled] = filled(user_coi)
    instance = incus_client.instance_config(pooled["name"])
    assert instance["status"] == "Running"
    listed = json.loads(user_coi("list", "--format", "json").stdout)["active_containers"]
    assert [(c["name"], c["pooled"]) for c in listed] == [(pooled["name"], True)]
    done = user_coi("run", "--", "sh", "-c", "hostname; touch /workspace/made",
                    env={"COI_POOL_SIZE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == pooled["name"]
    made = user_coi.workspace / "made"
    assert (made.stat().st_uid, made.stat().st_gid) == (user_coi.user.uid, user_coi.user.gid)
    [refilled] = settled(user_coi, incus_client)
    assert refilled["created_at"] != pooled["created_at"]  # (its slot may be the same)


def settled(user_coi, incus_client, size: int = 1) -> list[dict]:
    """Once the background work of the runs is done (their ends, the refill), the
    pool's ready containers; the test fails when it takes over REFILL_SECONDS."""
    deadline = time.monotonic() + REFILL_SECONDS
    while time.monotonic() < deadline:
        ready = [c for c in idle(user_coi) if c["ready"]]
        if len(ready) == size and len(incus_client.instances(user_coi.prefix)) == size:
            return ready
        time.sleep(0.5)
    pytest.fail(f"the pool did not settle within {REFILL_SECONDS} s: {idle(user_coi)}")


def test_with_a_pool_a_run_ends_in_the_background_and_a_resume_right_after_has_its_save(
        user_coi, incus_client):
    filled(user_coi)
    pool_on = {"COI_POOL_SIZE": "1"}
    # 40 MiB more to save: the resume starts while the save still runs
    first = user_coi("run", "--", "sh", "-c", "head -c 40M /dev/urandom > ~/.dummy/big; "
                     "echo kept > ~/.dummy/note", env=pool_on)
    assert first.returncode == 0, first.stderr
    resumed = user_coi("run", "--resume", "--", "cat", "/home/code/.dummy/note", env=pool_on)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == "kept\n"
    settled(user_coi, incus_client)
    log = user_coi.user.home / ".coi" / "logs" / "end.log"
    assert "in the background" in log.read_text()


def test_a_pooled_container_has_its_restricted_rules_before_any_session(user_coi,
                                                                       host_service):
    [pooled] = filled(user_coi)
    table = proc.run(["nft", "list", "table", "bridge", host_service.table], check=False)
    assert np.host_name_for(pooled["name"], "default") in table.stdout


def test_a_secret_written_after_the_fill_is_masked_by_a_new_container_not_the_pooled(
        user_coi):
    [pooled] = filled(user_coi)
    (user_coi.workspace / ".env").write_text("TOKEN=hunter2\n")
    done = user_coi("run", "--", "sh", "-c", "hostname; cat /workspace/.env")
    assert done.returncode == 0, done.stderr
    name, *shown = done.stdout.splitlines()
    assert name != pooled["name"]
    assert shown == []
    assert [(c["name"], c["ready"]) for c in idle(user_coi)] == [(pooled["name"], False)]


def test_a_run_with_other_settings_makes_its_own_container(user_coi):
    [pooled] = filled(user_coi)
    assert hostname_of_run(user_coi, "--env", "EXTRA=1") != pooled["name"]
    assert [c["name"] for c in idle(user_coi)] == [pooled["name"]]


def test_an_idle_container_is_not_persisted_and_drain_ends_it_unsaved(user_coi,
                                                                       incus_client):
    [pooled] = filled(user_coi)
    saved_before = saved(user_coi)
    refused = user_coi("persist", pooled["name"])
    assert refused.returncode != 0
    assert "warm pool" in refused.stderr
    shown = user_coi("list")
    assert "RUNNING (POOL)" in shown.stdout
    drained = user_coi("pool", "drain")
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout.strip() == f"{pooled['name']}: removed from the pool"
    assert incus_client.instances(user_coi.prefix) == []
    assert saved(user_coi) == saved_before


def test_a_slot_asked_for_that_holds_a_pooled_container_of_other_settings_is_refused(
        user_coi, incus_client):
    [pooled] = filled(user_coi)
    slot = naming.parse_container_name(pooled["name"], user_coi.prefix)[1]
    done = user_coi("run", "--slot", str(slot), "--env", "EXTRA=1", "--", "true")
    assert done.returncode != 0
    assert "warm pool" in done.stderr
    assert "Traceback" not in done.stderr
    assert incus_client.instance_config(pooled["name"])["status"] == "Running"
