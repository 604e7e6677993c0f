"""`coi NAME --help` in coi's terms, for every command and subcommand of the register:
run as a user runs it (bin/coi), it exits 0, names the command as typed, lists every flag
the command takes, has an example, and never names an internal executable."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from coi_common.commands import COMMANDS
from coi_dispatch.grammar import GRAMMAR

ROOT = Path(__file__).resolve().parents[2]
INTERNAL = re.compile(r"\bcoi-(slot|shell|session|net|image|host|container|dispatch)\b")
GROUPS = [(c.name,) for c in COMMANDS if GRAMMAR[c.name]["commands"] and
          not GRAMMAR[c.name]["flags"]]
PAGES = [(c.name,) for c in COMMANDS if (c.name,) not in GROUPS] + [
    (c.name, sub) for c in COMMANDS for sub in GRAMMAR[c.name]["commands"]]


def coi(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
    return subprocess.run([str(ROOT / "bin" / "coi"), *args], capture_output=True, text=True,
                          env=env, check=False, timeout=30)


def node_of(words: tuple[str, ...]) -> dict:
    node = GRAMMAR[words[0]]
    for word in words[1:]:
        node = node["commands"][word]
    return node


@pytest.mark.parametrize("words", PAGES, ids=" ".join)
def test_every_command_has_help_in_coi_terms_with_every_flag_and_an_example(words):
    done = coi(*words, "--help")
    name = " ".join(("coi", *words))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{name}: "), done.stdout[:200]
    assert f"\n  {name}" in done.stdout  # its usage lines
    for flag in node_of(words)["flags"]:
        assert re.search(rf"^  {re.escape(flag)}\b|^  -\w \S+ {re.escape(flag)}\b|"
                         rf"^  -\w {re.escape(flag)}\b", done.stdout, re.M), (name, flag)
    examples = done.stdout.partition("\nExamples:\n")[2].splitlines()
    assert any(e.strip().removeprefix("sudo ").startswith(name) for e in examples), name
    assert not INTERNAL.search(done.stdout), INTERNAL.search(done.stdout)


@pytest.mark.parametrize("words", GROUPS, ids=" ".join)
def test_a_bare_group_lists_its_subcommands(words):
    done = coi(*words)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.partition("\nCommands:\n")[2]
    for sub in GRAMMAR[words[0]]["commands"]:
        assert re.search(rf"^  {sub}  ", listed, re.M), sub
    assert not INTERNAL.search(done.stdout)
    assert coi(*words, "--help").stdout == done.stdout


@pytest.mark.parametrize("words", [("list",), ("session", "show"), ("image", "list"),
                                   ("version",), ("images",)], ids=" ".join)
def test_coi_help_name_is_the_same_text_as_name_dash_dash_help(words):
    by_help = coi("help", *words)
    assert by_help.returncode == 0, by_help.stderr
    assert by_help.stdout == coi(*words, "--help").stdout


def test_argument_and_command_errors_name_the_command_as_typed():
    for args, said in ((["list", "--bogus"], "coi list: unexpected argument '--bogus'"),
                       (["doctor", "--format", "yaml"], "coi doctor: unknown format 'yaml'"),
                       (["session", "show"], "coi session show: missing <id>")):
        done = coi(*args)
        assert done.returncode == 2, done
        assert done.stderr.startswith(said), done.stderr
        assert not INTERNAL.search(done.stderr), done.stderr


def test_help_after_a_double_dash_belongs_to_the_command_coi_runs():
    done = coi("run", "--dry-run", "--workspace", "/nonexistent-coi-test", "--", "ls",
               "--help")
    assert "Usage:" not in done.stdout
    assert done.returncode != 0
    assert done.stderr.startswith("coi run: ")
