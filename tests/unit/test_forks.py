"""coi_common.forks: a coi child started as a fork is its program as a fresh start would
be (argv, environment, stdin/stdout pipes, only descriptors 0-2, a session of its own,
coi_common's per-process state reset), its status comes back, and plumbing forks only
this installation's own programs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from coi_common import forks, locks, plan, plumbing, proc, trace

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
    import json, os, sys
    from coi_common import locks, plan, trace
    with trace.span("run", ["the-probes-own-call"]):
        pass
    line = sys.stdin.readline()
    print(json.dumps({"argv": sys.argv, "line": line, "rest": sys.stdin.read(),
                      "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
                      "session_leader": os.getsid(0) == os.getpid(),
                      "env": os.environ.get("FORK_TEST_VALUE"),
                      "ending": sorted(locks._ending), "planning": plan.active()}))
    sys.exit(int(os.environ.get("FORK_TEST_STATUS", "0")))
"""


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    package = tmp_path / "forkprobe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(textwrap.dedent(PROBE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "forkprobe"


def _run(module: str, payload: bytes, env: dict[str, str] | None = None
         ) -> tuple[dict[str, object], int]:
    child = forks.fork_program("coi-probe", module, ["one", "two words"], env or {})
    out, _ = child.communicate(payload)
    return json.loads(out), child.returncode or 0


def test_a_fork_runs_the_module_with_its_argv_stdin_and_environment(probe: str) -> None:
    seen, status = _run(probe, b'{"kind": "slot"}\nmore', {"FORK_TEST_VALUE": "given"})
    assert status == 0
    assert seen["argv"][1:] == ["one", "two words"]
    assert seen["line"] == '{"kind": "slot"}\n'
    assert seen["rest"] == "more"
    assert seen["env"] == "given"
    assert "FORK_TEST_VALUE" not in os.environ  # the parent's environment is its own


def test_a_fork_has_only_its_standard_descriptors_and_a_session_of_its_own(
        probe: str) -> None:
    read_end, write_end = os.pipe()  # a descriptor of the parent the program must not get
    try:
        seen, _ = _run(probe, b"\n")
    finally:
        os.close(read_end)
        os.close(write_end)
    assert seen["fds"] == [0, 1, 2, 3]  # 3: listdir's own handle on /proc/self/fd
    assert seen["session_leader"] is True


def test_a_fork_starts_with_coi_commons_per_process_state_reset(probe: str) -> None:
    locks._ending.add("coi-held-by-the-parent")
    plan.start()
    try:
        seen, _ = _run(probe, b"\n")
    finally:
        plan.stop()
        locks._ending.discard("coi-held-by-the-parent")
    assert seen["ending"] == []
    assert seen["planning"] is False


def test_a_forks_own_calls_are_traced(probe: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    traced = tmp_path / "trace"
    monkeypatch.setattr(trace, "_target", str(traced))
    monkeypatch.setattr(trace, "_fd", None)
    child = forks.fork_program("coi-probe", probe, [], {})
    child.communicate(b"\n")
    lines = traced.read_text().splitlines()
    assert f"coi-trace: {child.pid} run the-probes-own-call" in "\n".join(lines)
    assert any(line.split()[2] == "fork" for line in lines)


def test_the_status_of_the_program_is_the_forks_status(probe: str) -> None:
    _seen, status = _run(probe, b"\n", {"FORK_TEST_STATUS": "5"})
    assert status == 5


def test_a_module_that_cannot_be_run_ends_the_fork_with_status_70(
        capfd: pytest.CaptureFixture[str]) -> None:
    child = forks.fork_program("coi-probe", "no_such_coi_module", [], {})
    out, _ = child.communicate(b"")
    assert (out, child.returncode) == (b"", forks.FAILED_TO_START)
    assert "coi-probe: could not start" in capfd.readouterr().err


def test_wait_with_a_timeout_raises_as_popen_does(probe: str) -> None:
    child = forks.fork_program("coi-probe", probe, [], {})  # waits for its stdin
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.1)
    finally:
        child.communicate(b"\n")
    assert child.returncode == 0


def test_plumbing_forks_only_this_checkouts_own_programs(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    stub = tmp_path / "coi-slot"
    stub.write_text("#!/bin/sh\n")
    assert plumbing.own_module("coi-slot", str(ROOT / "bin" / "coi-slot")) == "coi_slot"
    assert plumbing.own_module("coi-slot", str(stub)) is None
    monkeypatch.setenv(forks.VARIABLE, "0")
    assert plumbing.own_module("coi-slot", str(ROOT / "bin" / "coi-slot")) is None


def test_only_the_main_thread_forks() -> None:
    found: list[bool] = []
    worker = threading.Thread(target=lambda: found.append(forks.enabled()))
    worker.start()
    worker.join()
    assert forks.enabled() is True
    assert found == [False]


@pytest.mark.parametrize("forking", ["1", "0"])
def test_a_coi_child_answers_the_same_forked_or_spawned(forking: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    traced = tmp_path / "trace"
    monkeypatch.setenv(forks.VARIABLE, forking)
    monkeypatch.setenv("COI_BIN_DIR", str(ROOT / "bin"))
    monkeypatch.setenv(trace.VARIABLE, str(traced))
    monkeypatch.setattr(trace, "_target", str(traced))
    monkeypatch.setattr(trace, "_fd", None)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bin" / "coi")])
    records = plumbing.call("coi-session", ["list", "--all"], kind="session")
    assert records == []  # a fresh HOME (conftest) has no saved session
    started = [line.split()[2] for line in traced.read_text().splitlines()
               if "coi-session list" in line and " child " not in line]
    assert started == (["fork"] if forking == "1" else ["spawn"])


def test_a_fork_can_be_stopped_as_soon_as_it_is_started(probe: str) -> None:
    child = forks.fork_program("coi-probe", probe, [], {})  # would wait for its stdin
    proc.stop_group(child, grace=0)
    assert child.poll() == -signal.SIGKILL
