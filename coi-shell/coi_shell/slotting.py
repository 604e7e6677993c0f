"""How `coi shell` and `coi run` get their slot: the flags that are `coi-slot next`'s,
and that child itself, started as early as it can be.

Kept apart from coi_shell.session, whose own imports are then made while `coi-slot
next` works beside them.
"""

from __future__ import annotations

import os
import stat
import sys

from coi_common import plumbing
from coi_common.entry import Args
from coi_common.errors import UsageError


def early_next(args: Args, argv: list[str]) -> plumbing.Child | None:
    """`coi-slot next` started now, when it will surely be needed: `run`, or `shell` on
    a terminal, without a slot record (--record, or one on stdin). None otherwise;
    session.slot_record then starts it itself, or reads the record."""
    if args["attach"] or args["--record"] is not None:
        return None
    if not args["run"] and (not sys.stdin.isatty() or stdin_is_data()):
        return None
    return next_child(slot_flags(argv, list(args["<command>"] or [])))


def next_child(flags: list[str]) -> plumbing.Child:
    """`coi-slot next FLAGS`, started (a dry run asks it for its own plan). The modules
    it shares with this session are loaded first, so that the fork (coi_common.forks)
    brings them along and it loads only its own."""
    from coi_common import config, incus, sessions, tools  # noqa: F401, PLC0415

    return plumbing.Child("coi-slot", ["next", *flags], kind="slot", dry_run=plumbing.ASKS)


def stdin_is_data() -> bool:
    """A pipe or file on stdin carries a slot record; a terminal or /dev/null does not."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def slot_flags(argv: list[str], command: list[str]) -> list[str]:
    """The flags of `coi-shell shell|run ... [--] [COMMAND]` that are coi-slot next's
    (all of them but --debug, and --dry-run and --format, which plumbing.Child gives
    each child itself): passed on unread, so the two can never take a flag
    differently."""
    if "--" in argv:
        words = argv[:argv.index("--")]
    elif command and argv[-len(command):] == command:
        words = argv[:-len(command)]
    elif command:
        raise UsageError("coi run: put -- between the flags and the command",
                         hint="coi run --persistent -- make test")
    else:
        words = argv
    if words and words[0] in ("shell", "run"):
        words = words[1:]
    kept: list[str] = []
    for before, word in zip(["", *words], words, strict=False):
        if before != "--format" and word not in ("--debug", "--dry-run", "--format") \
                and not word.startswith("--format="):
            kept.append(word)
    return kept
