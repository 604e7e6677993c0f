"""COI_TRACE (coi_common.trace): one line per external call, in its documented format,
on stderr or appended to a file by many processes, and nothing at all when unset.

Each case runs a small Python child (the variable is read once per process, as
coi's own executables do), which makes its calls through coi_common.proc and
coi_common.incus; `incus` is a stub script on PATH where an exec is involved.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from coi_common import trace

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"coi-trace: (?P<pid>\d+) (?P<what>.+) (?P<ms>\d+\.\d) ms (?P<outcome>.+)")

CALLS = """
import os, sys
from coi_common import proc
print(os.getpid(), flush=True)
proc.run(["true"])
proc.run(["sh", "-c", "exit 3"], check=False)
try:
    proc.run(["coi-no-such-program"])
except Exception:
    pass
proc.spawn(["true"]).wait()
"""


def run_child(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != trace.VARIABLE}
    environ.update(PYTHONPATH=str(ROOT / "lib"), **env)
    return subprocess.run([sys.executable, "-c", code], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, check=True, timeout=60)


def parsed(text: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    matches = [LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    return [m.groupdict() for m in matches if m]


def test_trace_1_prints_each_process_start_on_stderr_as_it_ends(tmp_path, capfd):
    subprocess.run([sys.executable, "-c", CALLS], check=True, cwd=tmp_path, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "lib"), trace.VARIABLE: "1"})
    out, err = capfd.readouterr()
    lines = parsed(err)
    assert {line["pid"] for line in lines} == {out.strip()}
    assert [(line["what"], line["outcome"]) for line in lines[:3]] == [
        ("run true", "exit 0"),
        ("run sh -c exit 3", "exit 3"),
        ("run coi-no-such-program",
         "NotFound: program 'coi-no-such-program' is not installed"),
    ]
    assert lines[3]["what"] == "spawn true"
    assert re.fullmatch(r"started pid \d+", lines[3]["outcome"])
    assert len(lines) == 4


@pytest.mark.parametrize("value", [None, "", "0"])
def test_unset_empty_or_0_traces_nothing(tmp_path, value):
    env = {} if value is None else {trace.VARIABLE: value}
    done = run_child(CALLS, tmp_path, **env)
    assert done.stderr == ""


def test_the_variable_is_read_once_per_process(tmp_path):
    code = ("import os\nfrom coi_common import proc\nproc.run(['true'])\n"
            f"os.environ[{trace.VARIABLE!r}] = '1'\nproc.run(['true'])\n")
    assert run_child(code, tmp_path).stderr == ""


def test_a_trace_file_gets_the_whole_lines_of_two_processes_appended(tmp_path):
    target = tmp_path / "trace.log"
    target.write_text("kept\n")
    code = "from coi_common import proc\nfor _ in range(50):\n    proc.run(['true'])\n"
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), trace.VARIABLE: str(target)}
    children = [subprocess.Popen([sys.executable, "-c", code], env=environ,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    pids = {str(child.pid) for child in children}
    assert [child.communicate(timeout=60)[1] for child in children] == ["", ""]
    first, *rest = target.read_text().splitlines()
    assert first == "kept"
    lines = parsed("\n".join(rest))
    assert len(lines) == 100
    assert {line["pid"] for line in lines} == pids
    assert {(line["what"], line["outcome"]) for line in lines} == {("run true", "exit 0")}


def test_a_new_trace_file_is_readable_by_its_owner_only(tmp_path):
    target = tmp_path / "new.log"
    run_child("from coi_common import proc\nproc.run(['true'])\n", tmp_path,
              **{trace.VARIABLE: str(target)})
    assert target.stat().st_mode & 0o777 == trace.FILE_MODE


def test_a_long_command_line_is_shortened_to_keep_the_line_readable(tmp_path):
    code = "from coi_common import proc\nproc.run(['echo', 'x' * 500, 'y'])\n"
    (line,) = parsed(run_child(code, tmp_path, **{trace.VARIABLE: "1"}).stderr)
    assert len(line["what"]) == trace.WHAT_MAX
    assert line["what"].startswith("run echo xxx")
    assert line["what"].endswith("...")
    assert line["outcome"] == "exit 0"


def stub_incus(tmp_path: Path, script: str) -> dict[str, str]:
    folder = tmp_path / "bin"
    folder.mkdir()
    stub = folder / "incus"
    stub.write_text("#!/bin/sh\n" + script)
    stub.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}", trace.VARIABLE: "1"}


EXEC = """
from coi_common.incus import ExecSpec, Incus
done = Incus().exec_capture(ExecSpec("coi-x-1", ("tmux", "new-session", "-d")))
print(done.returncode, done.stdout.strip())
"""


def test_an_exec_is_one_line_naming_the_container_and_command(tmp_path):
    env = stub_incus(tmp_path, "echo inside; exit 4\n")
    done = run_child(EXEC, tmp_path, **env)
    assert done.stdout == "4 inside\n"
    assert [(line["what"], line["outcome"]) for line in parsed(done.stderr)] == [
        ("exec coi-x-1 tmux new-session -d", "exit 4")]


def test_an_exec_incus_did_not_start_is_traced_as_a_retry_line(tmp_path):
    marker = tmp_path / "failed-once"
    env = stub_incus(tmp_path, f"if [ ! -e {marker} ]; then touch {marker}; "
                               "echo 'Error: Failed to retrieve PID of executing child "
                               "process' >&2; exit 1; fi\necho inside\n")
    done = run_child(EXEC, tmp_path, **env)
    assert done.stdout == "0 inside\n"
    lines = parsed(done.stderr)
    assert [(line["what"], line["outcome"]) for line in lines] == [
        ("exec coi-x-1 tmux new-session -d", "exit 1"),
        ("retry exec coi-x-1 tmux new-session -d", "Incus did not start it"),
        ("exec coi-x-1 tmux new-session -d", "exit 0"),
    ]
    assert lines[1]["ms"] == "200.0"  # the pause before the next try


def test_incus_cli_calls_other_than_exec_are_traced_as_the_process_they_start(tmp_path):
    env = stub_incus(tmp_path, "echo '[]'\n")
    code = ("from coi_common.incus import Incus\n"
            "Incus().cli(['list', '--format', 'json'])\n")
    (line,) = parsed(run_child(code, tmp_path, **env).stderr)
    assert (line["what"], line["outcome"]) == (
        "run incus --project default list --format json", "exit 0")
