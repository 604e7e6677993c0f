"""Progress lines: numbered steps, results, failures, quiet stdout."""

import io

import pytest

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
    assert out.getvalue().endswith("\r\x1b[Kjob: [1/1] spin: ok (0.0s)\n")
