"""docs/commands.md is what docs/generate.py makes from the register and the usages."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_commands_doc_matches_the_register_and_every_usage():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert (ROOT / "docs" / "commands.md").read_text() == generate.render(), \
        "docs/commands.md is stale: run make docs"
    assert (ROOT / "bin" / "_commands").read_text() == generate.owners(), \
        "bin/_commands is stale: run make docs"
