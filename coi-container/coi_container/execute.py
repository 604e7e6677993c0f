"""`coi container exec`: run one command in a running container, its status passed on.

The `incus exec` arguments are built as data in one place (`incus_args`),
from a validated ExecRequest. Streaming hands the terminal (or the pipes) to
`incus exec`; --capture collects stdout and stderr as bytes and renders them
at the edge: an `exec` JSON record, or the raw stdout for scripts.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import traceback
from dataclasses import dataclass
from typing import IO, Final

from coi_common import incus, naming, output
from coi_common.entry import Args, debug_enabled, report
from coi_common.errors import BadInput, CoiError, NotFound, UsageError
from coi_common.naming import validate_container_name
from coi_common.protocol import make_record, write_record
from coi_container import PROG, lifecycle

FORMATS: Final = ("json", "raw")
DEFAULT_FORMAT: Final = "json"
NUMERIC_ID: Final = re.compile(r"0|[1-9][0-9]{0,9}")
"""Plain decimal ids: no sign, spaces, leading zeros or non-ASCII digits."""
MAX_ID: Final = 2**32 - 2
"""The largest uid/gid; 2**32 - 1 means "no id" to the kernel."""
CWD_KINDS: Final = ("directory", "symlink")


@dataclass(frozen=True)
class ExecRequest:
    """One command to run: where, as whom, with which environment and directory."""

    name: str
    command: tuple[str, ...]
    user: int | None = None
    group: int | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None


def run(args: Args) -> int:
    """Run `container exec`; return the command's exit status (or raise a CoiError)."""
    fmt = output_format(args["--capture"], args["--format"])
    if fmt != "json":
        return _run(args, fmt)
    try:
        return _run(args, fmt)
    except CoiError as exc:
        # JSON is the default of --capture: a failure answers in JSON even unasked.
        if debug_enabled(["--debug"] if args["--debug"] else []):
            traceback.print_exc()
        return report(PROG, exc, as_json=True)


def _run(args: Args, fmt: str | None) -> int:
    request = parse_request(args)
    client = lifecycle.client()
    check_ready(client, request)
    there = dataclasses.replace(request, name=client.ref(request.name))  # REMOTE:NAME
    if fmt is None:
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        return client.cli_hand_over(incus_args(there, interactive=interactive))
    result = client.cli_bytes(incus_args(there, interactive=False))
    if fmt == "raw":
        _write_bytes(sys.stdout, result.stdout)
        _write_bytes(sys.stderr, result.stderr)
    else:
        write_record(make_record("exec", stdout=_text(result.stdout),
                                 stderr=_text(result.stderr), exit_code=result.returncode))
    return result.returncode


# -- the plan ---------------------------------------------------------------------------


def incus_args(request: ExecRequest, *, interactive: bool) -> list[str]:
    """The `incus exec` arguments (after `incus --project P`) that run the request.

    A pseudo-terminal (-t) only when asked; -T otherwise so pipes stay byte-exact.
    The group defaults to the user id: Incus would otherwise run uid N as gid 0.
    """
    args = ["exec", request.name, "-t" if interactive else "-T"]
    group = request.group if request.group is not None else request.user
    if request.user is not None:
        args += ["--user", str(request.user)]
    if group is not None:
        args += ["--group", str(group)]
    for key, value in request.env:
        args += ["--env", f"{key}={value}"]
    if request.cwd is not None:
        args += ["--cwd", request.cwd]
    return [*args, "--", *request.command]


def check_ready(client: incus.Incus, request: ExecRequest) -> None:
    """The container exists and runs, and --cwd names a directory in it.

    The directory is checked here because `incus exec` silently runs the
    command in / when --cwd does not exist.
    """
    status = lifecycle.require(client, request.name).get("status")
    if status != lifecycle.RUNNING:
        raise CoiError(f"container {request.name} is {str(status).lower()}, not running",
                       hint=f"start it: coi container start {request.name}")
    if request.cwd is None:
        return
    kind = client.file_type(request.name, request.cwd)
    if kind is None:
        raise NotFound(f"directory {request.cwd} does not exist in container {request.name}")
    if kind not in CWD_KINDS:
        raise BadInput(f"--cwd {request.cwd} is a {kind} in container {request.name}, "
                       f"not a directory")


# -- arguments --------------------------------------------------------------------------


def output_format(capture: bool, value: str | None) -> str | None:
    """None to stream; "json" or "raw" with --capture."""
    if value is not None and not capture:
        raise UsageError("--format only applies with --capture",
                         hint="e.g. coi container exec NAME --capture --format raw -- pwd")
    if not capture:
        return None
    fmt = DEFAULT_FORMAT if value is None else value
    output.wants_json({"--format": fmt}, FORMATS)
    return fmt


def parse_request(args: Args) -> ExecRequest:
    """An ExecRequest from the docopt arguments, every value validated."""
    command = tuple(args["<command>"])
    if not command or not command[0]:
        raise UsageError("no command given after '--'")
    cwd = args["--cwd"]
    if cwd is not None:
        cwd = lifecycle.container_path(cwd, what="--cwd")
    return ExecRequest(name=validate_container_name(args["<name>"]), command=command,
                       user=numeric_id(args["--user"], "--user"),
                       group=numeric_id(args["--group"], "--group"),
                       env=tuple(naming.env_pair(item) for item in args["--env"]), cwd=cwd)


def numeric_id(value: str | None, option: str) -> int | None:
    """A uid or gid given as a plain decimal number 0..MAX_ID; None when not given."""
    if value is None:
        return None
    if not NUMERIC_ID.fullmatch(value) or int(value) > MAX_ID:
        raise BadInput(f"{option} {value!r} is not a numeric id 0..{MAX_ID}",
                       hint="user and group are numbers, e.g. --user 1000")
    return int(value)


# -- output ------------------------------------------------------------------------------


def _text(data: bytes) -> str:
    """Command output as JSON text: UTF-8, undecodable bytes as U+FFFD."""
    return data.decode("utf-8", errors="replace")


def _write_bytes(stream: IO[str], data: bytes) -> None:
    """Write bytes unchanged to a text stream's binary buffer (there is one for real
    stdout/stderr and pytest's capture)."""
    stream.flush()
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(_text(data))
    else:
        buffer.write(data)
        buffer.flush()
