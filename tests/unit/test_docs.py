"""docs/commands.md shows the same command list and usages as the code."""

import importlib
import re
from pathlib import Path

from coi_common import dispatch

DOC = (Path(__file__).resolve().parents[2] / "docs" / "commands.md").read_text()


def usage_section(docstring: str) -> str:
    match = re.search(r"^Usage:\n(?:  .*\n)+", docstring, flags=re.M)
    assert match, "docstring has no Usage: section"
    return match.group(0).strip()


def test_overview_in_docs_matches_the_register():
    block = re.search(r"<!-- overview -->\n```text\n(.*?)\n```", DOC, flags=re.S)
    assert block
    assert block.group(1) == dispatch.overview()


def test_every_documented_usage_matches_its_executable():
    blocks = re.findall(r"<!-- usage: (\S+) -->\n```text\n(.*?)\n```", DOC, flags=re.S)
    assert blocks
    for executable, text in blocks:
        module = importlib.import_module(executable.replace("-", "_"))
        assert text == usage_section(module.__doc__), f"{executable} usage drifted"
