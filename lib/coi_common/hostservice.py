"""Client of coi's host service: the one privileged part of coi.

Changing nftables rules and delegating id maps need root. Members of
incus-admin are not root, and sudo may not exist, so `coi setup` starts a
small root service (`coi-host serve`, docs/host-service.md) on a unix
socket that only root and the incus-admin group can open. This module
speaks its protocol: one JSON request line per connection
(`host_request`), one JSON reply line (`host_reply` or `error`).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Final

from coi_common import plan, trace
from coi_common.errors import ALL_ERRORS, BadInput, CoiError, IncusUnavailable, PermissionDenied
from coi_common.protocol import Record, make_record, parse_record

SOCKET_VARIABLE: Final = "COI_HOST_SOCKET"
DEFAULT_SOCKET: Final = "/run/coi/host.sock"
MAX_MESSAGE: Final = 1 << 20
"""Longest request or reply line, in bytes; anything longer is refused unread."""
START_HINT: Final = "run 'sudo coi setup' (as root: 'coi setup'); it starts the service"
UPDATE_HINT: Final = ("coi's host service is older than this coi: run 'sudo coi setup' (as "
                      "root: 'coi setup') to replace it")


def socket_path() -> str:
    return os.environ.get(SOCKET_VARIABLE) or DEFAULT_SOCKET


def read_line(sock: socket.socket, limit: int = MAX_MESSAGE) -> bytes:
    """One newline-terminated message, at most `limit` bytes; b'' when the peer closed."""
    chunks, size = [], 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            return b"".join(chunks).split(b"\n", 1)[0]
        if size > limit:
            raise BadInput(f"message longer than {limit} bytes")


READS: Final = ("ping",)
"""The verbs that change nothing: asked in a --dry-run too (coi_common.plan)."""


def call(verb: str, *, timeout: float = 120.0, assumed: Record | None = None,
         **fields: Any) -> Record:
    """Send one request, return the `result` of the reply; an error reply raises
    the error kind it names (PermissionDenied, NotFound, BadInput, ...). In a
    --dry-run a verb that changes something is a step, answered with `assumed`."""
    path = socket_path()
    request = make_record("host_request", verb=verb, **fields)
    if verb not in READS and plan.step("service", verb, request=request):
        return dict(assumed or {})
    try:
        with trace.span("service", verb), \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            raw = read_line(sock)
    except (FileNotFoundError, ConnectionRefusedError):
        raise IncusUnavailable(f"coi's host service is not running (no service on {path})",
                               hint=START_HINT) from None
    except PermissionError:
        raise PermissionDenied(f"no permission to use coi's host service at {path}",
                               hint="join the incus-admin group: sudo usermod -aG incus-admin "
                               "$USER, then log in again") from None
    except TimeoutError:
        raise IncusUnavailable(f"coi's host service did not answer within {timeout:g} s "
                               f"({verb})") from None
    except OSError as exc:
        raise IncusUnavailable(f"cannot talk to coi's host service at {path}: {exc}") from None
    return _result(raw, verb)


def _result(raw: bytes, verb: str) -> Record:
    if not raw:
        raise IncusUnavailable(f"coi's host service closed the connection ({verb})")
    try:
        reply = parse_record(raw.decode("utf-8", "replace"), ("host_reply", "error"))
    except BadInput as exc:
        raise CoiError(f"coi's host service answered something unreadable: {exc}") from None
    if reply["kind"] == "error":
        kinds = {kind.code: kind for kind in ALL_ERRORS}
        message = str(reply["message"])
        # A service started by an older coi: the fix is to let setup replace it.
        hint = UPDATE_HINT if message.startswith(f"unknown verb {verb!r}") else None
        raise kinds.get(str(reply["code"]), CoiError)(message, hint=hint)
    result = reply.get("result")
    if not isinstance(result, dict):
        raise CoiError(f"coi's host service answered {verb} without a result")
    return result
