"""The fixed lines a session prints as it starts and ends (docs/sessions.md)."""

from __future__ import annotations

import pytest

from coi_common import output, steps


@pytest.mark.parametrize(("how", "image", "line"), [
    (steps.NEW, "coi", "coi: starting c-1 (a new container of image coi)\n"),
    (steps.AGAIN, "", "coi: starting c-1 (persistent, as it was left)\n"),
    (steps.POOLED, "", "coi: starting c-1 (from the warm pool)\n"),
])
def test_starting_names_the_container_and_where_it_comes_from(how, image, line, capsys,
                                                               monkeypatch):
    monkeypatch.delenv(output.QUIET_VARIABLE, raising=False)
    steps.starting("c-1", how, image)
    assert capsys.readouterr() == ("", line)


@pytest.mark.parametrize(("deleted", "background", "line"), [
    (True, False, "removed c-1"),
    (False, False, "kept c-1 (persistent)"),
    (True, True, "c-1 ends in the background"),
])
def test_the_last_line_says_what_became_of_the_container(deleted, background, line):
    assert steps.ended_line("c-1", deleted=deleted, background=background) == line


def test_a_save_line_names_the_session_and_the_container():
    assert steps.saved_line("s-1", "c-1", "created, 3 files, 1.0 KiB, 0.10 s") == \
        "saved session s-1 of c-1 (created, 3 files, 1.0 KiB, 0.10 s)"
    assert steps.nothing_saved_line("c-1") == "nothing to save in c-1 (no tool state there)"


def test_quiet_silences_every_step(capsys, monkeypatch):
    monkeypatch.setenv(output.QUIET_VARIABLE, "1")
    steps.starting("c-1", steps.NEW, "coi")
    steps.saving("c-1")
    steps.ended("c-1", deleted=True)
    assert capsys.readouterr() == ("", "")
