"""coi: run AI coding assistants in isolated Incus containers.

Usage:
  coi [--debug] <command> [<args>...]
  coi (-h | --help)
  coi --version

`coi NAME ARGS...` runs the executable that owns NAME (see `coi help`) with
NAME and ARGS, and exits with its status. A NAME that is not a coi command
but exists as `coi-NAME` next to coi or on PATH is run as `coi-NAME ARGS...`.

Options:
  --debug      Show tracebacks on errors (same as COI_DEBUG=1).
  -h --help    List the commands.
  --version    Print coi, Python and Incus versions.
"""

from __future__ import annotations

import os
import sys

from coi_common import __version__, output
from coi_common.entry import PROG_VARIABLE, Args, parse_args, run_main
from coi_common.errors import CoiError, NotFound, UsageError
from coi_common.executables import find_executable
from coi_dispatch.commands import BY_NAME, COMMANDS

VERSION_USAGE = """Usage:
  coi version [--format FMT]

Options:
  --format FMT  Output format: text or json [default: text].
"""

COMPLETION_USAGE = """Usage:
  coi completion [bash]
"""

HELP_USAGE = """Usage:
  coi help [<command>]
"""


def main(argv: list[str] | None = None) -> None:
    """Entry point of `coi`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        sys.exit(0)
    run_main("coi", __doc__ or "", dispatch, argv, options_first=True)


def overview() -> str:
    """The command list shown by `coi`, `coi --help` and `coi help`."""
    width = max(len(c.name) for c in COMMANDS)
    lines = ["Usage: coi <command> [<args>...]", "", "Commands:"]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS]
    lines += ["", "Run 'coi help <command>' for a command's options. 'coi --debug <command>' "
              "shows tracebacks."]
    return "\n".join(lines)


def dispatch(args: Args) -> int:
    """Run a built-in command, or exec the owner of the command."""
    if args["--version"]:
        return show_version(as_json=False)
    if args["--debug"]:
        os.environ["COI_DEBUG"] = "1"
    name, rest = args["<command>"], list(args["<args>"])
    if name == "version":
        options = parse_args("coi version", VERSION_USAGE, ["version", *rest])
        return show_version(as_json=output.wants_json(options))
    if name == "help":
        return show_help(rest)
    if name == "completion":
        parse_args("coi completion", COMPLETION_USAGE, ["completion", *rest])
        print(bash_completion())
        return 0
    command = BY_NAME.get(name)
    if command is not None:
        exec_owner(command.owner, [name, *rest])
    if name.startswith("-"):
        raise UsageError(f"unknown option {name!r}", hint="see 'coi --help'")
    external = find_executable(f"coi-{name}")
    if external:
        os.execv(external, [external, *rest])  # noqa: S606 - git's rule: coi x = coi-x
    raise UsageError(unknown_command_message(name))


def unknown_command_message(name: str) -> str:
    """One line for an unknown command, with the closest known name when there is one."""
    import difflib  # noqa: PLC0415 - ~10 ms, for a mistyped command only

    close = difflib.get_close_matches(name, list(BY_NAME), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; see 'coi --help'"
    return f"{name!r} is not a coi command{hint}"  # repr: never a raw escape sequence


def exec_owner(owner: str, argv: list[str]) -> None:
    """Replace this process with the owner executable; its status becomes ours."""
    path = find_executable(owner)
    if path is None:
        raise NotFound(f"'coi {argv[0]}' needs {owner}, which is not installed "
                       "(neither next to coi nor on PATH)")
    sys.stdout.flush()
    os.environ[PROG_VARIABLE] = "coi"  # its argument errors then say `coi NAME: ...`
    os.execv(path, [path, *argv])  # noqa: S606 - argv is passed through, never a shell


def show_help(rest: list[str]) -> int:
    """`coi help` lists commands; `coi help NAME` shows NAME's own help."""
    name = parse_args("coi help", HELP_USAGE, ["help", *rest])["<command>"]
    if name is None:
        print(overview())
        return 0
    command = BY_NAME.get(name)
    if command is None:
        raise UsageError(unknown_command_message(name))
    if command.owner == "coi":
        usage = {"version": VERSION_USAGE, "completion": COMPLETION_USAGE}.get(command.name)
        print(f"{command.summary}.\n\n{usage or HELP_USAGE}")
        return 0
    exec_owner(command.owner, [command.name, "--help"])
    return 0


def show_version(*, as_json: bool) -> int:
    """coi and Python versions, and the Incus server's when the daemon answers."""
    import platform  # noqa: PLC0415

    from coi_common.incus import Incus  # noqa: PLC0415

    try:
        server = Incus(timeout=2).server_version()
    except CoiError:
        server = "unavailable"
    if as_json:
        from coi_common.protocol import make_record, write_record  # noqa: PLC0415

        write_record(make_record("version", coi_version=__version__,
                                 python_version=platform.python_version(), incus=server))
    else:
        print(f"coi {__version__}\npython {platform.python_version()}\nincus: {server}")
    return 0


def bash_completion() -> str:
    """A bash completion script completing coi's command names."""
    names = " ".join(c.name for c in COMMANDS)
    return (
        "# coi bash completion: eval \"$(coi completion bash)\"\n"
        "_coi() {\n"
        "  local cur=${COMP_WORDS[COMP_CWORD]}\n"
        "  if [ \"$COMP_CWORD\" -eq 1 ]; then\n"
        f"    COMPREPLY=($(compgen -W \"{names}\" -- \"$cur\"))\n"
        "  else\n"
        "    COMPREPLY=($(compgen -f -- \"$cur\"))\n"
        "  fi\n"
        "}\n"
        "complete -F _coi coi"
    )


if __name__ == "__main__":
    main()
