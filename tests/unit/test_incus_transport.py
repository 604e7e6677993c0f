"""coi_common.incus's REST transport against a small HTTP/1.1 server on a unix socket:
one kept-alive connection per client (and thread, and process), one reconnect when
Incus had closed an idle connection and only then, per-exchange timeouts, failures as
typed errors, and the name filter of instance listings.

The server answers every path with a sync reply naming the path; it can be told to
close each connection after its first answer (Incus ending an idle connection), to
close without answering (a daemon that is going away), or to answer one path late.
"""

from __future__ import annotations

import json
import os
import re
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from coi_common.errors import IncusError, IncusUnavailable
from coi_common.incus import START_HINT, Incus

ROOT = Path(__file__).resolve().parents[2]
SLOW_PATH = "/1.0/slow"
SLOW_SECONDS = 1.0


@dataclass
class Behaviour:
    """What the fake daemon does, and what it saw."""

    close_after_answer: bool = False
    close_without_answer: bool = False
    instances: dict[str, str] = field(default_factory=dict)
    """name: status of the instances listed."""
    unreadable_state: set[str] = field(default_factory=set)
    connections: int = 0
    queries: list[dict[str, list[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Incus speaks it
    behaviour: Behaviour

    def setup(self) -> None:
        super().setup()
        with self.behaviour.lock:
            self.behaviour.connections += 1

    def log_message(self, *_args) -> None:
        """Quiet: the test output is the client's."""

    def do_GET(self) -> None:
        if self.behaviour.close_without_answer:
            self.close_connection = True
            return
        url = urlsplit(self.path)
        self.behaviour.queries.append(parse_qs(url.query))
        if url.path == SLOW_PATH:
            time.sleep(SLOW_SECONDS)
        reply = {"type": "sync", "metadata": {"path": url.path}}
        if url.path == "/1.0/instances":
            reply["metadata"] = [{"name": n, "status": s}
                                 for n, s in self.behaviour.instances.items()]
        elif url.path in {f"/1.0/instances/{n}/state" for n in self.behaviour.unreadable_state}:
            reply = {"type": "error", "error_code": 500, "error": "Invalid PID"}
        elif url.path.startswith("/1.0/instances/") and url.path.count("/") == 3:
            name = url.path.rsplit("/", 1)[1]
            reply = {"type": "sync", "metadata": {"name": name}} \
                if name in self.behaviour.instances else \
                {"type": "error", "error_code": 404, "error": "Instance not found"}
        self._reply(reply)

    def do_DELETE(self) -> None:
        """As Incus 6.0 answers a delete racing another delete of the same instance."""
        self._reply({"type": "error", "error_code": 400, "error": "Failed to create instance "
                     "delete operation: A matching non-reusable operation has now succeeded"})

    def _reply(self, reply: dict) -> None:
        body = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        # Closed without a "Connection: close": the client learns it on its next request.
        self.close_connection = self.behaviour.close_after_answer


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@dataclass
class FakeIncus:
    socket: str
    behaviour: Behaviour


@pytest.fixture
def fake_incus(open_tmp: Path) -> Iterator[FakeIncus]:
    behaviour = Behaviour()
    handler = type("Handler", (_Handler,), {"behaviour": behaviour})
    path = str(open_tmp / "incus.sock")
    server = _Server(path, handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield FakeIncus(path, behaviour)
    server.shutdown()
    server.server_close()


def test_many_requests_of_one_client_share_one_connection(fake_incus):
    client = Incus(socket=fake_incus.socket)
    answers = [client.request("GET", f"/1.0/item{n}") for n in range(10)]
    assert answers == [{"path": f"/1.0/item{n}"} for n in range(10)]
    assert client.connections_opened == 1
    assert fake_incus.behaviour.connections == 1


def test_a_connection_incus_closed_while_idle_is_opened_again_once(fake_incus):
    fake_incus.behaviour.close_after_answer = True
    client = Incus(socket=fake_incus.socket)
    assert client.request("GET", "/1.0/first") == {"path": "/1.0/first"}
    time.sleep(0.1)  # the server has closed its end by now
    assert client.request("GET", "/1.0/second") == {"path": "/1.0/second"}
    assert client.connections_opened == 2
    assert fake_incus.behaviour.connections == 2


def test_a_reused_connection_is_resent_once_and_then_the_failure_is_reported(fake_incus):
    client = Incus(socket=fake_incus.socket)
    client.request("GET", "/1.0/first")
    fake_incus.behaviour.close_without_answer = True
    with pytest.raises(IncusUnavailable) as raised:
        client.request("GET", "/1.0/second")
    assert raised.value.message.startswith(f"cannot talk to Incus on {fake_incus.socket}")
    assert client.connections_opened == 2
    assert fake_incus.behaviour.connections == 2


def test_a_new_connection_closed_without_an_answer_is_not_tried_again(fake_incus):
    fake_incus.behaviour.close_without_answer = True
    client = Incus(socket=fake_incus.socket)
    with pytest.raises(IncusUnavailable):
        client.request("GET", "/1.0")
    assert fake_incus.behaviour.connections == 1


def test_a_refused_new_connection_is_incus_unavailable_with_the_start_hint(stale_socket):
    client = Incus(socket=str(stale_socket))
    with pytest.raises(IncusUnavailable) as raised:
        client.request("GET", "/1.0")
    assert raised.value.message == f"Incus is not answering on {stale_socket}"
    assert raised.value.hint == START_HINT
    assert client.connections_opened == 0


def test_the_timeout_of_one_exchange_applies_on_a_reused_connection(fake_incus):
    client = Incus(socket=fake_incus.socket)
    client.request("GET", "/1.0")
    started = time.monotonic()
    with pytest.raises(IncusUnavailable) as raised:
        client.request("GET", SLOW_PATH, timeout=0.2)
    assert time.monotonic() - started < SLOW_SECONDS
    assert raised.value.message == "Incus did not answer within 0.2 s"
    # The timed-out connection is dropped; the next exchange opens another and succeeds.
    assert client.request("GET", "/1.0/after") == {"path": "/1.0/after"}
    assert client.connections_opened == 2


def test_threads_sharing_a_client_each_get_their_own_connection(fake_incus):
    client = Incus(socket=fake_incus.socket)
    start = threading.Barrier(4)
    answers: dict[int, list] = {}

    def work(number: int) -> None:
        start.wait()
        answers[number] = [client.request("GET", f"/1.0/t{number}/{n}") for n in range(20)]

    workers = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert answers == {t: [{"path": f"/1.0/t{t}/{n}"} for n in range(20)] for t in range(4)}
    assert client.connections_opened == 4


def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents_alone(fake_incus):
    client = Incus(socket=fake_incus.socket)
    client.request("GET", "/1.0/parent")
    child = os.fork()
    if child == 0:  # pragma: no cover - reports through its exit status, whatever happens
        ok = False
        try:
            ok = (client.request("GET", "/1.0/child") == {"path": "/1.0/child"}
                  and client.connections_opened == 2)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.request("GET", "/1.0/parent-again") == {"path": "/1.0/parent-again"}
    assert client.connections_opened == 1
    assert fake_incus.behaviour.connections == 2


def test_listing_asks_for_names_matching_the_prefix_and_keeps_only_exact_ones(fake_incus):
    fake_incus.behaviour.instances = {"coi-test-ab-1": "Running", "COI-TEST-AB-2": "Running",
                                      "other-1": "Running"}
    client = Incus(socket=fake_incus.socket)
    # This server ignores the filter, as a case-insensitive one would let COI-TEST-AB-2 by.
    assert client.instances("coi-test-ab-", with_state=False) == [
        {"name": "coi-test-ab-1", "status": "Running"}]
    (query,) = fake_incus.behaviour.queries
    assert query == {"project": ["default"], "recursion": ["1"],
                     "filter": [r"name eq ^coi\-test\-ab\-"]}


def test_listing_with_state_reads_the_state_of_each_instance_not_stopped(fake_incus):
    fake_incus.behaviour.instances = {"coi-a-1": "Running", "coi-a-2": "Stopped",
                                      "coi-a-3": "Frozen", "coi-a-4": "Running"}
    fake_incus.behaviour.unreadable_state = {"coi-a-4"}
    client = Incus(socket=fake_incus.socket)
    assert client.instances("coi-a-", with_state=True) == [
        {"name": "coi-a-1", "status": "Running",
         "state": {"path": "/1.0/instances/coi-a-1/state"}},
        {"name": "coi-a-2", "status": "Stopped"},
        {"name": "coi-a-3", "status": "Frozen",
         "state": {"path": "/1.0/instances/coi-a-3/state"}},
        {"name": "coi-a-4", "status": "Running"},
    ]
    assert fake_incus.behaviour.queries[0]["recursion"] == ["1"]
    assert client.connections_opened == 1


def test_listing_everything_or_an_unusual_prefix_sends_no_filter(fake_incus):
    fake_incus.behaviour.instances = {"a.b-1": "Stopped", "c-1": "Stopped"}
    client = Incus(socket=fake_incus.socket)
    assert [i["name"] for i in client.instances()] == ["a.b-1", "c-1"]
    assert [i["name"] for i in client.instances("a.b-")] == ["a.b-1"]
    assert all("filter" not in query for query in fake_incus.behaviour.queries)


def test_each_exchange_is_traced_and_a_reconnect_is_a_retry_line(fake_incus, tmp_path):
    fake_incus.behaviour.close_after_answer = True
    code = ("import sys, time\nfrom coi_common.incus import Incus\n"
            "client = Incus(socket=sys.argv[1])\nclient.request('GET', '/1.0/first')\n"
            "time.sleep(0.1)\nclient.request('GET', '/1.0/second')\n")
    done = subprocess.run([sys.executable, "-c", code, fake_incus.socket], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "lib"), "COI_TRACE": "1"},
                          capture_output=True, text=True, check=True, timeout=60)
    lines = [re.sub(r"^coi-trace: \d+ | \d+\.\d ms", "", line)
             for line in done.stderr.splitlines()]
    assert lines == [
        "GET /1.0/first?project=default 200",
        "retry GET /1.0/second?project=default Incus had closed the kept-alive connection",
        "GET /1.0/second?project=default 200",
    ]


def test_a_delete_that_raced_another_delete_of_the_same_instance_counts_as_done(fake_incus):
    client = Incus(socket=fake_incus.socket)
    client.delete_instance("coi-gone-1")  # Incus: the other delete "has now succeeded"
    fake_incus.behaviour.instances["coi-kept-1"] = "Running"
    with pytest.raises(IncusError):  # still there: that refusal is not a success
        client.delete_instance("coi-kept-1")
