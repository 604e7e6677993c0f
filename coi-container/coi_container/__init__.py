"""coi-container: low-level container commands and file transfer, for scripts and people.

Usage:
  coi-container container launch <image> <name> [--ephemeral] [--debug]
  coi-container container start <name> [--debug]
  coi-container container stop <name> [--force] [--debug]
  coi-container container delete <name> [--force] [--debug]
  coi-container container exec <name> [--user UID] [--group GID] [--env KEY=VALUE]...
                [--cwd DIR] [--capture [--format FMT]] [--debug] -- <command>...
  coi-container container exists <name> [--debug]
  coi-container container running <name> [--debug]
  coi-container container mount <name> <device> <source> <path> [--shift] [--debug]
  coi-container file push [-r] [--uid N] [--gid N] [--mode MODE] <source> <name:path>
                [--debug]
  coi-container file pull [-r] <name:path> <target> [--debug]
  coi-container (-h | --help)
  coi-container --version

Commands:
  container launch   Create a container from a local image with the coi profile
                     ([incus] profile) and start it, with what a session has for
                     Docker inside (nesting) and no setuid files. --ephemeral:
                     Incus deletes it when it stops.
  container start    Start a stopped container (already running: nothing to do).
  container stop     Shut a container down cleanly, waiting up to 20 s; --force
                     stops it at once. An ephemeral container is gone afterwards.
  container delete   Delete a stopped container; a running one only with --force
                     (stopped at once, then deleted).
  container exec     Run a command in a running container. Its input and output
                     are yours and coi exits with its exit status. --capture
                     collects the output instead and prints one `exec` JSON
                     record (stdout, stderr, exit_code), or with --format raw
                     only the command's stdout, byte for byte.
  container exists   Exit 0 when the container exists, 1 when not; prints nothing.
  container running  Exit 0 when the container is running, 1 when not; prints
                     nothing.
  container mount    Add a disk device <device> showing the host directory
                     <source> at the absolute path <path> in the container.
  file push          Copy a host file (a directory with -r) into a container.
                     What it makes belongs to user code (uid/gid 1000), or
                     --uid/--gid, so files pushed into /workspace of a session
                     stay yours on the host and code can change them.
  file pull          Copy a file (a directory with -r) out of a container.

  Both copies work like cp: when the destination is an existing directory, or
  ends with '/', the copy goes inside it under its own name; otherwise the
  destination is the copy's name. Modes are kept (a push's files get --mode
  when given), missing parent directories are made (0755), and content is
  copied byte for byte. A pulled directory never merges into an existing one
  on the host, and a pull brings only regular files and directories (links,
  FIFOs and devices stay behind); a pull that stalls for 20 s or grows past
  8 GiB is stopped and writes nothing.

Options:
  --ephemeral        The container is deleted when it stops.
  --force            stop: at once, without a clean shutdown. delete: also a
                     running container.
  --user UID         Run as this numeric user id. Default: 0 (root).
  --group GID        Run with this numeric group id. Default: the --user id.
  --env KEY=VALUE    Set an environment variable for the command (repeatable).
  --cwd DIR          Absolute working directory in the container; it must exist.
  --capture          Collect the command's output instead of streaming it.
  --format FMT       With --capture: json or raw. Default: json.
  --shift            Shift the ownership of the mounted files into the
                     container's id range (idmapped mount), so uid 1000 on the
                     host is uid 1000 inside.
  -r --recursive     Copy a directory and everything in it.
  --uid N            push: owner of what is made in the container. Default: 1000
                     (code).
  --gid N            push: group of what is made. Default: the --uid id.
  --mode MODE        push: octal mode of the copied files, e.g. 0644. Default:
                     each file keeps its own; directories always keep theirs.
  --debug            Show tracebacks on errors.
  -h --help          Show this help.
  --version          Print the version.

Examples:
  coi container launch coi my-container --ephemeral
  coi container start my-container
  coi container stop my-container --force
  coi container running my-container || coi container start my-container
  coi container delete my-container --force
  coi container exec my-container --user 1000 --env FOO=bar --cwd /workspace -- npm test
  coi container exec my-container --capture --format raw -- pwd
  coi container exists my-container && echo yes
  coi container mount my-container workspace /home/ana/project /workspace --shift
  coi file push -r ./src my-container:/workspace/src
  coi file push --uid 0 --mode 0600 ./key my-container:/root/.ssh/id_ed25519
  coi file pull my-container:/workspace/build.log ./build.log
"""

from __future__ import annotations

import os
import sys
from typing import Final

from coi_common.entry import PROG_VARIABLE, Args, ArgumentError, report, run_main

PROG: Final = "coi-container"
EXEC_EXAMPLE: Final = "e.g. coi container exec NAME --capture -- ls -la"


def main(argv: list[str] | None = None) -> None:
    """Entry point of coi-container."""
    argv = sys.argv[1:] if argv is None else argv
    problem = _exec_command_problem(argv)
    if problem:
        # docopt would only say "unexpected argument ..." about the whole line.
        shown_as = f"{os.environ.get(PROG_VARIABLE) or PROG} container exec"
        sys.exit(report(PROG, ArgumentError(problem, shown_as=shown_as, hint=EXEC_EXAMPLE),
                        as_json=False))
    run_main(PROG, __doc__ or "", dispatch, argv)


def _exec_command_problem(argv: list[str]) -> str | None:
    """What is wrong with the command part of `container exec ...`, if anything."""
    if argv[:2] != ["container", "exec"]:
        return None
    options = argv[:argv.index("--")] if "--" in argv else argv
    if "-h" in options or "--help" in options:
        return None
    if "--" not in argv:
        return "needs '--' before the command"
    if argv.index("--") == len(argv) - 1:
        return "needs a command after '--'"
    return None


def dispatch(args: Args) -> int:
    """Run the chosen command; each returns the exit status."""
    if args["file"]:
        from coi_container import transfer  # noqa: PLC0415

        return transfer.run(args)
    if args["exec"]:
        from coi_container import execute  # noqa: PLC0415

        return execute.run(args)
    from coi_container import lifecycle  # noqa: PLC0415

    return lifecycle.run(args)
