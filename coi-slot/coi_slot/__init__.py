"""coi-slot: workspace slots and the session containers that serve them.

Usage:
  coi-slot next [--workspace DIR] [--slot N] [--persistent] [--image NAME]
                [--profile NAME] [--env K=V]... [--format FMT] [--debug]
  coi-slot list [--all] [--format FMT] [--debug]
  coi-slot kill (<name>... | --all) [--force] [--format FMT] [--debug]
  coi-slot shutdown (<name>... | --all) [--timeout S] [--force] [--format FMT] [--debug]
  coi-slot clean [--force] [--format FMT] [--debug]
  coi-slot persist (<name>... | --all) [--force] [--format FMT] [--debug]
  coi-slot (-h | --help)
  coi-slot --version

Commands:
  next       Reserve a free slot of the workspace (plumbing) and print its slot
             record as JSON, always: the container name and the settings the
             session will use. The reservation holds for 2 minutes or until the
             container exists, so concurrent callers never get the same slot.
  list       coi's containers: mode (ephemeral or persistent), status,
             workspace, slot, image, IPv4, created. --all adds the saved sessions.
  kill       Stop containers at once (the session is saved), then delete them.
  shutdown   Stop containers cleanly, waiting up to --timeout seconds before
             forcing them; save the session; delete ephemeral containers and
             keep persistent ones, stopped.
  clean      Remove stopped ephemeral containers (left over when a session
             ended without cleaning up). Persistent containers stay.
  persist    Make containers persistent: shutdown and session exit keep them.

Only coi's own containers are touched: their names carry the container prefix
(COI_CONTAINER_PREFIX, default coi-) and they have coi's user.coi.* keys. --all
and clean ask first on a terminal; without one they need --force.

Options:
  --workspace DIR   The workspace directory [default: .].
  --slot N          Take slot N (1..defaults.max_slots); 0 picks the lowest
                    free slot [default: 0].
  --persistent      Keep the container when the session ends.
  --image NAME      Image of the container (default: defaults.image, coi).
  --profile NAME    Apply the [profiles.NAME] table of the config.
  --env K=V         Set an environment variable in the session (repeatable);
                    laid over defaults.environment.
  --all             kill/shutdown/persist: every coi container. list: also
                    the saved sessions.
  --timeout S       Seconds to wait for a clean stop before forcing it; 0
                    stops at once [default: 60].
  --force           Do not ask (COI_FORCE=1 does the same).
  --format FMT      Output format: text or json [default: text]. JSON is one
                    container_list record for list, JSON Lines of
                    container_action records for the others; next always
                    prints JSON.
  --debug           Show tracebacks on errors.
  -h --help         Show this help.

Examples:
  coi-slot next --workspace ~/src/app --persistent | coi-shell
  coi list --all --format json
  coi kill coi-3f2a9c1b-2
  coi shutdown --timeout 30 coi-3f2a9c1b-1
  coi clean --force
  coi persist coi-3f2a9c1b-1
"""

from __future__ import annotations

from coi_common import output
from coi_common.entry import Args, run_main


def main(argv: list[str] | None = None) -> None:
    """Entry point of coi-slot."""
    run_main("coi-slot", __doc__ or "", dispatch, argv)


def dispatch(args: Args) -> int:
    """Run the chosen command; each returns the exit status."""
    as_json = output.wants_json(args)
    if args["next"]:
        from coi_slot import allocate  # noqa: PLC0415

        return allocate.run(args)
    if args["list"]:
        from coi_slot import listing  # noqa: PLC0415

        return listing.run(everything=args["--all"], as_json=as_json)
    from coi_slot import actions  # noqa: PLC0415

    return actions.run(args, as_json=as_json)
