"""coi-slot: workspace slots and the session containers that serve them.

Usage:
  coi-slot next [--workspace DIR] [--slot N] [--persistent] [--image NAME]
                [--profile NAME] [--tool NAME] [--network MODE] [--env K=V]...
                [--storage PATH] [--mount SPEC]... [--resume] [--session ID]
                [--cpu N] [--memory SIZE] [--processes N] [--no-mask]
                [--allow-home] [--force] [--pool] [--dry-run] [--format FMT] [--debug]
  coi-slot end [<name>] [--no-save] [--if-down] [--wait S] [--background] [--dry-run]
               [--format FMT] [--debug]
  coi-slot list [--all] [--all-users] [--format FMT] [--debug]
  coi-slot kill (<name>... | --all) [--no-save] [--force] [--all-users] [--dry-run]
                [--format FMT] [--debug]
  coi-slot shutdown (<name>... | --all) [--timeout S] [--force] [--all-users]
                    [--dry-run] [--format FMT] [--debug]
  coi-slot clean [--sessions | --all] [--force] [--all-users] [--dry-run] [--format FMT]
                 [--debug]
  coi-slot persist (<name>... | --all) [--force] [--all-users] [--dry-run] [--format FMT]
                   [--debug]
  coi-slot pool status [--workspace DIR] [--all] [--format FMT] [--debug]
  coi-slot pool fill [--workspace DIR] [--size N] [--format FMT] [--debug]
  coi-slot pool drain [--workspace DIR] [--all] [--format FMT] [--debug]
  coi-slot (-h | --help)
  coi-slot --version

Commands:
  next       Reserve a free slot of the workspace (plumbing) and print its slot
             record as JSON, always: the container name and the settings the
             session will use. The reservation holds for 2 minutes or until the
             container exists, so concurrent callers never get the same slot.
             It takes every flag of `coi shell` and `coi run` (the porcelain
             runs it with them): each is checked here, before the slot is
             reserved, and carried in the record. An ephemeral session claims an
             idle container of the workspace's warm pool made for the same
             settings, when there is one (the record says "pooled": true).
  end        End one session (plumbing; coi shell and coi run end with it):
             save it, then delete the container unless it is persistent, then
             remove its network rules; under the container's lock, so two
             commands ending it at once save it once. Without <name>, the
             container of a slot record on stdin, whose slot reservation is
             released too. --if-down: only if it is stopped or gone (after
             waiting up to --wait seconds), else it says it is still running.
  list       coi's containers: owner (host uid), mode (ephemeral or persistent),
             status, workspace, slot, image, IPv4, created. --all adds the saved
             sessions.
  kill       Stop containers at once, save the session, then delete them
             (persistent ones too). --no-save deletes without saving.
  shutdown   Stop containers cleanly, waiting up to --timeout seconds before
             forcing them; save the session; delete ephemeral containers and
             keep persistent ones, stopped.
  clean      Remove stopped ephemeral containers (left over when a session
             ended without cleaning up). Persistent containers stay. With
             --sessions (or --all) every saved session of yours goes too.
  persist    Make containers persistent: shutdown and session exit keep them.
  pool       The warm pool (pool.size): containers of the workspace made,
             started, booted and under their network rules before a session
             asks, so that `coi run` and `coi shell` start in one at once. A
             pooled container serves one session of its own workspace and user,
             made for the same settings, and is deleted after it like any other.
  pool status  The idle containers of the workspace's pool (--all: of every
             workspace).
  pool fill  Make idle containers until --size are there (coi run and coi
             shell refill the pool in the background after each claim).
  pool drain  Remove the idle containers, unsaved (--all: of every workspace).

Only coi's own containers are touched: their names carry the container prefix
(COI_CONTAINER_PREFIX, default coi-) and they have coi's user.coi.* keys. Each
user sees and acts on the containers they started (user.coi.host_uid): naming
another user's container is refused (exit 5) unless --all-users; root sees
everyone's. A session whose save fails keeps its container and the command
fails (exit 1), saying how to retry or discard it. shutdown --all leaves
persistent containers that are stopped already alone (reported unchanged).
--all and clean ask first on a terminal; without one they need --force.

Options:
  --workspace DIR   The workspace directory [default: .].
  --slot N          Take slot N (1..defaults.max_slots); 0 picks the lowest
                    free slot [default: 0].
  --persistent      Keep the container when the session ends.
  --image NAME      Image of the container (default: defaults.image, coi).
  --profile NAME    Apply the [profiles.NAME] table of the config.
  --tool NAME       AI tool to run (tool.name, normally claude).
  --network MODE    restricted, allowlist or open (network.mode).
  -e K=V --env K=V  Set an environment variable in the session (repeatable);
                    laid over defaults.environment.
  --storage PATH    Host directory mounted at /storage (made if missing).
  --mount SPEC      Extra host directory, SRC:DST or SRC:DST:ro (repeatable).
  --resume          Restore the newest saved session of the workspace and tool
                    (also --continue; --resume=ID and --continue=ID name one).
  --session ID      The saved session to restore (implies --resume).
  --cpu N           CPUs the container may use (limits.cpu).
  --memory SIZE     Memory limit such as 4GiB or 50% (limits.memory).
  --processes N     Most processes at once, 0 none (limits.processes).
  --no-mask         Show the workspace's secret files inside (security.mask).
  --allow-home      Allow your home directory itself as the workspace or a mount.
  --pool            next: a slot for a new warm pool container (coi-shell warm
                    makes it); the record carries the session shape it serves.
  --size N          pool fill: how many idle containers to keep (default:
                    pool.size).
  --all             kill/shutdown/persist: every coi container of yours. list:
                    also the saved sessions. pool status/drain: every workspace.
                    clean: the same as --sessions.
  --sessions        clean: also delete every saved session of yours (every
                    workspace and tool; asked first unless --force).
  --all-users       Also other users' containers (root: always).
  --no-save         kill, end: delete without saving the session.
  --if-down         end: only a session whose container is down.
  --wait S          end --if-down: seconds to wait for a stop under way.
  --background      end, of a slot record: answer once the session's ending lock
                    is held; the save, the delete and the removal of the rules go
                    on in a process of their own (logs_dir/end.log). A resume of
                    the workspace waits for it; a failed save keeps the container.
  --timeout S       Seconds to wait for a clean stop before forcing it; 0
                    stops at once [default: 60].
  --force           Do not ask (COI_FORCE=1 does the same). next: allow any
                    directory as a mount except / and Incus's own.
  --dry-run         Change nothing: print the plan, every change the command
                    would make (Incus REST calls, execs, coi programs with the
                    JSON record each is given), after the usual output.
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
  coi kill --no-save coi-3f2a9c1b-2
  coi shutdown --timeout 30 coi-3f2a9c1b-1
  coi clean --force
  coi clean --sessions --force
  coi persist coi-3f2a9c1b-1
  coi pool fill --size 2
  coi pool status --all --format json
  coi pool drain
"""

from __future__ import annotations

import sys

from coi_common import output
from coi_common.entry import Args, expand_resume_flags, run_main


def main(argv: list[str] | None = None) -> None:
    """Entry point of coi-slot."""
    run_main("coi-slot", __doc__ or "", dispatch,
             expand_resume_flags(sys.argv[1:] if argv is None else argv))


def dispatch(args: Args) -> int:
    """Run the chosen command; each returns the exit status."""
    as_json = output.wants_json(args)
    if args["next"]:
        from coi_slot import allocate  # noqa: PLC0415

        return allocate.run(args)
    if args["pool"]:
        from coi_slot import pool_commands  # noqa: PLC0415

        return pool_commands.run(args, as_json=as_json)
    if args["list"]:
        from coi_slot import listing  # noqa: PLC0415

        return listing.run(everything=args["--all"], all_users=args["--all-users"],
                           as_json=as_json)
    from coi_slot import actions  # noqa: PLC0415

    if args["end"]:
        return actions.run_end(args, as_json=as_json)
    return actions.run(args, as_json=as_json)
