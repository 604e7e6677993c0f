"""The lines a session prints on stderr as it starts and ends, in fixed words a script
may match (docs/sessions.md, "What a session says"): each begins `coi: ` and then one
of the words starting, saving, saved, nothing to save, removed, kept, ends in the
background, followed by the container's name. -q silences them, as every note."""

from __future__ import annotations

import sys
from typing import Final

from coi_common import output

NEW: Final = "new"
AGAIN: Final = "again"
POOLED: Final = "pooled"
_HOW: Final = {NEW: "a new container of image {image}", AGAIN: "persistent, as it was left",
               POOLED: "from the warm pool"}


def say(line: str) -> None:
    if not output.quiet():
        print(f"coi: {line}", file=sys.stderr, flush=True)


def starting(name: str, how: str, image: str = "") -> None:
    """`how`: NEW (created now, from `image`), AGAIN (a stopped persistent container
    started again) or POOLED (claimed from the warm pool, running already)."""
    say(f"starting {name} ({_HOW[how].format(image=image)})")


def saving(name: str) -> None:
    say(f"saving the session of {name}")


def saved_line(session_id: str, name: str, detail: str) -> str:
    """The `message` of a save that kept something (coi-session save's record)."""
    return f"saved session {session_id} of {name} ({detail})"


def nothing_saved_line(name: str) -> str:
    return f"nothing to save in {name} (no tool state there)"


def ended_line(name: str, *, deleted: bool, background: bool = False) -> str:
    """The last line of a session: its container removed, kept (persistent), or being
    ended by a process of its own (a warm pool's `coi run`)."""
    if background:
        return f"{name} ends in the background"
    return f"removed {name}" if deleted else f"kept {name} (persistent)"


def ended(name: str, *, deleted: bool, background: bool = False) -> None:
    say(ended_line(name, deleted=deleted, background=background))
