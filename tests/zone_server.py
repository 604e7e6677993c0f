"""A DNS server of the unit tests' own, on 127.0.0.1 (a test host of their own): the
zone, and the `dns_server` fixture (a plugin of tests/conftest.py)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from coi_net import policy as np

ZONE = {
    "a.coi.test": [("A", 300, "198.51.100.10")],
    "mixed.coi.test": [("A", 300, "198.51.100.11"), ("A", 300, "10.0.0.5"),
                       ("A", 300, "169.254.169.254")],
    "cname.coi.test": [("CNAME", 60, "a.coi.test."), ("A", 300, "198.51.100.10")],
    "noa.coi.test": [],
}
SILENT = "slow.coi.test"


@dataclass
class ZoneServer:
    """Where the server listens, and every name it was asked, in order."""

    resolver: np.Resolver
    asked: list[str] = field(default_factory=list)


@pytest.fixture
def dns_server() -> Iterator[ZoneServer]:
    """A UDP DNS server on 127.0.0.1 answering ZONE; SILENT never gets an answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stopping = threading.Event()
    server = ZoneServer(np.Resolver("127.0.0.1", sock.getsockname()[1]))

    def serve() -> None:
        while not stopping.is_set():
            try:
                wire, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            name = str(query.question[0].name).rstrip(".")
            server.asked.append(name)
            if name == SILENT:
                continue
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            if name not in ZONE:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            owner = query.question[0].name
            for rtype, ttl, value in ZONE.get(name, []):
                reply.answer.append(dns.rrset.from_text(owner, ttl, "IN", rtype, value))
                if rtype == "CNAME":
                    owner = dns.name.from_text(value)
            sock.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server
    stopping.set()
    thread.join(timeout=5)
    sock.close()
