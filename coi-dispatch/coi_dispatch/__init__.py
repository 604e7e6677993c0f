"""coi: run AI coding assistants in isolated Incus containers.

Usage:
  coi [--debug] <command> [<args>...]
  coi (-h | --help)
  coi (-V | --version)

`coi NAME ARGS...` runs the executable that owns NAME (see `coi help`) with
NAME and ARGS, and exits with its status. A NAME that is not a coi command
but exists as `coi-NAME` next to coi or on PATH is run as `coi-NAME ARGS...`.

Options:
  --debug      Show tracebacks on errors (same as COI_DEBUG=1).
  -h --help    List the commands.
  -V --version  Print coi, Python and Incus versions.
"""

from __future__ import annotations

import os
import sys

from coi_common import __version__, output, usage
from coi_common.commands import ALIASES, BY_NAME, COMMANDS
from coi_common.entry import PROG_VARIABLE, VERBOSITY_FLAGS, Args, parse_args, run_main
from coi_common.errors import CoiError, NotFound, UsageError
from coi_common.executables import find_executable

BUILTIN_DOC = """coi's own commands.

Usage:
  coi version [--format FMT] [<ignored>...]
  coi help [<command>...]
  coi completion [<shell>]

Commands:
  version     Print coi's, Python's and the Incus server's versions. Words after
              it are ignored, as the original coi did.
  help        Show what coi can do, or the help of one command: the same text as
              `coi NAME --help`.
  completion  Print the completion script of a shell: bash (the default), zsh or
              fish. It completes commands, subcommands, flags, and the names of
              containers, saved sessions, images, profiles and tools.

Options:
  --format FMT  Output format: text or json [default: text].

Examples:
  coi version --format json
  coi help session list
  coi completion zsh > ~/.zfunc/_coi
"""

def main(argv: list[str] | None = None) -> None:
    """Entry point of `coi`."""
    argv = sys.argv[1:] if argv is None else argv
    if all(word in VERBOSITY_FLAGS for word in argv) or argv[0] in ("-h", "--help"):
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
    if name in ALIASES:
        name, rest = ALIASES[name][0], [*ALIASES[name][1:], *rest]
    if name in BY_NAME and BY_NAME[name].owner == "coi":
        return builtin(name, rest)
    if name == "__complete":
        from coi_dispatch import complete  # noqa: PLC0415 - completion only

        return complete.answer(rest)
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


def builtin(name: str, rest: list[str]) -> int:
    """version, help and completion: parsed and helped as every other command."""
    argv = [name, *rest]
    if usage.wants_help(argv):
        print(usage.command_help(BUILTIN_DOC, argv))
        return 0
    options = parse_args("coi", BUILTIN_DOC, argv, shown_as="coi")
    if name == "version":
        return show_version(as_json=output.wants_json(options))
    if name == "help":
        return show_help(options["<command>"])
    from coi_dispatch import complete  # noqa: PLC0415 - completion only

    print(complete.script(options["<shell>"] or "bash"))
    return 0


def show_help(words: list[str]) -> int:
    """`coi help` lists commands; `coi help NAME [SUB]` shows that command's help."""
    if not words:
        print(overview())
        return 0
    if words[0] in ALIASES:
        words = [*ALIASES[words[0]], *words[1:]]
    command = BY_NAME.get(words[0])
    if command is None:
        raise UsageError(unknown_command_message(words[0]))
    check_subcommands(words)
    if command.owner == "coi":
        print(usage.command_help(BUILTIN_DOC, words))
        return 0
    exec_owner(command.owner, [*words, "--help"])
    return 0


def check_subcommands(words: list[str]) -> None:
    """`coi help image list`: every word after the command is one of its subcommands."""
    from coi_dispatch.grammar import GRAMMAR  # noqa: PLC0415

    node = GRAMMAR[words[0]]
    for at, word in enumerate(words[1:], start=1):
        if word not in node["commands"]:
            known = ", ".join(node["commands"]) or "none"
            raise UsageError(f"{word!r} is not a command of 'coi {' '.join(words[:at])}' "
                             f"(its commands: {known})")
        node = node["commands"][word]


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


if __name__ == "__main__":
    main()
