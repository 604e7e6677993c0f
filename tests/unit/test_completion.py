"""What `coi __complete` offers at a TAB: commands, subcommands, flags, the values a
flag takes and the live names an argument names; live names are cached a few seconds."""

from __future__ import annotations

import json
import time

import pytest

from coi_dispatch import complete

NAMES = {"containers": ["coi-ab12cd34-1", "coi-ab12cd34-2"], "images": ["coi", "my-rust"],
         "sessions": ["20260301-091500-5d41402abc4b"], "profiles": ["rust"],
         "tools": ["claude", "dummy"]}


def offered(line: str) -> list[str]:
    """Candidates for the last word of `line` (the words after coi)."""
    words = line.split(" ")
    return complete.candidates(words[:-1], words[-1],
                               names=lambda kind: NAMES.get(kind) or
                               complete.live_names(kind) if kind not in NAMES else NAMES[kind])


@pytest.mark.parametrize(("line", "expected"), [
    ("sh", ["shell", "shutdown"]),
    ("ima", ["image", "images"]),
    ("image ", ["list", "exists", "publish", "delete", "cleanup"]),
    ("session sh", ["show"]),
    ("attach ", NAMES["containers"]),
    ("kill coi-ab12cd34-1 coi-", NAMES["containers"]),
    ("session show ", NAMES["sessions"]),
    ("session restore 20260301-091500-5d41402abc4b ", NAMES["containers"]),
    ("image delete m", ["my-rust"]),
    ("shell --image ", NAMES["images"]),
    ("shell --network ", ["restricted", "allowlist", "open"]),
    ("list --format j", ["json"]),
    ("shell --profile ", ["rust"]),
    ("run --tool ", NAMES["tools"]),
    ("help se", ["session", "setup"]),
    ("completion ", ["bash", "zsh", "fish"]),
    ("shell --workspace ", []),  # a directory: the shell completes it
    ("run -- ls --", []),  # the command coi runs is not coi's
    ("--debug li", ["list"]),
    ("-", ["--help", "--version", "--debug"]),
])
def test_a_tab_offers_what_may_stand_there(line, expected):
    assert offered(line) == expected


def test_flags_are_those_of_the_command_with_their_other_names():
    found = offered("shell -")
    assert {"--persistent", "--slot", "-e", "--env", "--resume", "--help"} <= set(found)
    assert "--all-users" not in found
    assert offered("kill --a") == ["--all", "--all-users"]


def test_answer_takes_the_index_of_the_current_word(capsys):
    assert complete.answer(["2", "image", "li"]) == 0
    assert capsys.readouterr().out == "list\n"
    with pytest.raises(complete.UsageError):
        complete.answer(["x"])


def test_live_names_are_asked_once_within_the_cache_time(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def reader():
        calls.append(1)
        return ["coi-ab12cd34-1"]

    assert complete._cached("containers", reader) == ["coi-ab12cd34-1"]
    assert complete._cached("containers", reader) == ["coi-ab12cd34-1"]
    assert len(calls) == 1
    cache = tmp_path / "coi" / "completion.json"
    stale = json.loads(cache.read_text())
    stale["containers"]["at"] = time.time() - complete.CACHE_SECONDS - 1
    cache.write_text(json.dumps(stale))
    complete._cached("containers", reader)
    assert len(calls) == 2


@pytest.mark.parametrize("text", ["not json", "[]", '{"containers": {"at": "x"}}',
                                  '{"containers": {"at": 1e20, "names": ["x"]}}'])
def test_a_broken_or_future_cache_is_read_again(tmp_path, monkeypatch, text):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "coi").mkdir()
    (tmp_path / "coi" / "completion.json").write_text(text)
    assert complete._cached("containers", lambda: ["fresh"]) == ["fresh"]


def test_a_name_source_that_fails_offers_nothing(monkeypatch):
    def broken():
        raise OSError("no socket")

    monkeypatch.setattr(complete, "_images", broken)
    monkeypatch.setattr(complete, "_cached", lambda kind, reader: reader())
    assert complete.live_names("images") == []
