"""The JSON records coi executables exchange (contract version 1, docs/protocol.md).

Every record is a JSON object with `"coi": 1` and a `kind`. Writers only add
fields; readers ignore fields they do not know and refuse a newer major
version with a clear message. Streams of many records are JSON Lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping
from typing import IO, Any, Final

from coi_common.errors import BadInput, CoiError

CONTRACT_VERSION: Final = 1

# kind -> fields a reader may rely on. Everything else is optional.
REQUIRED_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "error": ("code", "message"),
    "version": ("coi_version", "python_version", "incus"),
    "config": ("values",),
    "doctor": ("ok", "checks"),
    "setup": ("changed", "steps"),
    "tmux_session": ("name", "workspace", "tmux", "attached"),
    "tmux_list": ("sessions",),
    "image_list": ("images",),
    "session_list": ("sessions",),
    "net_status_list": ("containers",),
    "slot": ("workspace", "slot", "container", "persistent", "image", "profile"),
    "image": ("alias", "fingerprint", "size", "created_at", "properties"),
    "image_deleted": ("alias", "fingerprint"),
    "exec": ("stdout", "stderr", "exit_code"),
    "container_list": ("active_containers",),
    "container_action": ("name", "action", "ok"),
    "pool_status": ("workspace", "size", "containers"),
    "session": ("id", "tool", "workspace", "updated_at"),
    "session_saved": ("saved", "container", "dropped"),
    "session_restored": ("id", "container", "credentials"),
    "session_deleted": ("id", "tool"),
    "sync": ("container", "direction", "workspace", "copied", "deleted", "conflicts"),
    "sync_base": ("container", "remote", "workspace", "created", "mask", "files"),
    "net_rules": ("container", "mode", "interface", "rules", "allowed"),
    "net_removed": ("container", "interface", "removed"),
    "net_refresh": ("container", "ok", "changed", "added", "removed"),
    "net_status": ("container", "mode", "interface", "rules", "allowed"),
    "net_teardown": ("tables", "states"),
    "uninstall": ("changed", "steps"),
    "trust_state": ("path", "state", "sha256"),
    "view": ("source", "protected", "masked"),
    "view_released": ("container",),
    "host_request": ("verb",),
    "host_reply": ("verb", "result"),
    "plan_step": ("step", "call"),
}

Record = dict[str, Any]


def make_record(kind: str, **fields: Any) -> Record:
    """A record of `kind` carrying the contract version, fields after it."""
    return {"coi": CONTRACT_VERSION, "kind": kind, **fields}


def error_record(error: CoiError) -> Record:
    """The JSON form of a failure: stable machine `code` plus the human `message`."""
    return make_record("error", code=error.code, message=error.one_line(),
                       exit_code=error.exit_code)


def write_record(record: Mapping[str, Any], stream: IO[str] | None = None) -> None:
    """Write one record as one line and flush, so a pipe reader sees it at once."""
    out = stream or sys.stdout
    out.write(json.dumps(record, sort_keys=False, default=str) + "\n")
    out.flush()


def validate(record: Any, kind: str | tuple[str, ...] | None = None) -> Record:
    """Check a decoded record: an object, our contract version, a known kind, its fields."""
    if not isinstance(record, dict):
        raise BadInput(f"expected a JSON object, got {type(record).__name__}")
    version = record.get("coi")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadInput("record has no integer 'coi' contract version")
    if version > CONTRACT_VERSION:
        raise BadInput(f"record uses contract version {version}; this coi reads up to "
                       f"{CONTRACT_VERSION}", hint="upgrade coi")
    got = record.get("kind")
    wanted = (kind,) if isinstance(kind, str) else kind
    if wanted and got not in wanted:
        raise BadInput(f"expected a record of kind {' or '.join(wanted)}, got {got!r}")
    missing = [f for f in REQUIRED_FIELDS.get(str(got), ()) if f not in record]
    if missing:
        raise BadInput(f"{got} record is missing field {', '.join(missing)}")
    return record


MAX_DEPTH: Final = 64
"""Deepest nesting of objects and arrays coi accepts in JSON it did not write itself."""


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads for input from outside (stdin, a socket, a file a container wrote):
    nesting deeper than `max_depth` is refused as BadInput, never a RecursionError here
    or in the recursive code that later walks the value."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"input is not valid JSON: {exc.msg} at line {exc.lineno} "
                       f"column {exc.colno}") from None
    except RecursionError:
        raise BadInput(f"input JSON is nested more than {max_depth} levels deep") from None
    except UnicodeDecodeError:  # bytes that are neither UTF-8 nor UTF-16/32
        raise BadInput("input JSON is not UTF-8 text") from None
    except ValueError:  # what is left: an integer past Python's digit limit
        raise BadInput(f"input JSON has a number of more than "
                       f"{sys.get_int_max_str_digits()} digits") from None
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else \
            value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > max_depth:
                    raise BadInput(f"input JSON is nested more than {max_depth} levels deep")
                stack.append((child, depth + 1))
    return data


def parse_record(text: str, kind: str | tuple[str, ...] | None = None) -> Record:
    """Decode and validate one record from text."""
    return validate(loads(text), kind)


def read_record(kind: str | tuple[str, ...] | None = None, stream: IO[str] | None = None) -> Record:
    """Read the first record from stdin (or `stream`); empty input is an error."""
    source = stream or sys.stdin
    try:
        for line in source:
            if line.strip():
                return parse_record(line, kind)
    except UnicodeDecodeError:
        raise BadInput("standard input is not UTF-8 text") from None
    raise BadInput("expected a JSON record on standard input, got nothing")


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to a temp file beside `path`, fsync, then rename over it."""
    import tempfile  # noqa: PLC0415 - few commands write: ~2 ms of import spared the rest

    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-json-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
