"""`coi-net dns`: coi's allowlist resolver, the only DNS an allowlist container has.

Why: the bridge's dnsmasq forwards any name upstream, so a container allowed
only github.com could still send data out as queries (a DNS tunnel), and the
ever-changing names under a CDN could not be allowed at all. So:

* An allowlist container's queries to the bridge (udp and tcp 53) carry its
  table's DNS mark (policy.container_rules); the inet chain c_dns redirects
  them here, to the bridge's address and port policy.dns_port(table).
* The querying container is found by its source address (the addresses of its
  NIC as Incus reports them), its policy in coi-net's state. A query from
  anything else is REFUSED.
* A name its policy allows (exact, or under a `*.` wildcard) is asked of the
  policy's resolvers (else the host's) as a fresh query holding only the
  question. Every other name is NXDOMAIN and nothing leaves the host.
* Blocked addresses (private, link-local, the bridge's: rebinding) are taken
  out of the answer; the rest go into the container's answer sets (d_, d6_)
  for the answer's TTL plus GRACE_SECONDS, in one nft transaction, before the
  answer is sent: the container can connect as soon as it has the answer.
* When no upstream answers, an exact name's addresses as apply and refresh
  last resolved them (the state's cache, already in the static sets) answer.

Attributing a query by source address cannot widen any policy, even if a
container spoofs another's address: each query is judged by the policy of
the container it is attributed to, and its answer feeds only that
container's sets, with names that container may have anyway.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset

from coi_common.errors import BadInput, CoiError
from coi_common.naming import validate_container_name
from coi_net import nft
from coi_net import policy as np

if TYPE_CHECKING:
    from coi_net.ops import Context

GRACE_SECONDS: Final = 60
"""How long an answered address stays allowed after its TTL (a connection opened at
the TTL's end keeps going a while; the bridge has no connection tracking)."""
LONGEST_SECONDS: Final = 86400
CACHED_TTL: Final = 30
"""The TTL of an answer taken from the state's cache (upstream did not answer)."""
UDP_PLAIN: Final = 512
QUERY_MOST: Final = 4096
"""The longest query taken over UDP; longer datagrams are dropped unread."""
TCP_IDLE_SECONDS: Final = 5.0
TCP_QUERIES: Final = 100
"""Queries answered on one TCP connection before it is closed."""
IN_FLIGHT: Final = 64
"""Queries handled at once; beyond that a query is dropped (the client asks again)."""
RELOAD_SECONDS: Final = 2.0
"""How old the directory of containers may get before a query reloads it."""
PARENT_CHECK_SECONDS: Final = 1.0
MISS_SECONDS: Final = 0.5
"""The least time between two lookups of every container's addresses in Incus."""


@dataclass(frozen=True)
class Client:
    """One allowlist container as the resolver needs it, from coi-net's state."""

    container: str
    ifname: str
    names: frozenset[str]
    wildcards: tuple[str, ...]
    resolvers: tuple[np.Resolver, ...]
    timeout: float
    bridge: np.Bridge
    cached: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Client:
        """Every field validated: the state is root's, but read as input all the same."""
        names = {np.validate_domain(n) for n in state.get("allowed_names") or []}
        entries = (state.get("names") or {})
        cached = {name: tuple(str(a) for a in (entries.get(name) or {}).get("addresses") or []
                              if _is_address(a))
                  for name in names}
        return cls(validate_container_name(state.get("container")),
                   np.validate_ifname(state.get("ifname")), frozenset(names),
                   tuple(np.validate_wildcard(w) for w in state.get("allowed_wildcards") or []),
                   np.parse_resolvers(state.get("resolvers") or []),
                   np.validate_timeout(state.get("dns_timeout") or np.DEFAULT_DNS_TIMEOUT),
                   np.Bridge.from_json(state.get("bridge") or {}), cached)


def _is_address(text: object) -> bool:
    try:
        np.address_key(str(text))
    except ValueError:
        return False
    return True


AddressesOf = Callable[[str, str], set[str]]
"""(container, ifname) -> the addresses of that container's NIC (empty: unknown)."""


class Directory:
    """Which allowlist container an address is: states from coi-net's store (reloaded
    when RELOAD_SECONDS old), addresses from Incus (asked for a container new or
    re-applied, and for all of them when an unknown address asks, at most every
    MISS_SECONDS)."""

    def __init__(self, store: np.Store, addresses_of: AddressesOf,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.addresses_of = addresses_of
        self.clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[Any, Client]] = {}
        self._addresses: dict[str, set[str]] = {}
        self._loaded = -RELOAD_SECONDS
        self._missed = -MISS_SECONDS

    def client(self, address: str) -> Client | None:
        with self._lock:
            if self.clock() - self._loaded >= RELOAD_SECONDS:
                self._reload()
            found = self._find(address)
            if found is None and self.clock() - self._missed >= MISS_SECONDS:
                self._missed = self.clock()
                self._addresses = {name: self._ask(name) for name in self._clients}
                found = self._find(address)
            return found

    def _find(self, address: str) -> Client | None:
        for name, addresses in self._addresses.items():
            if address in addresses:
                return self._clients[name][1]
        return None

    def _reload(self) -> None:
        """States again; Incus asked only for containers new or applied since."""
        self._loaded = self.clock()
        clients: dict[str, tuple[Any, Client]] = {}
        for name in self.store.containers():
            with contextlib.suppress(CoiError, ValueError, TypeError, AttributeError):
                state = self.store.load(name)
                if state is not None and state.get("mode") == "allowlist":
                    clients[name] = (state.get("applied_at"), Client.from_state(state))
        before, known = self._clients, self._addresses
        self._clients = clients
        self._addresses = {
            name: known[name] if name in known and before[name][0] == applied
            else self._ask(name) for name, (applied, _client) in clients.items()}

    def _ask(self, name: str) -> set[str]:
        try:
            return self.addresses_of(name, self._clients[name][1].ifname)
        except CoiError:
            return set()


def incus_addresses(client: Any) -> AddressesOf:
    """AddressesOf by Incus: the addresses of the NIC whose host side is `ifname`."""
    def addresses_of(container: str, ifname: str) -> set[str]:
        network = client.instance_state(container).get("network") or {}
        return {str(entry.get("address")) for nic in network.values()
                if isinstance(nic, dict) and nic.get("host_name") == ifname
                for entry in nic.get("addresses") or [] if isinstance(entry, dict)}
    return addresses_of


# -- answering ---------------------------------------------------------------------------------


class Answerer:
    """The answer to one query from one address (see the module docstring)."""

    def __init__(self, table: str, directory: Directory, default: Sequence[np.Resolver],
                 commit: Callable[[list[np.Command]], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.directory = directory
        self.default = tuple(default)
        self.commit = commit
        self.clock = clock
        self._until: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def respond(self, query: dns.message.Message, source: str) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        client = self.directory.client(source)
        if client is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        name = question.name.to_text(omit_final_dot=True).lower()
        if not np.name_allowed(name, client.names, client.wildcards):
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        upstream = _ask(question, client.resolvers or self.default, client.timeout)
        if upstream is None:
            return self._from_cache(response, question, client, name)
        answer, ttl = public_answer(upstream.answer, client.bridge)
        lifetime = min(ttl, LONGEST_SECONDS) + GRACE_SECONDS
        try:
            self._allow(client, _addresses(answer), lifetime)
        except CoiError as exc:
            print(f"coi-net dns: {client.container}: {exc.one_line()}", file=sys.stderr,
                  flush=True)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        response.set_rcode(upstream.rcode())
        response.answer = answer
        response.authority = upstream.authority
        return response

    def _from_cache(self, response: dns.message.Message, question: dns.rrset.RRset,
                    client: Client, name: str) -> dns.message.Message:
        version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
        kept = [a for a in client.cached.get(name, ())
                if version is not None and _version(a) == version]
        if not kept:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        response.answer = [dns.rrset.from_text_list(question.name, CACHED_TTL, "IN",
                                                    dns.rdatatype.to_text(question.rdtype),
                                                    kept)]
        return response

    def _allow(self, client: Client, addresses: Iterable[str], lifetime: float) -> None:
        """Each address into the container's answer sets, never shortening an earlier
        answer's time: one transaction (none when there is nothing to add), committed
        under the lock, since a process has one libnftables context."""
        now = self.clock()
        with self._lock:
            lifetimes = {}
            for address in addresses:
                key = (client.ifname, address)
                until = max(self._until.get(key, 0.0), now + lifetime)
                self._until[key] = until
                lifetimes[address] = int(until - now)
            if len(self._until) > 10000:
                self._until = {k: v for k, v in self._until.items() if v > now}
            commands = np.answered_commands(self.table, client.ifname, client.bridge,
                                            lifetimes)
            if commands:
                self.commit(commands)


def public_answer(rrsets: Iterable[dns.rrset.RRset],
                  bridge: np.Bridge) -> tuple[list[dns.rrset.RRset], int]:
    """The answer section without blocked addresses (an A or AAAA set left empty goes),
    and its TTL: the lowest along it (a CNAME chain expires with its first link)."""
    kept: list[dns.rrset.RRset] = []
    ttls = []
    for rrset in rrsets:
        ttls.append(int(rrset.ttl))
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            public = [r for r in rrset if not np.is_blocked(r.address, bridge)]
            if public:
                kept.append(dns.rrset.from_rdata_list(rrset.name, rrset.ttl, public))
        else:
            kept.append(rrset)
    return kept, min(ttls, default=0)


def _addresses(rrsets: Iterable[dns.rrset.RRset]) -> list[str]:
    return [str(r.address) for rrset in rrsets
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for r in rrset]


def _version(address: str) -> int:
    return 6 if ":" in address else 4


def _ask(question: dns.rrset.RRset, servers: Sequence[np.Resolver],
         timeout: float) -> dns.message.Message | None:
    """The first usable answer of `servers` to a fresh query for `question` alone (over
    TCP when the UDP answer was cut); None when none answered."""
    query = dns.message.make_query(question.name, question.rdtype, question.rdclass,
                                   use_edns=0, payload=1232)
    for server in servers:
        try:
            reply = dns.query.udp(query, server.address, port=server.port, timeout=timeout)
            if reply.flags & dns.flags.TC:
                reply = dns.query.tcp(query, server.address, port=server.port, timeout=timeout)
        except (dns.exception.DNSException, OSError, ValueError):
            continue
        if reply.rcode() not in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
            return reply
    return None


def to_wire(response: dns.message.Message, limit: int) -> bytes:
    """The response within `limit` bytes; cut in place (TC set, no records) when it does
    not fit, so the client asks again over TCP."""
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        response.answer, response.authority, response.additional = [], [], []
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=limit)


def _limit(query: dns.message.Message) -> int:
    return max(UDP_PLAIN, min(int(query.payload), 65535)) if query.edns >= 0 else UDP_PLAIN


# -- the sockets -------------------------------------------------------------------------------


class _Gate:
    """At most IN_FLIGHT queries at once."""

    slots = threading.BoundedSemaphore(IN_FLIGHT)


class _Udp(socketserver.BaseRequestHandler):
    server: Any

    def handle(self) -> None:
        data, sock = self.request
        if len(data) > QUERY_MOST or not _Gate.slots.acquire(blocking=False):
            return
        try:
            query = dns.message.from_wire(data)
            response = self.server.answerer.respond(query, self.client_address[0])
            sock.sendto(to_wire(response, _limit(query)), self.client_address)
        except (dns.exception.DNSException, OSError, ValueError):
            return  # not DNS, or the client is gone: nothing to answer
        finally:
            _Gate.slots.release()


class _Tcp(socketserver.BaseRequestHandler):
    server: Any

    def handle(self) -> None:
        connection: socket.socket = self.request
        connection.settimeout(TCP_IDLE_SECONDS)
        with contextlib.suppress(dns.exception.DNSException, OSError, ValueError):
            for _ in range(TCP_QUERIES):
                head = _read(connection, 2)
                if head is None:
                    return
                data = _read(connection, struct.unpack("!H", head)[0])
                if data is None or not _Gate.slots.acquire(blocking=False):
                    return
                try:
                    query = dns.message.from_wire(data)
                    response = self.server.answerer.respond(query, self.client_address[0])
                    wire = to_wire(response, 65535)
                finally:
                    _Gate.slots.release()
                connection.sendall(struct.pack("!H", len(wire)) + wire)


def _read(connection: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def listen(answerer: Answerer, address: str, port: int) -> list[socketserver.BaseServer]:
    """UDP and TCP servers of `answerer` on address:port (0: any free port, the UDP
    one's, for benchmarks), each serving in a thread of its own; shut them down."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    servers: list[socketserver.BaseServer] = []
    try:
        for kind, handler in ((socketserver.UDPServer, _Udp), (socketserver.TCPServer, _Tcp)):
            server_class = type("Server", (socketserver.ThreadingMixIn, kind),
                                {"address_family": family, "daemon_threads": True,
                                 "allow_reuse_address": True})
            server = server_class((address, port), handler)
            server.answerer = answerer  # type: ignore[attr-defined]
            servers.append(server)
            port = server.server_address[1]
    except OSError:
        for server in servers:
            server.server_close()
        raise
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return servers


def serve(ctx: Context, bridge: np.Bridge) -> int:
    """Answer on the bridge's addresses until SIGTERM or Ctrl-C (root: coi's host
    service runs it)."""
    port = np.dns_port(ctx.table)
    addresses = [str(bridge.ipv4.ip), *([str(bridge.ipv6.ip)] if bridge.ipv6 else [])]
    answerer = Answerer(ctx.table, Directory(ctx.store, incus_addresses(ctx.client)),
                        host_resolvers(), lambda commands: nft.run(commands, table=ctx.table))
    servers: list[socketserver.BaseServer] = []
    try:
        for address in addresses:
            servers += listen(answerer, address, port)
    except OSError as exc:
        for server in servers:
            server.shutdown()
            server.server_close()
        raise CoiError(f"the allowlist resolver cannot listen on port {port} of "
                       f"{ctx.bridge_name}: {exc.strerror or exc}") from None
    where = ", ".join(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses)
    print(f"coi-net dns: answering allowlist containers of table {ctx.table} on {where}",
          file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    parent = os.getppid()
    try:
        # Ends with its parent (the host service), even one killed without a word: a
        # resolver left behind would hold the port against the next service's.
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    return 0


def host_resolvers() -> tuple[np.Resolver, ...]:
    """The host's own resolvers (/etc/resolv.conf): where a policy without resolvers
    sends its allowed names."""
    try:
        found = dns.resolver.Resolver().nameservers
    except dns.exception.DNSException:
        return ()
    with contextlib.suppress(BadInput):
        return np.parse_resolvers(str(n) for n in found[:np.MAX_RESOLVERS])
    return ()


def answering(bridge: np.Bridge, table: str, timeout: float = 0.5) -> bool:
    """Whether a resolver answers on the bridge for `table` (it refuses the host itself,
    which is an answer): apply warns when none does. The socket is connected, so a
    closed port says so at once (ICMP) instead of after the timeout."""
    query = dns.message.make_query("coi-probe.invalid", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((str(bridge.ipv4.ip), np.dns_port(table)))
            sock.send(query.to_wire())
            return dns.message.from_wire(sock.recv(UDP_PLAIN)).id == query.id
        except (dns.exception.DNSException, OSError):
            return False
