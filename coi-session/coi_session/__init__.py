"""coi-session: save, restore, list and prune AI tool sessions kept outside containers.

Usage:
  coi-session [session] save [<name>] [--format FMT] [--debug]
  coi-session [session] restore [<id>] [<name>] [--check] [--format FMT] [--debug]
  coi-session [session] list [--workspace DIR | --all] [--tool NAME] [--format FMT]
              [--debug]
  coi-session [session] latest [--workspace DIR] [--tool NAME] [--format FMT] [--debug]
  coi-session [session] show <id> [--format FMT] [--debug]
  coi-session [session] delete <id> [--format FMT] [--debug]
  coi-session [session] prune (--keep N | --older-than DURATION)
              [--workspace DIR | --all] [--tool NAME] [--format FMT] [--debug]
  coi-session info [<id>] [--workspace DIR] [--tool NAME] [--format FMT] [--debug]
  coi-session sync (pull | push) [<name>] [--every SECONDS] [--format FMT] [--debug]
  coi-session (-h | --help)
  coi-session --version

Commands:
  save      Copy the AI tool's state (its registry state_dirs and state_files)
            out of container <name>, running or stopped, into
            ~/.coi/sessions-<tool>/<id>/ (paths.state_dir). Without <name>
            the container comes from a slot record on stdin. A container keeps
            its session id, so later saves update the same session. Links,
            devices, FIFOs and unsafe paths in the container are dropped and
            counted; injected credential files are never kept.
  restore   Put saved session <id> into container <name> (or the container of
            a slot record on stdin), owned by code, then copy fresh
            credentials in and merge the tool's settings file. The session
            must be of the container's workspace and tool. Without <id>, the
            slot record's `resume` says what: nothing (credentials only), the
            newest session of its workspace and tool (none saved: credentials
            only, with a warning), or one session by id. --check: only say
            which session that would be (its record; nothing when none),
            refusing one of another workspace or tool, touching nothing.
  list      Saved sessions of the workspace (--all: of every workspace),
            newest first.
  latest    The newest session of the workspace: its id (text) or record.
  show      One session in full.
  delete    Delete one saved session.
  prune     Delete sessions beyond the newest N of each workspace and tool
            (--keep), or not updated within DURATION (--older-than), in the
            workspace (--all: in every workspace).
  info      One session in full: <id>, or the newest of the workspace; where
            there is none (and no --workspace), the newest of every workspace.
  sync      On a remote (docs/remote.md): bring the workspace changes made in
            container <name> to this host (pull), or send this host's to it
            (push). Without <name>: every container of the current workspace
            this host synced, or the one of a slot record on stdin (push: its
            first copy of the workspace). A file changed on both sides is kept
            both ways (the container's as FILE.coi-remote-NAME) and reported,
            never overwritten. Every save of a remote container pulls first.
            With --every SECONDS: again and again, that many seconds apart,
            until the containers are gone (or Ctrl-C); a line only when
            something came over.
  The word `session` is optional: `coi session list` runs
  `coi-session session list`, which is `coi-session list`.

Options:
  --workspace DIR          Workspace whose sessions to use; default: the current
                           directory.
  --all                    Every workspace.
  --tool NAME              Only sessions of this AI tool.
  --check                  restore: decide, do not restore.
  --keep N                 How many of the newest sessions to keep (0 or more).
  --older-than DURATION    Age such as 30d, 12h, 90m, 2w or 45s.
  --format FMT             Output format: text or json [default: text].
  --every SECONDS          sync: repeat, this many seconds apart (1 to 86400).
  --debug                  Show tracebacks on errors.
  -h --help                Show this help.

Examples:
  coi-session save coi-3f2a9c1b-1
  coi session list --all --format json
  coi-session restore 20260301-091500-5d41402abc4b coi-3f2a9c1b-2
  coi session prune --older-than 30d --all
  coi session save coi-3f2a9c1b-1
  coi session restore 20260301-091500-5d41402abc4b coi-3f2a9c1b-2
  coi session latest --format json
  coi session show 20260301-091500-5d41402abc4b
  coi session delete 20260301-091500-5d41402abc4b
  coi info --format json
  coi sync pull coi-3f2a9c1b-1
  coi sync push --format json
  coi sync pull --every 30
"""

from __future__ import annotations

from coi_common.entry import Args, run_main


def main(argv: list[str] | None = None) -> None:
    """Entry point of coi-session."""
    run_main("coi-session", __doc__ or "", dispatch, argv)


def dispatch(args: Args) -> int:
    """Run the chosen command; each returns the exit status."""
    from coi_session import commands  # noqa: PLC0415

    return commands.run(args)
