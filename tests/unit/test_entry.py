"""The entry wrapper: usage errors, JSON error records, signals, tracebacks."""

import json
import signal

import pytest

from coi_common.entry import run_main
from coi_common.errors import NotFound

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
