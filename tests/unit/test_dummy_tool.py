"""The dummy assistant script, run on the host with HOME in a temporary directory."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from coi_common.tools import TOOLS_DIR

SCRIPT = TOOLS_DIR / "dummy"
BASH = shutil.which("bash") or "/bin/bash"


def run(home, *args, stdin=""):
    """Run the script under plain bash with only HOME and a minimal PATH."""
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run([BASH, str(SCRIPT), *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=10, check=False)


def history(home):
    return (home / ".dummy" / "history").read_text()


def test_script_is_executable_bash():
    assert SCRIPT.read_text().splitlines()[0] == "#!/bin/bash"
    assert os.stat(SCRIPT).st_mode & stat.S_IXUSR


def test_script_passes_bash_syntax_check():
    assert subprocess.run([BASH, "-n", str(SCRIPT)], check=False).returncode == 0


def test_fresh_start_reports_zero_lines_and_creates_state_dir(tmp_path):
    result = run(tmp_path, stdin="")
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "dummy: 0 lines of history"
    assert (tmp_path / ".dummy").is_dir()
    assert not (tmp_path / ".dummy" / "history").exists()


def test_each_line_is_noted_and_appended_to_history(tmp_path):
    result = run(tmp_path, stdin="first thing\nsecond thing\n")
    assert result.returncode == 0
    assert result.stdout == ("dummy: 0 lines of history\n"
                             "dummy> dummy: noted first thing\n"
                             "dummy> dummy: noted second thing\n"
                             "dummy> ")
    assert history(tmp_path) == "first thing\nsecond thing\n"


def test_start_counts_history_left_by_an_earlier_run(tmp_path):
    run(tmp_path, stdin="a\nb\nc\n")
    result = run(tmp_path, stdin="d\n")
    assert result.stdout.splitlines()[0] == "dummy: 3 lines of history"
    assert history(tmp_path) == "a\nb\nc\nd\n"


def test_exit_command_stops_and_is_not_recorded(tmp_path):
    result = run(tmp_path, stdin="kept\n/exit\nnever read\n")
    assert result.returncode == 0
    assert "never read" not in result.stdout
    assert history(tmp_path) == "kept\n"


def test_eof_ends_with_status_zero(tmp_path):
    result = run(tmp_path, stdin="only\n")
    assert result.returncode == 0
    assert result.stdout.endswith("dummy> ")
    assert result.stderr == ""


def test_last_line_without_newline_still_counts(tmp_path):
    run(tmp_path, stdin="unterminated")
    assert history(tmp_path) == "unterminated\n"


def test_lines_are_stored_verbatim(tmp_path):
    line = r"  -n \t $HOME `x` *"
    result = run(tmp_path, stdin=line + "\n")
    assert f"dummy: noted {line}\n" in result.stdout
    assert history(tmp_path) == line + "\n"


def test_version_prints_and_exits_without_touching_state(tmp_path):
    result = run(tmp_path, "--version", stdin="ignored\n")
    assert (result.returncode, result.stdout) == (0, "dummy 1.0\n")
    assert not (tmp_path / ".dummy").exists()


def test_continue_reports_resumed_after_the_history_line(tmp_path):
    run(tmp_path, stdin="x\n")
    result = run(tmp_path, "--autonomous", "--continue", stdin="")
    assert result.stdout.splitlines()[:2] == ["dummy: 1 lines of history", "dummy: resumed"]


def test_without_continue_it_does_not_claim_to_resume(tmp_path):
    result = run(tmp_path, "--autonomous", "whatever", stdin="")
    assert "resumed" not in result.stdout


@pytest.mark.parametrize("args", [(), ("--autonomous",), ("-x", "--flag=1", "word")])
def test_unknown_arguments_are_ignored(tmp_path, args):
    result = run(tmp_path, *args, stdin="hi\n")
    assert result.returncode == 0
    assert "dummy: noted hi" in result.stdout
