"""Progress lines: numbered steps, results, failures, quiet stdout."""

import io
import time

import pytest

from coi_common import output, progress
from coi_common.progress import Progress


def test_plain_mode_prints_a_start_and_an_end_line_per_step():
    out = io.StringIO()
    progress = Progress("job", 2, out, interactive=False)
    with progress.step("first") as outcome:
        outcome.append("made")
    with progress.step("second"):
        pass
    lines = out.getvalue().splitlines()
    assert lines[0] == "job: [1/2] first ..."
    assert lines[1].startswith("job: [1/2] first: made (")
    assert lines[3].startswith("job: [2/2] second: done (")


def test_a_failing_step_is_marked_failed_and_the_error_propagates():
    out = io.StringIO()
    progress = Progress("job", 1, out, interactive=False)
    with pytest.raises(RuntimeError), progress.step("breaks"):
        raise RuntimeError("x")
    assert "job: [1/1] breaks: FAILED" in out.getvalue()


def test_interactive_mode_ends_with_one_clean_result_line():
    out = io.StringIO()
    progress = Progress("job", 1, out, interactive=True)
    with progress.step("spin") as outcome:
        outcome.append("ok")
    assert out.getvalue().endswith("\r\x1b[Kjob: [1/1] spin: ok (0.0s, 0.0s in all)\n")


def test_a_wait_longer_than_its_threshold_says_what_it_waits_for_and_how_long():
    out = io.StringIO()
    with progress.waiting("creating coi-x-1", after=0.05, stream=out):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "coi: creating coi-x-1 ..."
    assert lines[1].startswith("coi: creating coi-x-1: done (")


def test_a_short_wait_prints_nothing_and_a_failed_one_says_failed():
    out = io.StringIO()
    with progress.waiting("quick", after=5, stream=out):
        pass
    assert out.getvalue() == ""
    with pytest.raises(RuntimeError):
        _fail_slowly(out)
    assert "slow: failed (" in out.getvalue()


def _fail_slowly(out):
    with progress.waiting("slow", after=0.01, stream=out):
        time.sleep(0.2)
        raise RuntimeError("boom")


def test_each_step_shows_its_own_time_and_the_jobs_total():
    out = io.StringIO()
    progress = Progress("job", 2, out, interactive=False)
    with progress.step("slow"):
        time.sleep(0.3)
    with progress.step("quick"):
        pass
    quick = out.getvalue().splitlines()[3]
    own, total = quick.partition("(")[2].rstrip(")").split(", ")
    assert float(own.removesuffix("s")) < 0.2
    assert float(total.removesuffix("s in all")) >= 0.3


def test_quiet_says_only_failures_and_verbose_says_every_wait(monkeypatch):
    monkeypatch.setenv("COI_QUIET", "1")
    out = io.StringIO()
    quiet = Progress("job", 2, out, interactive=False)
    with quiet.step("fine"):
        quiet.say("a note")
    with pytest.raises(RuntimeError), quiet.step("breaks"):
        raise RuntimeError("x")
    with progress.waiting("slow", after=0.0, stream=out):
        time.sleep(0.05)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("job: [2/2] breaks: FAILED (")
    monkeypatch.delenv("COI_QUIET")
    monkeypatch.setenv("COI_VERBOSE", "1")
    said = io.StringIO()
    with progress.waiting("quick", stream=said):
        time.sleep(0.05)
    assert said.getvalue().startswith("coi: quick ...\ncoi: quick: done (")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert output.coloured("FAIL", "fail", Terminal()) == "\x1b[1;31mFAIL\x1b[0m"
    assert output.coloured("FAIL", "fail", io.StringIO()) == "FAIL"
    monkeypatch.setenv("NO_COLOR", "1")
    assert output.coloured("FAIL", "fail", Terminal()) == "FAIL"
    monkeypatch.setenv("NO_COLOR", "")
    monkeypatch.setenv("TERM", "dumb")
    assert output.coloured("FAIL", "fail", Terminal()) == "FAIL"
