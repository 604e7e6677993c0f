"""The coi dispatcher: help, version, unknown names, exec of owners and coi-NAME."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import coi_dispatch as dispatch
from coi_common.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dispatch.main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_bare_coi_lists_every_command_with_its_summary(capsys):
    code, out, _ = run_main([], capsys)
    assert code == 0
    for command in COMMANDS:
        assert f"  {command.name} " in out
        assert command.summary in out


def test_help_flag_and_help_command_print_the_same_overview(capsys):
    _, by_flag, _ = run_main(["--help"], capsys)
    _, by_command, _ = run_main(["help"], capsys)
    assert by_flag == by_command == dispatch.overview() + "\n"


def test_unknown_command_is_one_line_with_exit_2_and_a_suggestion(capsys):
    code, out, err = run_main(["shel"], capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "did you mean 'shell'" in err


def test_unknown_command_without_close_match_points_to_help(capsys):
    code, _, err = run_main(["zzzzzz"], capsys)
    assert code == 2
    assert "'zzzzzz' is not a coi command; see 'coi --help'" in err


def test_unknown_option_before_command_is_a_usage_error(capsys):
    code, _, err = run_main(["--bogus"], capsys)
    assert code == 2
    assert err.startswith("coi: ")


def test_version_json_is_a_version_record_even_without_incus(capsys, monkeypatch):
    monkeypatch.setenv("INCUS_SOCKET", "/nonexistent/unix.socket")
    code, out, _ = run_main(["version", "--format", "json"], capsys)
    record = json.loads(out)
    assert code == 0
    assert record["kind"] == "version"
    assert record["coi"] == 1
    assert record["incus"] == "unavailable"
    assert record["python_version"] == ".".join(map(str, sys.version_info[:3]))


def test_version_rejects_an_unknown_format(capsys):
    code, _, err = run_main(["version", "--format", "xml"], capsys)
    assert code == 2
    assert "unknown format 'xml'" in err


def test_help_of_a_builtin_shows_its_usage(capsys):
    code, out, _ = run_main(["help", "version"], capsys)
    assert code == 0
    assert "coi version [--format FMT]" in out


def test_help_of_unknown_command_fails_with_exit_2(capsys):
    code, _, _ = run_main(["help", "nosuch"], capsys)
    assert code == 2


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_a_script_for_each_shell_that_asks_coi_for_candidates(capsys,
                                                                                shell):
    code, out, _ = run_main(["completion", shell], capsys)
    assert code == 0
    assert "coi __complete" in out
    assert f"for {shell}" in out


def test_completion_of_an_unknown_shell_is_refused_in_one_line(capsys):
    code, _, err = run_main(["completion", "tcsh"], capsys)
    assert code == 2
    assert err == "coi: no completion for shell 'tcsh'; one of: bash, zsh, fish\n"


def test_version_ignores_the_words_after_it_and_dash_v_is_version(capsys):
    code, out, _ = run_main(["version", "please", "now"], capsys)
    assert code == 0
    assert out.startswith("coi ")
    code, short, _ = run_main(["-V"], capsys)
    assert not code
    assert short.startswith("coi ")


def make_stub(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def run_coi(args, env_extra):
    env = {**os.environ, **env_extra}
    return subprocess.run([str(ROOT / "bin" / "coi"), *args], capture_output=True, text=True,
                          env=env, check=False)


def test_known_command_runs_its_owner_with_the_name_and_passes_the_status(tmp_path):
    make_stub(tmp_path, "coi-shell", 'echo "owner got: $*"; exit 7')
    done = run_coi(["shell", "--slot", "2"], {"COI_BIN_DIR": str(tmp_path)})
    assert done.returncode == 7
    assert done.stdout == "owner got: shell --slot 2\n"


def test_unknown_name_runs_coi_name_from_path_like_git(tmp_path):
    make_stub(tmp_path, "coi-frobnicate", 'echo "external: $*"')
    path = f"{tmp_path}:{os.environ['PATH']}"
    done = run_coi(["frobnicate", "a", "b"], {"PATH": path, "COI_BIN_DIR": str(tmp_path / "none")})
    assert done.returncode == 0
    assert done.stdout == "external: a b\n"


def test_missing_owner_is_reported_in_one_line(tmp_path):
    done = run_coi(["shell"], {"COI_BIN_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 3
    assert done.stderr.strip().count("\n") == 0
    assert "needs coi-shell" in done.stderr


def test_debug_flag_shows_a_traceback_only_when_asked(tmp_path):
    quiet = run_coi(["nosuch"], {})
    loud = run_coi(["--debug", "nosuch"], {})
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in loud.stderr
    assert quiet.returncode == loud.returncode == 2


def _launched_module(*args: str, **env: str) -> str:
    """The module bin/coi's launcher runs for `coi ARGS` (`sh -x` shows its exec)."""
    done = subprocess.run(["sh", "-x", str(ROOT / "bin" / "coi"), *args],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=30, check=False)
    line = next(line for line in done.stderr.splitlines() if " -m " in line and "exec" in line)
    return line.split(" -m ", 1)[1].split()[0]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.owner != "coi"])
def test_the_launcher_hands_a_command_straight_to_its_owner(command):
    assert _launched_module(command.name, "--help") == command.owner.replace("-", "_")


def test_built_ins_options_first_unknown_names_and_stub_owners_go_to_the_dispatcher(tmp_path):
    assert _launched_module("version") == "coi_dispatch"
    assert _launched_module("--debug", "list", "--help") == "coi_dispatch"
    assert _launched_module("lst") == "coi_dispatch"
    assert _launched_module("list", "--help", COI_BIN_DIR=str(tmp_path)) == "coi_dispatch"


def test_coi_with_only_a_verbosity_flag_lists_the_commands(capsys, monkeypatch):
    monkeypatch.setenv("COI_VERBOSE", "")  # recorded, so what -v sets is undone after
    monkeypatch.setenv("COI_QUIET", "")
    code, out, _ = run_main(["-v"], capsys)
    assert code == 0
    assert out == dispatch.overview() + "\n"
