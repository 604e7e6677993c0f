"""Where programs are: on PATH, and coi's own executables beside this coi.

Apart from proc and plumbing because the dispatcher needs only this to hand a command
to its owner, and their imports (subprocess, threading, json) cost every `coi NAME`
~10 ms.
"""

from __future__ import annotations

import os
import sys


def which(program: str) -> str | None:
    """Full path of `program` on PATH, or None."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(folder, program)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def find_executable(program: str) -> str | None:
    """`program` next to this coi first (a checkout or a venv), then on PATH."""
    # Beside the link we were started by (~/.local/bin), then beside what it points at
    # (the venv's bin): a `coi` linked alone still finds its siblings.
    started = os.path.abspath(sys.argv[0])
    places = [os.environ.get("COI_BIN_DIR") or os.path.dirname(started),
              os.path.dirname(os.path.realpath(started))]
    for here in dict.fromkeys(places):
        sibling = os.path.join(here, program)
        if os.access(sibling, os.X_OK):
            return sibling
    return which(program)
