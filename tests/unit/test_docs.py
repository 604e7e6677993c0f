"""What docs/generate.py makes from the register and the usages is what is committed:
docs/commands.md, bin/_commands, the completion grammar and the manual pages; and each
manual page, as man shows it, says what `coi NAME --help` says."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from coi_common.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
generate = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(generate)


def test_commands_doc_matches_the_register_and_every_usage():
    assert (ROOT / "docs" / "commands.md").read_text() == generate.render(), \
        "docs/commands.md is stale: run make docs"
    assert (ROOT / "bin" / "_commands").read_text() == generate.owners(), \
        "bin/_commands is stale: run make docs"


def test_the_completion_grammar_is_made_from_the_usages():
    assert generate.GRAMMAR.read_text() == generate.grammar_module(), \
        "coi-dispatch/coi_dispatch/grammar.py is stale: run make docs"


def test_the_manual_pages_are_made_from_the_help_text():
    pages = generate.man_pages()
    assert sorted(p.name for p in generate.MAN.glob("*.1")) == sorted(pages), \
        "man/ is stale: run make man"
    for name, text in pages.items():
        assert (generate.MAN / name).read_text() == text, f"man/{name} is stale: run make man"


def rendered(page: Path) -> list[str]:
    done = subprocess.run(["man", "-l", "-P", "cat", str(page)], capture_output=True, text=True,
                          env={**os.environ, "MANWIDTH": "200", "LANG": "C.UTF-8"},
                          check=True, timeout=30)
    return [line.strip() for line in done.stdout.splitlines()]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_man_coi_name_shows_every_line_of_coi_name_help(command):
    helped = subprocess.run([str(ROOT / "bin" / "coi"), command.name, "--help"],
                            capture_output=True, text=True, check=True, timeout=30).stdout
    shown = rendered(generate.MAN / f"coi-{command.name}.1")
    missing = [line for line in helped.splitlines() if line.strip() not in shown]
    assert not missing, missing
