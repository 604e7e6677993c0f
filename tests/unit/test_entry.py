"""The entry wrapper: usage errors, JSON error records, signals, tracebacks."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from coi_common import entry, output
from coi_common.entry import PROG_VARIABLE, parse_args, run_main
from coi_common.errors import NotFound
from coi_common.usage import USAGE_WIDTH
from coi_container import __doc__ as CONTAINER_USAGE
from coi_image import __doc__ as IMAGE_USAGE
from coi_net import __doc__ as NET_USAGE
from coi_session import __doc__ as SESSION_USAGE
from coi_shell import __doc__ as SHELL_USAGE
from coi_slot import __doc__ as SLOT_USAGE

ROOT = Path(__file__).resolve().parents[2]

DOC = """Usage:
  prog show [--format FMT]

Options:
  --format FMT  Output format [default: text].
"""


def run(handler, argv, capsys, monkeypatch, debug=False):
    monkeypatch.setenv("COI_DEBUG", "1" if debug else "")
    with pytest.raises(SystemExit) as exit_info:
        run_main("prog", DOC, handler, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_handler_status_becomes_the_exit_code(capsys, monkeypatch):
    assert run(lambda args: 7, ["show"], capsys, monkeypatch)[0] == 7


def test_bad_usage_is_one_line_with_exit_2(capsys, monkeypatch):
    code, out, err = run(lambda args: 0, ["bogus"], capsys, monkeypatch)
    assert code == 2
    assert out == ""
    assert err == "prog: unexpected argument 'bogus' (see 'prog --help')\n"


def test_option_missing_its_value_names_the_option(capsys, monkeypatch):
    code, _, err = run(lambda args: 0, ["show", "--format"], capsys, monkeypatch)
    assert code == 2
    assert "--format requires argument" in err


def raise_not_found(args):
    raise NotFound("container c1: not there")


def test_error_in_text_mode_is_one_stderr_line_and_its_code(capsys, monkeypatch):
    code, out, err = run(raise_not_found, ["show"], capsys, monkeypatch)
    assert (code, out, err) == (3, "", "prog: container c1: not there\n")


def test_error_in_json_mode_also_prints_an_error_record(capsys, monkeypatch):
    code, out, err = run(raise_not_found, ["show", "--format", "json"], capsys, monkeypatch)
    record = json.loads(out)
    assert code == 3
    assert record == {"coi": 1, "kind": "error", "code": "not_found",
                      "message": "container c1: not there", "exit_code": 3}
    assert err == "prog: container c1: not there\n"


def crash(args):
    raise ValueError("boom")


def test_unexpected_exception_is_one_line_without_traceback(capsys, monkeypatch):
    code, _, err = run(crash, ["show"], capsys, monkeypatch)
    assert code == 1
    assert "Traceback" not in err
    assert err.startswith("prog: internal error: ValueError: boom")


def test_debug_shows_the_traceback(capsys, monkeypatch):
    _, _, err = run(crash, ["show"], capsys, monkeypatch, debug=True)
    assert "Traceback" in err


def interrupt(args):
    raise KeyboardInterrupt


def test_ctrl_c_exits_130(capsys, monkeypatch):
    code, _, err = run(interrupt, ["show"], capsys, monkeypatch)
    assert code == 130
    assert err == "prog: interrupted\n"


def send_sigterm(args):
    signal.raise_signal(signal.SIGTERM)
    return 0


def test_sigterm_unwinds_and_exits_130(capsys, monkeypatch):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code, _, err = run(send_sigterm, ["show"], capsys, monkeypatch)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130
    assert "stopped by SIGTERM" in err


# -- argument errors in the terms of the command meant -----------------------------------------


def usage_error(doc, argv, monkeypatch, capsys, shown_as=None):
    """run_main of a real executable's usage with argv that does not fit: (code, stderr)."""
    if shown_as:
        monkeypatch.setenv(PROG_VARIABLE, shown_as)
    with pytest.raises(SystemExit) as exit_info:
        run_main("prog", doc, lambda args: pytest.fail("the handler ran"), argv)
    out, err = capsys.readouterr()
    assert out == ""
    return exit_info.value.code, err


@pytest.mark.parametrize(("doc", "argv", "first", "usage"), [
    (SLOT_USAGE, ["kill"], "coi-slot kill: missing <name> or --all",
     "usage: coi-slot kill (<name>... | --all) [--no-save]"),
    (SLOT_USAGE, ["persist", "--force"], "coi-slot persist: missing <name> or --all",
     "usage: coi-slot persist (<name>... | --all)"),
    (SLOT_USAGE, ["shutdown"], "coi-slot shutdown: missing <name> or --all",
     "usage: coi-slot shutdown (<name>... | --all) [--timeout S]"),
    (IMAGE_USAGE, ["image", "cleanup", "coi-x-"], "coi-image image cleanup: missing --keep N",
     "usage: coi-image image cleanup <prefix> --keep N"),
    (IMAGE_USAGE, ["image", "cleanup"], "coi-image image cleanup: missing <prefix> and --keep N",
     "usage: coi-image image cleanup <prefix> --keep N"),
    (SHELL_USAGE, ["tmux", "send"], "coi-shell tmux send: missing <name> and <text>",
     "usage: coi-shell tmux send <name> <text>"),
    (SHELL_USAGE, ["tmux", "send", "coi-ab-1"], "coi-shell tmux send: missing <text>",
     "usage: coi-shell tmux send <name> <text>"),
    (SHELL_USAGE, ["tmux", "capture"], "coi-shell tmux capture: missing <name>",
     "usage: coi-shell tmux capture <name>"),
    (SHELL_USAGE, ["run", "--mount", "/a:/b"], "coi-shell run: missing <command>",
     "usage: coi-shell run [--workspace DIR]"),
    (CONTAINER_USAGE, ["file", "push", "f"], "coi-container file push: missing <name:path>",
     "usage: coi-container file push [-r]"),
])
def test_a_missing_argument_is_named_with_the_commands_usage(doc, argv, first, usage,
                                                              monkeypatch, capsys):
    code, err = usage_error(doc, argv, monkeypatch, capsys)
    lines = err.splitlines()
    assert code == 2
    assert lines[0] == first
    assert lines[1].startswith(usage)
    assert all(len(line) <= USAGE_WIDTH for line in lines[1:])


def test_through_the_dispatcher_the_command_is_named_as_typed(monkeypatch, capsys):
    _, err = usage_error(SLOT_USAGE, ["kill"], monkeypatch, capsys, shown_as="coi")
    assert err.splitlines() == [
        "coi kill: missing <name> or --all",
        "usage: coi kill (<name>... | --all) [--no-save] [--force] [--all-users] "
        "[--dry-run] [--format FMT]",
        "                [--debug]"]
    assert PROG_VARIABLE not in os.environ  # programs this one runs do not inherit it


def test_an_unexpected_argument_is_named_under_its_command(monkeypatch, capsys):
    code, err = usage_error(SLOT_USAGE, ["list", "--bogus"], monkeypatch, capsys,
                            shown_as="coi")
    assert code == 2
    assert err.splitlines() == ["coi list: unexpected argument '--bogus'",
                                "usage: coi list [--all] [--all-users] [--format FMT] [--debug]"]


def test_an_option_without_its_value_is_named_under_its_command(monkeypatch, capsys):
    _, err = usage_error(SLOT_USAGE, ["next", "--slot"], monkeypatch, capsys)
    assert err.splitlines()[0] == "coi-slot next: --slot requires argument"


def test_a_missing_or_unknown_subcommand_lists_the_commands_there_are(monkeypatch, capsys):
    _, err = usage_error(SHELL_USAGE, ["tmux"], monkeypatch, capsys)  # `coi tmux`: its page
    assert err == ("coi-shell tmux: missing a command; one of: list, send, capture "
                   "(see 'coi-shell tmux --help')\n")
    _, err = usage_error(SHELL_USAGE, ["tmux", "sned", "x"], monkeypatch, capsys,
                         shown_as="coi")
    assert err.startswith("coi tmux: unknown command 'sned'; one of: list, send, capture")


def test_without_a_known_command_word_docopt_s_complaint_is_kept(monkeypatch, capsys):
    _, err = usage_error(SHELL_USAGE, ["--bogus"], monkeypatch, capsys)
    assert err == "coi-shell: unexpected argument '--bogus' (see 'coi-shell --help')\n"


def test_an_optional_command_word_counts_when_typed(monkeypatch, capsys):
    _, err = usage_error(SESSION_USAGE, ["session", "show"], monkeypatch, capsys,
                         shown_as="coi")
    assert err.splitlines()[0] == "coi session show: missing <id>"
    _, err = usage_error(SESSION_USAGE, ["show"], monkeypatch, capsys)
    assert err.splitlines()[0] == "coi-session show: missing <id>"


# -- repeated options keep every value exactly once ---------------------------------------------


@pytest.mark.parametrize(("doc", "argv", "expected"), [
    (SHELL_USAGE, ["run", "--mount", "/a:/d1", "--mount", "/b:/d2", "--", "sh", "-c", "x"],
     {"--mount": ["/a:/d1", "/b:/d2"], "<command>": ["sh", "-c", "x"]}),
    (SHELL_USAGE, ["run", "--env", "A=1", "--env", "B=2", "--env", "C=3", "true"],
     {"--env": ["A=1", "B=2", "C=3"]}),
    (SHELL_USAGE, ["shell", "--mount", "/a:/d1", "--mount", "/b:/d2"],
     {"--mount": ["/a:/d1", "/b:/d2"]}),
    (SHELL_USAGE, ["--env", "A=1", "--env", "B=2"], {"--env": ["A=1", "B=2"]}),
    (SLOT_USAGE, ["next", "--env", "A=1", "--env", "B=2"], {"--env": ["A=1", "B=2"]}),
    (NET_USAGE, ["apply", "c", "--allow", "a.test", "--allow", "b.test", "--resolver", "10.0.0.1",
                 "--resolver", "10.0.0.2"],
     {"--allow": ["a.test", "b.test"], "--resolver": ["10.0.0.1", "10.0.0.2"]}),
    (NET_USAGE, ["network", "apply", "--allow", "a.test", "--allow", "b.test"],
     {"--allow": ["a.test", "b.test"]}),
    (CONTAINER_USAGE, ["container", "exec", "c", "--env", "A=1", "--env", "B=2", "--", "true"],
     {"--env": ["A=1", "B=2"]}),
])
def test_repeated_options_keep_every_value_exactly_once(doc, argv, expected):
    args = parse_args("prog", doc, argv)
    assert {key: args[key] for key in expected} == expected


ALTERNATIVES = """Usage:
  prog pick a | b
  prog show <name>
"""


def test_a_usage_the_analysis_cannot_take_apart_still_gives_one_line(monkeypatch, capsys):
    code, err = usage_error(ALTERNATIVES, ["pick", "c"], monkeypatch, capsys)
    assert code == 2
    assert err.splitlines()[0] == "prog pick: invalid arguments"


@pytest.mark.parametrize("argv", [["list", "--format", "json", "--bogus"],
                                  ["list", "--bogus", "--format=json"],
                                  ["attach", "--format", "json"]])
def test_a_usage_error_of_a_command_asked_for_json_is_a_json_error_record(argv):
    done = subprocess.run([str(ROOT / "bin" / "coi"), *argv], capture_output=True, text=True,
                          check=False, timeout=30)
    assert done.returncode == 2
    record = json.loads(done.stdout)
    assert (record["kind"], record["code"], record["exit_code"]) == ("error", "usage", 2)
    assert "unexpected argument" in record["message"]


def test_format_json_after_the_double_dash_belongs_to_the_command():
    assert entry.json_requested(["list", "--format", "json"])
    assert entry.json_requested(["list", "--format=json"])
    assert not entry.json_requested(["run", "--", "tool", "--format", "json"])
    assert not entry.json_requested(["list", "--format", "text"])


def test_quiet_and_verbose_are_taken_out_before_the_double_dash_into_the_environment(
        monkeypatch):
    for variable in (output.QUIET_VARIABLE, output.VERBOSE_VARIABLE):
        monkeypatch.setenv(variable, "")  # recorded: what the test sets is undone after it
    assert entry.take_verbosity(["run", "-v", "-q", "--", "ls", "-v"]) == \
        ["run", "--", "ls", "-v"]
    assert output.quiet()
    assert not output.verbose()
    assert entry.take_verbosity(["list", "--verbose"]) == ["list"]
    assert output.verbose()
    assert not output.quiet()


@pytest.mark.parametrize(("argv", "left", "remote"), [
    (["list", "--remote", "build"], ["list"], "build"),
    (["--remote=build", "list", "--all"], ["list", "--all"], "build"),
    (["run", "--", "echo", "--remote", "x"], ["run", "--", "echo", "--remote", "x"], None),
    (["list", "--remote"], ["list", "--remote"], None),  # no name: the parser refuses it
    (["list", "--remote="], ["list", "--remote="], None),
    (["run", "--target", "m2", "--", "true"], ["run", "--", "true"], None),
])
def test_remote_is_taken_out_of_argv_into_the_environment(monkeypatch, argv, left, remote):
    # Set first, so monkeypatch puts the variable back as it was (take_remote sets it).
    monkeypatch.setenv(entry.REMOTE_VARIABLE, "before")
    monkeypatch.delenv(entry.REMOTE_VARIABLE)
    monkeypatch.setenv(entry.TARGET_VARIABLE, "before")
    monkeypatch.delenv(entry.TARGET_VARIABLE)
    assert entry.take_remote(argv) == left
    assert os.environ.get(entry.REMOTE_VARIABLE) == remote


def test_target_is_taken_out_of_argv_into_the_environment(monkeypatch):
    monkeypatch.setenv(entry.TARGET_VARIABLE, "before")
    monkeypatch.delenv(entry.TARGET_VARIABLE)
    assert entry.take_remote(["run", "--target=m2", "--", "x", "--target", "y"]) == \
        ["run", "--", "x", "--target", "y"]
    assert os.environ[entry.TARGET_VARIABLE] == "m2"
