"""Every README block marked `<!-- example ... -->` runs as written, as the installed
non-root user in a fresh workspace of theirs, in the default (restricted) mode: each
line in one bash (-e: the first failing command fails the block)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.incus

ROOT = Path(__file__).resolve().parents[2]
MARKED = re.compile(r"<!-- example\b[^>]*-->\n```sh\n(.*?)```", re.S)
INTERNAL = re.compile(r"\bcoi-(slot|shell|session|net|image|host|container|dispatch)\b")
EXAMPLES = MARKED.findall((ROOT / "README.md").read_text())


def test_the_readme_marks_its_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda b: b.splitlines()[0][:40])
def test_a_readme_example_runs_as_written(user_coi, block):
    script = "set -eo pipefail\n" + block
    done = user_coi.user.run(["bash", "-c", script], env=user_coi.env, cwd=user_coi.workspace,
                             timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    assert not INTERNAL.search(done.stderr), done.stderr  # messages (a man page has its name)
    if "hello.txt" in block:
        made = user_coi.workspace / "hello.txt"
        assert made.read_text() == "hello\n"
        assert os.stat(made).st_uid == user_coi.user.uid
        assert "hello\n" in done.stdout
