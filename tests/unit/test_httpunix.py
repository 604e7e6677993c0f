"""coi_common.httpunix, the HTTP/1.1 framing of the Incus transport, against a unix
socket server that answers each request with canned bytes: bodies by length, in chunks
or up to the close; HEAD without a body; a request on a kept-alive connection; and every
answer that breaks off or is not HTTP refused as ProtocolError (Closed before any byte)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coi_common import httpunix

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


class Canned:
    """A server that answers the requests of one connection with `answers`, one each,
    then closes (without answers: having read the request's first line); `requests`
    holds what it received."""

    def __init__(self, path: Path, answers: list[bytes]) -> None:
        self.answers, self.requests = answers, []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        peer, _ = self.server.accept()
        with peer, peer.makefile("rb") as incoming:
            for answer in self.answers:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = incoming.readline()
                    if not line:
                        return
                    head += line
                length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                               if h.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + incoming.read(length))
                peer.sendall(answer)
            if not self.answers:
                incoming.readline()  # the request's first line, unanswered: then close


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    made: list[Canned] = []

    def factory(*answers: bytes) -> httpunix.Connection:
        path = tmp_path / f"s{len(made)}"
        made.append(Canned(path, list(answers)))
        conn = httpunix.Connection(str(path), 5.0, lambda: None)
        conn.server = made[-1]  # type: ignore[attr-defined] - what it received, for tests
        return conn

    yield factory
    for server in made:
        server.server.close()


def test_a_body_framed_by_its_length_and_a_second_request_on_the_same_connection(serve):
    conn = serve(OK_HEAD + b"Content-Length: 2\r\n\r\n{}",
                 OK_HEAD + b"Content-Length: 4\r\n\r\nnull")
    first = conn.exchange("GET", "/1.0")
    sock = conn.sock
    second = conn.exchange("PUT", "/1.0/x?project=default", b'{"a": 1}',
                           {"Content-Type": "application/json"})
    assert (first.status, first.body, first.headers["content-type"]) == \
        (200, b"{}", "application/json")
    assert second.body == b"null"
    assert conn.sock is sock  # kept alive
    assert len(conn.server.requests) == 2


def test_the_request_carries_its_body_with_its_length_and_a_bodiless_post_length_0(serve):
    conn = serve(OK_HEAD + b"Content-Length: 0\r\n\r\n", OK_HEAD + b"Content-Length: 0\r\n\r\n")
    conn.exchange("POST", "/1.0/instances?project=default", b'{"name": "x"}',
                  {"Content-Type": "application/json"})
    conn.exchange("POST", "/1.0/instances/x/state")
    first, second = conn.server.requests
    assert first.startswith(b"POST /1.0/instances?project=default HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 13\r\n" in first
    assert b"\r\nContent-Type: application/json\r\n" in first
    assert first.endswith(b'\r\n\r\n{"name": "x"}')
    assert b"\r\nContent-Length: 0\r\n" in second


def test_a_chunked_body_is_joined_and_its_trailers_read(serve):
    conn = serve(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                 b"4\r\n{\"a\"\r\n5;ext=1\r\n: 12}\r\n0\r\nX-Trailer: y\r\n\r\n",
                 OK_HEAD + b"Content-Length: 1\r\n\r\n1")
    assert conn.exchange("GET", "/1.0").body == b'{"a": 12}'
    assert conn.exchange("GET", "/1.0").body == b"1"  # the stream stayed in step


def test_a_body_framed_by_the_close_closes_the_connection(serve):
    conn = serve(OK_HEAD + b"\r\n{\"whole\": true}")
    answer = conn.exchange("GET", "/1.0")
    assert answer.body == b'{"whole": true}'
    assert conn.sock is None


def test_a_head_answer_has_no_body_even_with_a_length(serve):
    conn = serve(b"HTTP/1.1 200 OK\r\nX-Incus-Type: file\r\nContent-Length: 9\r\n\r\n",
                 OK_HEAD + b"Content-Length: 2\r\n\r\nok")
    answer = conn.exchange("HEAD", "/1.0/instances/x/files?path=/etc")
    assert (answer.body, answer.headers["x-incus-type"]) == (b"", "file")
    assert conn.exchange("GET", "/1.0").body == b"ok"


def test_connection_close_from_the_server_closes_ours(serve):
    conn = serve(OK_HEAD + b"Connection: close\r\nContent-Length: 2\r\n\r\n{}")
    assert conn.exchange("GET", "/1.0").body == b"{}"
    assert conn.sock is None


def test_a_close_before_any_byte_is_closed_so_the_caller_may_send_again(serve):
    conn = serve()  # answers nothing: closes at once
    with pytest.raises(httpunix.Closed):
        conn.exchange("GET", "/1.0")


@pytest.mark.parametrize("answer", [
    b"SSH-2.0-OpenSSH\r\n\r\n",                                    # not HTTP
    OK_HEAD + b"Content-Length: 10\r\n\r\nshort",                   # body broke off
    OK_HEAD + b"Content-Length: -1\r\n\r\n",                        # negative length
    OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",          # chunk size not hex
    OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX",       # chunk without CRLF
    OK_HEAD + b"no colon here\r\n\r\n",                             # broken header
    OK_HEAD + b"X: " + b"y" * (httpunix.MAX_LINE + 1) + b"\r\n\r\n",  # endless line
    OK_HEAD + b"".join(b"X%d: y\r\n" % n for n in range(httpunix.MAX_HEADERS + 1)) + b"\r\n",
    OK_HEAD + b"Content-Length: %d\r\n\r\n" % (httpunix.MAX_BODY + 1),  # too large
])
def test_an_answer_that_is_not_http_or_broke_off_is_a_protocol_error(serve, answer):
    conn = serve(answer)
    with pytest.raises(httpunix.ProtocolError):
        conn.exchange("GET", "/1.0")
