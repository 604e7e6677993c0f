"""The one wrapper every coi executable's main() runs through.

It parses the docopt usage, runs the command, and turns every CoiError into
one stderr line plus the exit code from coi_common.errors. A command asked
for JSON (`--format json`) that fails also prints one JSON error record on
stdout. Tracebacks appear only with --debug or COI_DEBUG=1.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from coi_common import __version__
from coi_common.errors import EXIT_FAILED, CoiError, Interrupted, UsageError

Args = Mapping[str, Any]
Handler = Callable[[Args], int | None]


def parse_args(prog: str, doc: str, argv: list[str], *, options_first: bool = False) -> Args:
    """Parse argv with the docopt usage `doc`; a mismatch becomes one UsageError line."""
    from docopt import DocoptExit, docopt  # noqa: PLC0415 - 18 ms, only where parsing happens

    try:
        return docopt(doc, argv, version=f"{prog} {__version__}", options_first=options_first)
    except DocoptExit as exc:
        raise UsageError(_usage_problem(str(exc)), hint=f"see '{prog} --help'") from None


def _usage_problem(docopt_message: str) -> str:
    first = docopt_message.strip().splitlines()[0] if docopt_message.strip() else ""
    if first.startswith("Usage:") or not first:
        return "invalid arguments"
    if "unmatched" in first:
        names = re.findall(r"'([^']+)'", first)
        return "unexpected argument " + ", ".join(repr(n) for n in names if n != "None")
    return first


def wants_json(args: Args) -> bool:
    """True when the command was asked for JSON output."""
    return args.get("--format") == "json" or bool(args.get("--json"))


def debug_enabled(argv: list[str]) -> bool:
    """--debug anywhere on the command line, or COI_DEBUG set to a true value."""
    return "--debug" in argv or os.environ.get("COI_DEBUG", "") not in ("", "0", "false")


def _raise_interrupted(signum: int, _frame: object) -> NoReturn:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def report(prog: str, error: CoiError, *, as_json: bool) -> int:
    """Print `error` as one stderr line (and a JSON record when asked); return its exit code."""
    if as_json:
        from coi_common.protocol import error_record, write_record  # noqa: PLC0415

        write_record(error_record(error))
    print(f"{prog}: {error.one_line()}", file=sys.stderr)
    return error.exit_code


def run_main(prog: str, doc: str, handler: Handler, argv: list[str] | None = None,
             *, options_first: bool = False) -> NoReturn:
    """Parse, run `handler(args)`, and exit with its status or the error's code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = debug_enabled(argv)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    as_json = False
    try:
        args = parse_args(prog, doc, argv, options_first=options_first)
        as_json = wants_json(args)
        status = handler(args) or 0
    except CoiError as exc:
        if debug:
            traceback.print_exc()
        status = report(prog, exc, as_json=as_json)
    except KeyboardInterrupt:
        status = report(prog, Interrupted("interrupted"), as_json=as_json)
    except BrokenPipeError:
        # The reader went away (`coi list | head`); nothing useful left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = EXIT_FAILED
    except Exception as exc:
        if debug:
            traceback.print_exc()
        status = report(prog, CoiError(f"internal error: {type(exc).__name__}: {exc}",
                                       hint="rerun with --debug and report it"), as_json=as_json)
    sys.stdout.flush()
    sys.exit(status)
