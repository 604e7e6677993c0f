"""coi-shell: put a person or a command into a workspace slot's container.

Usage:
  coi-shell [shell] [--workspace DIR] [--slot N] [--persistent] [--image NAME]
            [--profile NAME] [--tool NAME] [--network MODE] [--env K=V]...
            [--storage PATH] [--mount SPEC]... [--resume] [--session ID]
            [--cpu N] [--memory SIZE] [--processes N] [--no-mask]
            [--allow-home] [--force] [--record FILE] [--dry-run] [--format FMT]
            [--debug]
  coi-shell run [--workspace DIR] [--slot N] [--persistent] [--image NAME]
            [--profile NAME] [--tool NAME] [--network MODE] [--env K=V]...
            [--storage PATH] [--mount SPEC]... [--resume] [--session ID]
            [--cpu N] [--memory SIZE] [--processes N] [--no-mask]
            [--allow-home] [--force] [--record FILE] [--dry-run] [--format FMT]
            [--debug] [--] <command>...
  coi-shell warm [--dry-run] [--format FMT] [--debug]
  coi-shell attach [<name>] [--workspace DIR] [--slot N] [--bash] [--debug]
  coi-shell tmux list [--all-users] [--format FMT] [--debug]
  coi-shell tmux send <name> <text> [--all-users] [--debug]
  coi-shell tmux capture <name> [--all-users] [--debug]
  coi-shell (-h | --help)
  coi-shell --version

Commands:
  shell          Start (or reattach to) the AI tool in a tmux session in the
                 container of a slot of the workspace, and hand your terminal
                 to it. With a slot record on stdin (the pipeline of
                 docs/architecture.md) that record is used and the terminal is
                 opened from /dev/tty.
                 Inside: tmux runs bash, which runs the tool. Ctrl+b d detaches;
                 `sudo poweroff` ends the session (saved, then the container is
                 deleted unless persistent).
  run            Run one command as user code in /workspace of a fresh container,
                 passing stdin, stdout, stderr and the exit code through; the
                 container is deleted afterwards unless --persistent.
  warm           Make the warm pool container of the slot record on stdin
                 (plumbing: coi-slot next --pool | coi-shell warm; coi pool fill
                 runs it): created, its network rules in, started and booted, then
                 left running for a session of its workspace to claim.
  attach         Reattach to a running session of this workspace (--bash: a
                 plain shell in it instead of the tmux session). Where you have
                 none (and no --workspace or --slot), any running session of
                 yours: the one there is, or a list to choose from.
  tmux list      Your running coi containers with their tmux sessions.
  tmux send      Type TEXT and Enter into a session (automation).
  tmux capture   Print what a session's pane shows.

  The tmux commands act on your own sessions (the containers you started);
  another user's is refused (exit 5) unless --all-users. Root sees all.

Options:
  --workspace DIR   Workspace mounted at /workspace [default: .].
  --slot N          Slot number (1..defaults.max_slots); omitted: the lowest free.
  --persistent      Keep the container after the session (defaults.persistent).
  --image NAME      Image to start from (defaults.image, normally coi).
  --profile NAME    Apply [profiles.NAME] of the configuration.
  --tool NAME       AI tool to run (tool.name, normally claude).
  --network MODE    restricted, allowlist or open (network.mode).
  -e K=V --env K=V  Environment variable for the session (repeatable).
  --storage PATH    Host directory mounted at /storage.
  --mount SPEC      Extra host directory, SRC:DST or SRC:DST:ro (repeatable).
  --resume          Restore the newest saved session of this workspace and tool
                    before the tool starts, and start it with its resume
                    arguments; none saved: the tool starts fresh (with a
                    message). Sessions of other workspaces are never used.
                    Also written --continue; --resume=ID and --continue=ID
                    restore session ID (refused when it belongs to another
                    workspace) and are read as --resume --session ID.
  --session ID      The saved session --resume restores (implies --resume).
  --cpu N           CPUs the container may use (limits.cpu; default: all).
  --memory SIZE     Memory limit: 512MiB, 4GiB or a share such as 25%
                    (limits.memory; default 50%); past it the kernel kills
                    inside the container, never on the host.
  --processes N     Most processes at once (limits.processes; default 4096;
                    0: none); a fork bomb stops there.
  --no-mask         Show the workspace's secret files (security.mask: .env,
                    keys, ...) inside; normally they appear empty and read-only.
  --allow-home      Allow your home directory itself as the workspace or a mount.
  --force           Allow any directory except / and Incus's own (system paths,
                    credential folders): only when you really mean it.
  --record FILE     Use the slot record in FILE (- : stdin), as printed by
                    coi's slot plumbing, instead of flags (docs/architecture.md:
                    composing the executables gives the same session as the flags).
                    The flags then come from the record; giving others too is
                    refused.
  --dry-run         Change nothing: print the plan, every change the session
                    would make (Incus REST calls, execs, coi programs with the
                    JSON record each is given), in the order made, assuming
                    each succeeds; the slot is found but not reserved.
  --bash            attach: open bash instead of the tmux session.
  --all-users       tmux: also other users' sessions.
  --format FMT      Output format: text or json [default: text]; shell and run:
                    of the --dry-run plan and of an error.
  --debug           Show tracebacks on errors.
  -h --help         Show this help.

Examples:
  coi shell --slot 2 --persistent
  coi shell --resume
  coi run -- make test
  coi attach --slot 2
  coi tmux list --format json
  coi tmux capture coi-1a2b3c4d-1
  coi-slot next | coi-shell
  coi tmux send coi-1a2b3c4d-1 "write a hello world script"
"""

from __future__ import annotations

import sys

from coi_common import output
from coi_common.entry import Args, expand_resume_flags, run_main


def main(argv: list[str] | None = None) -> None:
    """Entry point of coi-shell."""
    words = expand_resume_flags(sys.argv[1:] if argv is None else argv)
    run_main("coi-shell", __doc__ or "", lambda args: dispatch(args, words), words)


def dispatch(args: Args, argv: list[str]) -> int:
    """Run the chosen command; each returns the exit status. shell and run pass their
    flags on to coi-slot next as they were given (`argv`), started before the session's
    own imports (slotting.early_next)."""
    output.wants_json(args)
    if args["tmux"]:
        from coi_shell import automation  # noqa: PLC0415

        return automation.run(args)
    if args["warm"]:
        from coi_shell import session  # noqa: PLC0415

        return session.warm()
    from coi_shell import slotting  # noqa: PLC0415

    early = slotting.early_next(args, argv)
    try:
        from coi_shell import session  # noqa: PLC0415

        if args["run"]:
            return session.run_command(args, argv, early)
        if args["attach"]:
            return session.attach(args)
        return session.shell(args, argv, early)
    finally:
        if early is not None:
            early.abandon()  # (one that finished is left alone)
