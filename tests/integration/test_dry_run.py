"""--dry-run: the plan of a state-changing command is exactly what its real run then does,
and making the plan changes nothing; as the non-root member in the default (restricted)
network mode. The real run's calls come from COI_TRACE, whose lines name a call as a
plan step does (trace.what)."""

import os
import re
from pathlib import Path

import pytest

from coi_common import naming
from coi_common.protocol import parse_record

pytestmark = pytest.mark.incus

TRACE_LINE = re.compile(r"^coi-trace: (\d+) (.*?) \d+\.\d ms ")
CHANGES = ("POST ", "PUT ", "PATCH ", "DELETE ", "exec ", "child ", "service ", "run incus ")
"""The calls a trace shows that change something, or may (a plan's steps are these)."""
READS = ("service ping", "child coi-session restore --check")
"""Traced calls of those kinds that change nothing: in a trace, never in a plan."""


def planned(stdout: str) -> list[str]:
    """The calls of a --format json plan (after the command's own records) that the
    command makes itself (not its children, whose own steps carry `by`)."""
    records = [parse_record(line) for line in stdout.splitlines() if line.strip()]
    steps = [r for r in records if r["kind"] == "plan_step"]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    return [s["call"] for s in steps if "by" not in s and s["call"].startswith(CHANGES)]


def made(trace: str, marker: str) -> list[str]:
    """The changing calls of the one process whose trace shows the call `marker`."""
    lines = [TRACE_LINE.match(line) for line in trace.splitlines()]
    assert all(lines), trace
    [pid] = {m[1] for m in lines if m[2] == marker or m[2].startswith(marker + " ")}
    return [m[2] for m in lines if m[1] == pid and m[2].startswith(CHANGES)
            and not m[2].startswith(READS)]


def traced(user_coi, *args: str) -> str:
    """Run `coi ARGS` for real as the member, with COI_TRACE into a file they own."""
    trace = Path(user_coi.workspace).parent / f"{Path(user_coi.workspace).name}.trace"
    trace.touch()
    os.chown(trace, user_coi.user.uid, user_coi.user.gid)
    try:
        done = user_coi(*args, env={"COI_TRACE": str(trace)})
        assert done.returncode == 0, done.stderr
        return trace.read_text()
    finally:
        trace.unlink()


def test_a_dry_run_of_coi_run_changes_nothing_and_plans_what_the_real_run_does(
        user_coi, incus_client):
    dry = user_coi("run", "--dry-run", "--format", "json", "--", "true")
    assert dry.returncode == 0, dry.stderr
    plan = planned(dry.stdout)
    assert incus_client.instances(user_coi.prefix) == []
    assert list(Path(user_coi.workspace).iterdir()) == []  # not even a placeholder made
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    assert {"child coi-slot next", "child coi-net apply", "child coi-session restore",
            "child coi-slot end", "service view_build", f"exec {name} true",
            f"PUT /1.0/instances/{name}/state?project=default"} <= set(plan), plan
    # The real run takes slot 1 too: the dry run reserved nothing.
    real = made(traced(user_coi, "run", "--", "true"), "child coi-slot next")
    assert set(real) == set(plan)


def test_a_dry_run_of_coi_kill_keeps_the_container_and_plans_what_the_real_kill_does(
        user_coi, incus_client):
    started = user_coi("run", "--persistent", "--", "true")
    assert started.returncode == 0, started.stderr
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    dry = user_coi("kill", name, "--dry-run", "--format", "json")
    assert dry.returncode == 0, dry.stderr
    plan = planned(dry.stdout)
    assert incus_client.instance_exists(name)
    assert {f"child coi-session save {name}", f"child coi-net remove {name}",
            f"DELETE /1.0/instances/{name}?project=default"} <= set(plan), plan
    real = made(traced(user_coi, "kill", name), f"child coi-session save {name}")
    assert set(real) == set(plan)
    assert not incus_client.instance_exists(name)
