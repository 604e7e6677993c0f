"""--dry-run's plan (coi_common.plan): at each place where coi changes something, a
planned change is recorded and not made, a read is still made, and what was assumed
comes back; every state-changing command offers --dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import coi_image
import coi_net
import coi_shell
import coi_slot
from coi_common import hostservice, plan, plumbing, protocol, usage
from coi_common.errors import IncusUnavailable
from coi_common.incus import ExecSpec, Incus

ROOT = Path(__file__).resolve().parents[2]
NO_SOCKET = "/nonexistent/coi-test/unix.socket"
"""Where nothing listens: a call that reaches for it fails, a planned one never does."""

CHANGING_COMMANDS = {
    coi_shell: ("[shell]", "run"),
    coi_slot: ("next", "end", "kill", "shutdown", "clean", "persist"),
    coi_image: ("build", "build custom", "image publish", "image delete", "image cleanup"),
    coi_net: ("[network] apply", "[network] remove", "[network] gc"),
}


@pytest.fixture
def planning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run for this test only."""
    monkeypatch.setattr(plan, "_steps", None)
    plan.start()


def test_a_planned_change_is_a_step_and_never_reaches_incus(planning):
    client = Incus(socket=NO_SOCKET)
    client.delete_instance("coi-x-1")
    client.set_config("coi-x-1", {"user.coi.persistent": "true"})
    assert [(s["step"], s["call"]) for s in plan.steps()] == [
        (1, "DELETE /1.0/instances/coi-x-1?project=default"),
        (2, "PATCH /1.0/instances/coi-x-1?project=default")]
    assert plan.steps()[1]["body"] == {"config": {"user.coi.persistent": "true"}}


def test_a_read_is_made_in_a_dry_run(planning):
    with pytest.raises(IncusUnavailable):
        Incus(socket=NO_SOCKET).instance("coi-x-1")
    assert plan.steps() == []


def test_a_planned_exec_is_named_as_its_trace_line_and_assumed_to_succeed(planning):
    client = Incus(socket=NO_SOCKET)
    spec = ExecSpec("coi-x-1", ("sh", "-c", "exit 7"), user=1000)
    done = client.exec_capture(spec)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert client.exec_handover(spec) == 0
    [first, second] = plan.steps()
    assert first["call"] == second["call"] == "exec coi-x-1 sh -c exit 7"
    assert first["argv"] == client.exec_argv(spec)


def test_an_incus_cli_call_that_writes_is_planned_and_one_that_reads_is_made(planning):
    client = Incus(socket=NO_SOCKET)
    done = client.cli(["image", "import", "/nonexistent.tar.gz"])
    assert done.ok
    assert plan.steps()[0]["call"] == \
        "run incus --project default image import /nonexistent.tar.gz"
    read = client.cli(["--version"], reads=True)
    assert read.ok
    assert read.stdout.strip()
    assert len(plan.steps()) == 1


def test_a_planned_child_is_not_started_and_answers_what_its_caller_assumed(
        planning, monkeypatch):
    monkeypatch.setenv("COI_BIN_DIR", str(ROOT / "bin"))
    ended = {"coi": 1, "kind": "container_action", "name": "x", "action": "end", "ok": True}
    child = plumbing.Child("coi-slot", ["end"], kind="container_action", dry_run=[ended])
    assert child.process is None
    assert child.finish({"coi": 1, "kind": "slot"}) == [ended]
    [step] = plan.steps()
    assert (step["call"], step["input"]) == ("child coi-slot end", {"coi": 1, "kind": "slot"})


def test_a_child_that_only_reads_runs_for_real_in_a_dry_run(planning, monkeypatch):
    monkeypatch.setenv("COI_BIN_DIR", str(ROOT / "bin"))
    child = plumbing.Child("coi-slot", ["--version"], dry_run=plumbing.READS)
    assert child.process is not None
    with pytest.raises(protocol.BadInput):  # --version prints text, not records: it ran
        child.finish()
    assert plan.steps() == []


def test_the_steps_a_child_planned_join_the_plan_marked_with_its_program(planning):
    plan.step("child", ["coi-slot", "next"])
    plan.adopt("coi-slot", [
        {"coi": 1, "kind": "plan_step", "step": 1, "call": "reserve slot 1 of /w",
         "file": "/s.json"},
        {"coi": 1, "kind": "slot", "call": "not a step"}])
    assert plan.steps()[1:] == [{"coi": 1, "kind": "plan_step", "step": 2,
                                 "call": "reserve slot 1 of /w", "by": "coi-slot",
                                 "file": "/s.json"}]


def test_a_host_service_change_is_planned_with_its_request_and_a_ping_is_asked(
        planning, monkeypatch):
    monkeypatch.setenv(hostservice.SOCKET_VARIABLE, NO_SOCKET)
    assumed = {"source": "/run/coi/views/coi-x-1"}
    assert hostservice.call("view_build", assumed=assumed, container="coi-x-1") == assumed
    [step] = plan.steps()
    assert step["call"] == "service view_build"
    assert step["request"]["container"] == "coi-x-1"
    with pytest.raises(IncusUnavailable):
        hostservice.call("ping")


def test_without_dry_run_nothing_is_recorded(monkeypatch):
    monkeypatch.setattr(plan, "_steps", None)
    assert plan.step("DELETE", "/1.0/instances/x") is False
    assert not plan.active()
    assert plan.steps() == []


def test_the_json_plan_is_one_valid_record_per_step(planning, capsys):
    plan.step("POST", "/1.0/instances?project=default", body={"name": "coi-x-1"})
    plan.step("exec", ("coi-x-1", "true"))
    plan.render(as_json=True)
    lines = capsys.readouterr().out.splitlines()
    records = [protocol.parse_record(line, plan.KIND) for line in lines]
    assert [(r["step"], r["call"]) for r in records] == [
        (1, "POST /1.0/instances?project=default"), (2, "exec coi-x-1 true")]
    assert plan.CONTRACT_VERSION == protocol.CONTRACT_VERSION


def test_the_text_plan_numbers_each_step_and_shortens_a_long_body(planning, capsys):
    plan.step("POST", "/1.0/instances?project=default", body={"config": "x" * 500})
    plan.render(as_json=False)
    head, line = capsys.readouterr().out.splitlines()
    assert head.startswith("dry run: nothing was changed; the real run makes 1 change ")
    assert line.startswith("  1. POST /1.0/instances?project=default  {")
    assert line.endswith("...")
    assert len(line) < 200
    assert json.dumps({"body": {"config": "x" * 500}})[:50] in line


@pytest.mark.parametrize("module", list(CHANGING_COMMANDS), ids=lambda m: m.__name__)
def test_every_command_that_changes_state_offers_dry_run(module):
    _, patterns = usage.patterns_of(module.__doc__)
    for command in CHANGING_COMMANDS[module]:
        usages = [p for p in patterns if p.startswith(command + " ") or p == command]
        assert usages, command
        assert all("[--dry-run]" in usage for usage in usages), (command, usages)
