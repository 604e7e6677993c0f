"""coi_net.resolver's decisions, against coi-net's real state store and a DNS server of
the tests' own on 127.0.0.1 (zone_server). What reaches nftables is the list of
commands it would commit; tests/integration/test_network_isolation.py runs the
resolver for real (nft, a container, its queries)."""

from __future__ import annotations

import ipaddress
import socket
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from coi_net import policy as np
from coi_net import resolver

BRIDGE = np.Bridge("coibr0", ipaddress.IPv4Interface("10.151.43.1/24"))
TABLE = "coi_test_unit"
NAME = "coi-3f2a9c1b-1"
IFNAME = np.host_name_for(NAME)
SOURCE = "10.151.43.50"


class World:
    """A store with one allowlist container at SOURCE, the commits, the clock."""

    def __init__(self, tmp_path, upstream: np.Resolver, **state) -> None:
        self.store = np.Store(str(tmp_path / "net"))
        self.asked_incus: list[str] = []
        self.commits: list[list[dict]] = []
        self.now = 1000.0
        self.store.save(NAME, {
            "container": NAME, "project": "default", "ifname": IFNAME, "mode": "allowlist",
            "bridge": BRIDGE.to_json(), "allowed_names": ["a.coi.test"],
            "allowed_addresses": [], "allowed_wildcards": ["*.wild.coi.test"],
            "resolvers": [str(upstream)], "dns_timeout": 0.5, "names": {},
            "applied_at": 1.0, **state})
        self.directory = resolver.Directory(self.store, self._addresses, clock=lambda: self.now)
        self.answerer = resolver.Answerer(TABLE, self.directory, (), self.commits.append,
                                          clock=lambda: self.now)

    def _addresses(self, container: str, ifname: str) -> set[str]:
        self.asked_incus.append(container)
        return {SOURCE} if ifname == IFNAME else set()

    def ask(self, name: str, kind: str = "A", source: str = SOURCE) -> dns.message.Message:
        return self.answerer.respond(dns.message.make_query(name, kind), source)


def _addresses(message: dns.message.Message) -> list[str]:
    return sorted(str(r.address) for rrset in message.answer
                  if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for r in rrset)


def _allowed(commits: list[list[dict]]) -> dict[str, int]:
    return {e["elem"]["val"]: e["elem"]["timeout"] for commands in commits
            for c in commands if "add" in c
            for e in c["add"]["element"]["elem"] if isinstance(e, dict)}


@pytest.fixture
def world(tmp_path, dns_server) -> World:
    return World(tmp_path, dns_server.resolver)


def test_a_name_outside_the_policy_is_nxdomain_and_never_asked_upstream(world, dns_server):
    for name in ("evil.test", "wild.coi.test", "x.a.coi.test", "tunnel-data.evil.test"):
        reply = world.ask(name)
        assert reply.rcode() == dns.rcode.NXDOMAIN, name
        assert reply.answer == []
    assert dns_server.asked == []
    assert world.commits == []


def test_an_allowed_name_s_public_addresses_are_allowed_for_its_ttl_before_it_is_answered(
        world, dns_server):
    world.store.save(NAME, {**world.store.load(NAME), "allowed_names": ["mixed.coi.test"]})
    reply = world.ask("mixed.coi.test")
    assert reply.rcode() == dns.rcode.NOERROR
    assert _addresses(reply) == ["198.51.100.11"]  # the private ones are taken out
    assert _allowed(world.commits) == {"198.51.100.11": 300 + resolver.GRACE_SECONDS}
    assert world.commits[0][-1]["add"]["element"]["name"] == np.answered_set(IFNAME)
    assert dns_server.asked == ["mixed.coi.test"]


def test_a_wildcard_answers_any_depth_with_the_lowest_ttl_of_its_chain(tmp_path, dns_server):
    world = World(tmp_path, dns_server.resolver, allowed_wildcards=["*.coi.test"])
    reply = world.ask("cname.coi.test")
    assert _addresses(reply) == ["198.51.100.10"]
    assert _allowed(world.commits) == {"198.51.100.10": 60 + resolver.GRACE_SECONDS}
    assert world.ask("gone.coi.test").rcode() == dns.rcode.NXDOMAIN  # upstream's own answer
    assert dns_server.asked == ["cname.coi.test", "gone.coi.test"]


def test_a_later_shorter_answer_never_shortens_an_address_s_time(world):
    world.ask("a.coi.test")
    world.now += 200
    world.ask("a.coi.test")
    times = [c[-1]["add"]["element"]["elem"][0]["elem"]["timeout"] for c in world.commits]
    assert times == [360, 360]  # 300 + grace again: the first one's end is not earlier


def test_a_query_from_an_unknown_address_is_refused_and_incus_is_asked_at_most_so_often(
        world, dns_server):
    assert world.ask("a.coi.test", source="10.151.43.99").rcode() == dns.rcode.REFUSED
    asked = len(world.asked_incus)
    world.ask("a.coi.test", source="10.151.43.98")
    assert len(world.asked_incus) == asked  # within MISS_SECONDS: no second round
    world.now += resolver.MISS_SECONDS
    world.ask("a.coi.test", source="10.151.43.98")
    assert len(world.asked_incus) == asked + 1
    assert dns_server.asked == []


def test_a_container_re_applied_as_another_mode_is_no_longer_answered(world):
    assert world.ask("a.coi.test").rcode() == dns.rcode.NOERROR
    world.store.save(NAME, {**world.store.load(NAME), "mode": "restricted", "applied_at": 2.0})
    world.now += resolver.RELOAD_SECONDS
    assert world.ask("a.coi.test").rcode() == dns.rcode.REFUSED


def test_when_upstream_is_silent_the_cached_resolution_of_a_listed_name_answers(tmp_path,
                                                                              dns_server):
    world = World(tmp_path, dns_server.resolver, allowed_names=["slow.coi.test"],
                  names={"slow.coi.test": {"addresses": ["198.51.100.30", "2606:4700::30"]}})
    reply = world.ask("slow.coi.test")
    assert reply.rcode() == dns.rcode.NOERROR
    assert _addresses(reply) == ["198.51.100.30"]
    assert reply.answer[0].ttl == resolver.CACHED_TTL
    assert _addresses(world.ask("slow.coi.test", "AAAA")) == ["2606:4700::30"]
    assert world.ask("slow.coi.test", "TXT").rcode() == dns.rcode.SERVFAIL
    assert world.commits == []  # the cache is in the static sets already


def test_a_failed_commit_is_servfail_not_an_answer_the_rules_would_not_let_through(world):
    def refuse(_commands):
        raise np.BadInput("nft said no")

    world.answerer.commit = refuse
    reply = world.ask("a.coi.test")
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.answer == []


def test_more_than_one_question_or_another_opcode_is_a_format_error(world):
    query = dns.message.make_query("a.coi.test", "A")
    query.question.append(dns.rrset.RRset(dns.name.from_text("b.coi.test"), 1, 1))
    assert world.answerer.respond(query, SOURCE).rcode() == dns.rcode.FORMERR


def test_an_answer_too_big_for_udp_is_cut_so_the_client_asks_over_tcp():
    def big() -> dns.message.Message:
        response = dns.message.make_response(dns.message.make_query("big.coi.test", "A"))
        response.answer = [dns.rrset.from_text_list(
            "big.coi.test.", 60, "IN", "A", [f"198.51.100.{i}" for i in range(1, 60)])]
        return response

    wire = resolver.to_wire(big(), 512)
    cut = dns.message.from_wire(wire)
    assert len(wire) <= 512
    assert cut.flags & dns.flags.TC
    assert cut.answer == []
    assert len(dns.message.from_wire(resolver.to_wire(big(), 65535)).answer[0]) == 59


def test_a_hostile_state_is_not_a_client():
    with pytest.raises(np.BadInput):
        resolver.Client.from_state({"container": NAME, "ifname": "eth0; drop",
                                    "bridge": BRIDGE.to_json()})
    with pytest.raises(np.BadInput):
        resolver.Client.from_state({"container": NAME, "ifname": IFNAME,
                                    "allowed_wildcards": ["*"], "bridge": BRIDGE.to_json()})


def test_the_sockets_answer_over_udp_and_tcp_and_drop_what_is_not_dns(tmp_path, dns_server):
    world = World(tmp_path, dns_server.resolver)
    world.directory.addresses_of = lambda _c, _i: {"127.0.0.1"}
    servers = resolver.listen(world.answerer, "127.0.0.1", 0)
    try:
        port = servers[0].server_address[1]
        query = dns.message.make_query("a.coi.test", "A")
        assert _addresses(dns.query.udp(query, "127.0.0.1", port=port, timeout=2)) == \
            ["198.51.100.10"]
        assert _addresses(dns.query.tcp(query, "127.0.0.1", port=port, timeout=2)) == \
            ["198.51.100.10"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            sock.sendto(b"\x00not dns", ("127.0.0.1", port))
            with pytest.raises(TimeoutError):
                sock.recv(512)
        denied = dns.query.udp(dns.message.make_query("evil.test", "A"), "127.0.0.1",
                               port=port, timeout=2)
        assert denied.rcode() == dns.rcode.NXDOMAIN
        assert dns_server.asked == ["a.coi.test", "a.coi.test"]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_apply_s_probe_tells_a_listening_resolver_from_a_closed_port_at_once(tmp_path,
                                                                           dns_server):
    world = World(tmp_path, dns_server.resolver)
    servers = resolver.listen(world.answerer, "127.0.0.1", 0)
    port = servers[0].server_address[1]
    local = np.Bridge("lo", ipaddress.IPv4Interface("127.0.0.1/8"))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(np, "dns_port", lambda _table: port)
            assert resolver.answering(local, TABLE)  # it refuses the host: an answer
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(np, "dns_port", lambda _table: port)
        assert not resolver.answering(local, TABLE, timeout=5)
    assert time.monotonic() - started < 1
