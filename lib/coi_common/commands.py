"""The register of coi commands: which executable owns each, and what it does.

The dispatcher's table, `coi --help`, shell completions and docs/commands.md
are all made from this one list.
"""

from __future__ import annotations

from typing import Final, NamedTuple


class Command(NamedTuple):
    """One `coi NAME`: the executable that runs it and a one-line summary."""

    name: str
    owner: str  # executable run as `OWNER NAME ARGS...`; "coi" = built into the dispatcher
    summary: str
    plumbing: bool = False


COMMANDS: Final[tuple[Command, ...]] = (
    Command("shell", "coi-shell", "Start an AI coding session in a container for this workspace"),
    Command("run", "coi-shell", "Run one command in a throwaway container, exit code passed on"),
    Command("attach", "coi-shell", "Reattach to a running session of this workspace"),
    Command("tmux", "coi-shell", "Send text to, or capture, a running session (automation)"),
    Command("list", "coi-slot", "List coi containers (and saved sessions with --all)"),
    Command("kill", "coi-slot", "Stop and delete containers at once"),
    Command("shutdown", "coi-slot", "Stop containers gracefully, save sessions, delete"),
    Command("clean", "coi-slot", "Remove stopped and orphaned coi containers"),
    Command("persist", "coi-slot", "Turn ephemeral containers into persistent ones"),
    Command("pool", "coi-slot", "Keep containers of this workspace warm for instant sessions"),
    Command("info", "coi-session", "Show a saved session (latest of this workspace by default)"),
    Command("session", "coi-session", "List, show, delete and prune saved sessions"),
    Command("sync", "coi-session", "Bring a remote session's workspace changes here, or send them"),
    Command("build", "coi-image", "Build the coi image, or a custom image from a script"),
    Command("image", "coi-image", "List, publish, delete and clean up images"),
    Command("container", "coi-container", "Low-level container commands", plumbing=True),
    Command("file", "coi-container", "Copy files into and out of containers", plumbing=True),
    Command("network", "coi-net", "Show and manage egress rules of containers"),
    Command("setup", "coi-host", "Install and initialise Incus for coi (needs root)"),
    Command("doctor", "coi-host", "Check that this machine can run coi, and say how to fix it"),
    Command("config", "coi-host", "Show the effective configuration and where values come from"),
    Command("trust", "coi-host", "Let this workspace's .coi.toml widen settings (by content)"),
    Command("version", "coi", "Print coi, Python and Incus versions"),
    Command("help", "coi", "Show help for coi or one command"),
    Command("completion", "coi", "Print a shell completion script (bash, zsh or fish)"),
)

BY_NAME: Final[dict[str, Command]] = {c.name: c for c in COMMANDS}
ALIASES: Final[dict[str, tuple[str, ...]]] = {"images": ("image", "list")}
"""Names the original coi answered to, and the words they stand for here."""
