"""HTTP/1.1 over a unix socket (or a TLS socket to a remote): exactly what
coi_common.incus needs of it.

http.client costs ~12 ms to import here (it brings the email package and ssl with
it), in each of the several coi processes one session runs. This is the part of it
coi uses: one request at a time on a kept-alive connection, a body framed by
Content-Length, chunks or the end of the connection, and `Closed` when the daemon
had closed the connection before answering (the caller may send the request again).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import IO, Final, NamedTuple

MAX_LINE: Final = 64 * 1024
"""Longest status, header or chunk-size line read."""
MAX_HEADERS: Final = 200
MAX_BODY: Final = 1 << 30
"""Largest answer body read (Incus's listings are a few MiB at most)."""
BODY_METHODS: Final = ("POST", "PUT", "PATCH")


class Closed(ConnectionError):
    """The peer closed the connection before the first byte of an answer."""


class ProtocolError(Exception):
    """An answer that is not HTTP/1.x, or broke off halfway."""


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    """Header names lower-cased."""
    body: bytes


Dial = Callable[[float], socket.socket]
"""Opens a connected socket within a timeout: another transport (TLS to a remote Incus,
coi_common.remotes.dialer) instead of the unix socket."""


class Connection:
    """One HTTP/1.1 connection to a unix socket (or what `dial` opens), opened on the
    first request and again after it was closed (`opened` is called each time); `sock`
    is None while closed."""

    def __init__(self, path: str, timeout: float, opened: Callable[[], None],
                 dial: Dial | None = None) -> None:
        self.path, self.timeout, self._opened, self._dial = path, timeout, opened, dial
        self.sock: socket.socket | None = None
        self._file: IO[bytes] | None = None

    def use_timeout(self, seconds: float) -> None:
        """This exchange's socket timeout, on an open socket too."""
        self.timeout = seconds
        if self.sock is not None:
            self.sock.settimeout(seconds)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self._file = None

    def exchange(self, method: str, target: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None) -> Answer:
        """Send one request and read its whole answer."""
        if self.sock is None:
            self._connect()
        assert self.sock is not None
        lines = [f"{method} {target} HTTP/1.1", "Host: incus", "Accept-Encoding: identity",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        if body is not None or method in BODY_METHODS:
            lines.append(f"Content-Length: {len(body or b'')}")
        self.sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b""))
        return self._answer(method)

    def _connect(self) -> None:
        if self._dial is not None:
            sock = self._dial(self.timeout)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
            except BaseException:
                sock.close()
                raise
        self.sock, self._file = sock, sock.makefile("rb")
        self._opened()

    def _answer(self, method: str) -> Answer:
        first = self._line()
        if not first:
            raise Closed("the connection was closed before an answer")
        version, _, rest = first.decode("latin-1").rstrip("\r\n").partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ProtocolError(f"not an HTTP answer: {first[:40]!r}")
        status, headers = int(code), self._headers()
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._chunked()
        elif "content-length" in headers:
            body = self._exactly(_size(headers["content-length"], 10))
        else:  # framed by the end of the connection
            body = self._read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise ProtocolError(f"an answer of more than {MAX_BODY} bytes")
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Answer(status, headers, body)

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS):
            line = self._line()
            if line in (b"\r\n", b"\n"):
                return headers
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise ProtocolError(f"a broken header line: {line[:40]!r}")
            headers[name.strip().lower()] = value.strip()
        raise ProtocolError(f"more than {MAX_HEADERS} headers")

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size = _size(self._line().split(b";", 1)[0].decode("latin-1"), 16)
            if size == 0:
                self._headers()  # trailers, if any, up to the blank line
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise ProtocolError(f"an answer of more than {MAX_BODY} bytes")
            parts.append(self._exactly(size))
            if self._line() not in (b"\r\n", b"\n"):
                raise ProtocolError("a chunk without its line end")

    def _line(self) -> bytes:
        assert self._file is not None
        line = self._file.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise ProtocolError(f"a line of more than {MAX_LINE} bytes")
        return line

    def _exactly(self, size: int) -> bytes:
        data = self._read(size)
        if len(data) < size:
            raise ProtocolError("the answer broke off in its body")
        return data

    def _read(self, size: int) -> bytes:
        assert self._file is not None
        return self._file.read(size)


def _size(text: str, base: int) -> int:
    try:
        value = int(text.strip(), base)
    except ValueError:
        raise ProtocolError(f"not a size: {text[:20]!r}") from None
    if value < 0 or value > MAX_BODY:
        raise ProtocolError(f"a size out of bounds: {value}")
    return value
