"""The one wrapper every coi executable's main() runs through.

It parses the docopt usage, runs the command, and turns every CoiError into
one stderr line plus the exit code from coi_common.errors. A command asked
for JSON (`--format json`) that fails also prints one JSON error record on
stdout. Tracebacks appear only with --debug or COI_DEBUG=1.
"""

from __future__ import annotations

import copy
import itertools
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NoReturn

from coi_common import __version__, usage
from coi_common.errors import EXIT_FAILED, CoiError, Interrupted, UsageError
from coi_common.output import QUIET_VARIABLE, VERBOSE_VARIABLE

Args = Mapping[str, Any]
Handler = Callable[[Args], int | None]


PROG_VARIABLE: Final = "COI_PROG_NAME"
PLUMBING_VARIABLE: Final = "COI_PLUMBING"
"""Set (to 1) by coi_common.plumbing for a coi program it runs: a failure is then said
only in the JSON error record, and the parent prints the one line."""
SPARE_VARIABLE: Final = "COI_SPARE"
"""Set (to 1) by coi_host.spare.Spare for a program started before it is needed: it
loads its code, then reads its arguments from stdin, one JSON array of strings."""
SPARE_LINE_MAX: Final = 1 << 16
_PLUMBING: dict[str, bool] = {"child": False}
"""Set by the dispatcher (`coi`) for the executable it runs, so argument errors name the
command as the user typed it (`coi kill: ...`, not `coi-slot: ...`)."""


class ArgumentError(UsageError):
    """A command line that does not fit the usage: one line saying what is wrong,
    printed under the command's name as typed, then the usage lines of that command."""

    def __init__(self, message: str, *, shown_as: str, usage: Sequence[str] = (),
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.shown_as = shown_as
        self.usage = tuple(usage)


def parse_args(prog: str, doc: str, argv: list[str], *, options_first: bool = False,
               shown_as: str | None = None) -> Args:
    """Parse argv with the docopt usage `doc`; a mismatch raises ArgumentError.

    `shown_as` replaces the usage's program name in messages (the dispatcher's `coi`).
    """
    from docopt import DocoptExit, docopt  # noqa: PLC0415 - 18 ms, only where parsing happens

    _copy_option_matches()
    try:
        return docopt(doc, argv, version=f"{prog} {__version__}", options_first=options_first)
    except DocoptExit as exc:
        raise argument_error(doc, argv, str(exc), shown_as=shown_as) from None


def _copy_option_matches() -> None:
    """docopt-ng 0.9 hands an option's argv token itself to the usage pattern that
    matches it, and a pattern tried and then rejected (another usage line) has already
    added its value to that token: `[--mount SPEC]...` came out with the last value
    twice (docopt-ng issue #60, fixed upstream by PR #71, not released). Matching a
    copy keeps every value exactly once."""
    import docopt  # noqa: PLC0415

    option = docopt.Option
    if getattr(option.single_match, "coi_copies", False):
        return
    original = option.single_match

    def single_match(self: Any, left: list[Any]) -> tuple[int | None, Any]:
        position, token = original(self, left)
        if token is None:
            return position, token
        fresh = copy.copy(token)
        if isinstance(fresh.value, list):
            fresh.value = list(fresh.value)
        return position, fresh

    single_match.coi_copies = True  # type: ignore[attr-defined]
    option.single_match = single_match


# -- argument errors: which command was meant, what it lacks ---------------------------------


def argument_error(doc: str, argv: Sequence[str], docopt_message: str, *,
                   shown_as: str | None = None) -> ArgumentError:
    """Say what is wrong with argv in the terms of the command the user meant.

    The command is the usage pattern(s) whose leading command words match most of
    argv's leading words. A required item of it is missing when the pattern with that
    item made optional fits argv; when nothing fits even with every required item
    optional, the words docopt could not place are unexpected.
    """
    program, patterns = usage.patterns_of(doc)
    base = shown_as or program
    chosen = usage.closest(patterns, argv)
    if not chosen:
        return ArgumentError(_usage_problem(docopt_message), shown_as=base,
                             hint=f"see '{base} --help'")
    name = " ".join([base, *chosen[0].words])
    lines = usage.render_usage(base, chosen)
    first = docopt_message.strip().splitlines()[0] if docopt_message.strip() else ""
    if first and not first.startswith("Usage:") and "unmatched" not in first:
        return ArgumentError(first, shown_as=name, usage=lines)  # e.g. "--slot requires argument"
    subcommands = usage.next_words(chosen)
    if subcommands:
        typed = usage.leading_words(argv)[len(chosen[0].words):]
        problem = f"unknown command {typed[0]!r}" if typed else "missing a command"
        return ArgumentError(f"{problem}; one of: {', '.join(subcommands)}", shown_as=name,
                             hint=f"see '{name} --help'")
    findings = [_missing(doc, program, pattern, argv) for pattern in chosen]
    missing = [found for found in findings if isinstance(found, tuple) and found]
    if missing and len(chosen) == 1:
        message = "missing " + " and ".join(_describe(item) for item in missing[0])
    elif missing:
        message = "missing arguments"
    else:
        message = next((f for f in findings if isinstance(f, str)), "invalid arguments")
    return ArgumentError(message, shown_as=name, usage=lines)


def _missing(doc: str, program: str, pattern: usage.Pattern,
             argv: Sequence[str]) -> tuple[str, ...] | str:
    """The required items argv lacks (as few as make it fit), or why nothing fits."""
    if "|" in pattern.items:  # top-level alternatives: no single item to blame
        return "invalid arguments"
    required = [i for i, item in enumerate(pattern.items) if not item.startswith("[")]
    relaxed = set(required)
    problem = _fit(doc, program, pattern, relaxed, argv)
    if problem is not None:
        return problem
    for index in required:
        if _fit(doc, program, pattern, relaxed - {index}, argv) is None:
            relaxed.discard(index)
    return tuple(pattern.items[i] for i in required if i in relaxed)


def _fit(doc: str, program: str, pattern: usage.Pattern, optional: set[int],
         argv: Sequence[str]) -> str | None:
    """None when argv fits `pattern` with the items at `optional` made optional;
    otherwise what docopt could not place."""
    from docopt import DocoptExit, DocoptLanguageError, docopt  # noqa: PLC0415

    items = [f"[{item}]" if index in optional else item
             for index, item in enumerate(pattern.items)]
    line = " ".join([program, *pattern.words, *items])
    body = usage.usage_body(doc)
    trial = doc.replace(body, f"\n  {line}\n", 1)
    try:
        docopt(trial, list(argv), default_help=False)
    except DocoptExit as exc:
        return _usage_problem(str(exc))
    except DocoptLanguageError:  # a usage this analysis cannot take apart
        return "invalid arguments"
    return None


def _usage_problem(docopt_message: str) -> str:
    """docopt's own complaint as one line: the words it could not place, or its text."""
    first = docopt_message.strip().splitlines()[0] if docopt_message.strip() else ""
    if first.startswith("Usage:") or not first:
        return "invalid arguments"
    if "unmatched" in first:
        return "unexpected argument " + ", ".join(repr(w) for w in _unmatched_words(first))
    return first


def _unmatched_words(line: str) -> list[str]:
    """The argv words in docopt's `found unmatched (duplicate?) arguments [...]`, as typed.

    The list holds reprs (`Argument(None, 'x')`, `Option(None, '--x', 0, True)`), so it
    is read as a Python expression (parsed, never run): a word that is empty or holds a
    quote or a control character comes out as it was typed.
    """
    import ast  # noqa: PLC0415 - a usage error's path only

    try:
        listed = ast.parse(line[line.index("["):], mode="eval").body
    except (ValueError, SyntaxError):
        return []
    words = []
    for item in listed.elts if isinstance(listed, ast.List) else ():
        # Argument(None, value) gives its value; Option(short, long, ...) its long name.
        strings = [arg.value for arg in getattr(item, "args", ())[:2]
                   if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        if strings:
            words.append(strings[-1])
    return words


def _describe(item: str) -> str:
    """`(<name>... | --all)` as `<name> or --all`."""
    text = item.replace("...", "")
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    return " or ".join(part.strip() for part in text.split("|"))


RESUME_FLAGS: Final = ("--resume", "--continue")


def expand_resume_flags(argv: list[str]) -> list[str]:
    """docopt has no option with an optional value: `--resume=ID` and `--continue=ID`
    become `--resume --session ID`, a bare `--continue` becomes `--resume`. Nothing
    after `--` (the command of `coi run`) is touched. For coi-shell and coi-slot next,
    which take the same flags."""
    result: list[str] = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return result + argv[index:]
        flag, sep, value = arg.partition("=")
        if flag in RESUME_FLAGS:
            result += ["--resume", "--session", value] if sep else ["--resume"]
        else:
            result.append(arg)
    return result


def wants_json(args: Args) -> bool:
    """True when the command was asked for JSON output."""
    return args.get("--format") == "json" or bool(args.get("--json"))


VERBOSITY_FLAGS: Final = {"-q": QUIET_VARIABLE, "--quiet": QUIET_VARIABLE,
                          "-v": VERBOSE_VARIABLE, "--verbose": VERBOSE_VARIABLE}


def take_verbosity(argv: list[str]) -> list[str]:
    """-q/--quiet and -v/--verbose, which every command takes anywhere before `--`: taken
    out of argv into the environment (output.quiet/verbose), which the programs the
    command runs inherit; the last one given wins."""
    cut = argv.index("--") if "--" in argv else len(argv)
    for word in argv[:cut]:
        if word in VERBOSITY_FLAGS:
            os.environ.pop(QUIET_VARIABLE, None)
            os.environ.pop(VERBOSE_VARIABLE, None)
            os.environ[VERBOSITY_FLAGS[word]] = "1"
    return [w for w in argv[:cut] if w not in VERBOSITY_FLAGS] + argv[cut:]


REMOTE_VARIABLE: Final = "COI_REMOTE"
TARGET_VARIABLE: Final = "COI_TARGET"
PLACEMENT_FLAGS: Final = {"--remote": REMOTE_VARIABLE, "--target": TARGET_VARIABLE}
"""Flags every command takes: which server (incus.remote) and, on a cluster, which
member new containers go to (incus.target)."""


def take_remote(argv: list[str]) -> list[str]:
    """--remote NAME and --target MEMBER (or --flag=VALUE), which every command takes
    before `--`: taken out of argv into COI_REMOTE and COI_TARGET (config's incus.remote
    and incus.target, docs/remote.md), which the programs the command runs inherit.
    Without a value a flag stays, for the parser to refuse."""
    cut = argv.index("--") if "--" in argv else len(argv)
    kept, index = [], 0
    while index < cut:
        word = argv[index]
        flag, equals, value = word.partition("=")
        if word in PLACEMENT_FLAGS and index + 1 < cut and argv[index + 1]:
            os.environ[PLACEMENT_FLAGS[word]] = argv[index + 1]
            index += 2
            continue
        if equals and flag in PLACEMENT_FLAGS and value:
            os.environ[PLACEMENT_FLAGS[flag]] = value
        else:
            kept.append(word)
        index += 1
    return kept + argv[cut:]


def debug_enabled(argv: list[str]) -> bool:
    """--debug anywhere on the command line, or COI_DEBUG set to a true value."""
    return "--debug" in argv or os.environ.get("COI_DEBUG", "") not in ("", "0", "false")


def json_requested(argv: list[str]) -> bool:
    """`--format json` (or `--format=json`) before any `--`: seen before parsing, so a
    usage error of a command asked for JSON is a JSON error record too."""
    words = argv[:argv.index("--")] if "--" in argv else argv
    return "--format=json" in words or any(
        pair == ("--format", "json") for pair in itertools.pairwise(words))


def _print_traceback() -> None:
    import traceback  # noqa: PLC0415 - --debug only (it costs ~5 ms to import)

    traceback.print_exc()


def _raise_interrupted(signum: int, _frame: object) -> NoReturn:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def report(prog: str, error: CoiError, *, as_json: bool) -> int:
    """Print `error` as one stderr line (and a JSON record when asked); return its exit code."""
    if as_json:
        from coi_common.protocol import error_record, write_record  # noqa: PLC0415

        write_record(error_record(error))
    if isinstance(error, ArgumentError):
        prog = error.shown_as
    if as_json and _PLUMBING["child"]:  # the coi program that ran us says it, once
        return error.exit_code
    print(f"{prog}: {error.one_line()}", file=sys.stderr)
    for line in getattr(error, "usage", ()):
        print(line, file=sys.stderr)
    return error.exit_code


def _planned(handler: Handler, args: Args, *, as_json: bool) -> int:
    """A --dry-run of `handler`: its plan printed after it (coi_common.plan), then gone
    (a test running commands in one process plans each apart)."""
    from coi_common import plan  # noqa: PLC0415 - only a dry run needs it here

    plan.start()
    try:
        status = handler(args) or 0
        plan.render(as_json=as_json)
        return status
    finally:
        plan.stop()


def run_main(prog: str, doc: str, handler: Handler, argv: list[str] | None = None,
             *, options_first: bool = False, warm: Callable[[], None] | None = None
             ) -> NoReturn:
    """Parse, run `handler(args)`, and exit with its status or the error's code. `warm`
    loads what the handler will need, in a spare (SPARE_VARIABLE) before it waits."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.pop(SPARE_VARIABLE, "") == "1":
        argv = _spare_argv(warm)
    # Read once and dropped, so programs this one runs do not inherit the dispatcher's name.
    shown_as = os.environ.pop(PROG_VARIABLE, None) or None
    _PLUMBING["child"] = os.environ.pop(PLUMBING_VARIABLE, "") == "1"
    argv = take_remote(take_verbosity(argv))
    debug = debug_enabled(argv)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    as_json = json_requested(argv)
    # Messages name the command as typed (`coi run: ...`), never the executable.
    said_as = f"{shown_as} {argv[0]}" if shown_as and argv else prog
    if shown_as and (usage.wants_help(argv) or usage.bare_group(doc, argv)):
        # `coi NAME --help`: NAME's own help in coi's terms, not the executable's page.
        print(usage.command_help(doc, argv, shown_as))
        sys.exit(0)
    try:
        args = parse_args(prog, doc, argv, options_first=options_first, shown_as=shown_as)
        as_json = wants_json(args)
        status = _planned(handler, args, as_json=as_json) if args.get("--dry-run") else \
            handler(args) or 0
    except CoiError as exc:
        if debug:
            _print_traceback()
        status = report(said_as, exc, as_json=as_json)
    except KeyboardInterrupt:
        status = report(said_as, Interrupted("interrupted"), as_json=as_json)
    except BrokenPipeError:
        # The reader went away (`coi list | head`); nothing useful left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = EXIT_FAILED
    except Exception as exc:
        if debug:
            _print_traceback()
        status = report(said_as, CoiError(f"internal error: {type(exc).__name__}: {exc}",
                                       hint="rerun with --debug and report it"), as_json=as_json)
    sys.stdout.flush()
    if os.environ.get("COI_TRACE"):
        from coi_common import trace  # noqa: PLC0415 - tracing only

        trace.process_end(prog)
    if _whole_process(prog):
        # Every file coi writes is closed by now and its threads are daemons: the
        # interpreter's teardown (~8 ms, in each of a session's coi processes) is skipped.
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _spare_argv(warm: Callable[[], None] | None) -> list[str]:
    """A spare's arguments, once its caller needs it; end of input (the caller went
    away unused) ends it quietly, anything but an array of strings is refused."""
    import json  # noqa: PLC0415

    import docopt  # noqa: F401, PLC0415 - loaded before the wait, as warm() loads the rest

    if warm is not None:
        warm()
    line = bytearray()
    while not line.endswith(b"\n") and len(line) <= SPARE_LINE_MAX:
        byte = os.read(0, 1)  # byte by byte: what follows the line stays the program's stdin
        if not byte:
            break
        line += byte
    if not line:
        os._exit(0)
    try:
        argv = json.loads(line) if len(line) <= SPARE_LINE_MAX else None
    except (ValueError, RecursionError):
        argv = None
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        print("spare: expected its arguments as one JSON array of strings", file=sys.stderr)
        os._exit(2)
    return argv


def _whole_process(prog: str) -> bool:
    """Whether this process is the program (`python -m coi_x`, or its console script),
    not a test calling its main()."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return os.path.basename(sys.argv[0]) == prog or \
        bool(spec and spec.name.startswith("coi_") and spec.name.endswith(".__main__"))
