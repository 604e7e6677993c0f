"""coi-net against real containers, real nftables and a test world of our own.

The world (built once per module, removed at its end whatever happened):
  * netns `coi-test-<tag>-pub`, reached from the host over a veth
    (host side 198.51.100.1/24): "public" HTTP hosts 198.51.100.10 and .20
    and a DNS server (dnsmasq) on 198.51.100.53 that maps test names;
  * netns `coi-test-<tag>-lan` (host side 10.77.0.1/24): a private-range HTTP
    host 10.77.0.2 and a cloud-metadata stand-in 169.254.169.254;
  * HTTP servers on the host itself: on the bridge address and on
    198.51.100.1 (a host address that only the `fib daddr type local` rule
    catches);
  * containers of the test image on coibr0.
No packet goes anywhere else: containers only probe the addresses above, and
DNS inside containers asks only for `.incus` names the bridge's own dnsmasq
answers locally. Every test uses its own nft tables (`coi_test_<hex>` via
COI_NFT_TABLE) and state dir, removed at its end.

A probe is `curl` from inside a container: exit 0 (an HTTP answer) or 7
(connection refused: the packet arrived) means reached, 28 (timeout) means
the packet was dropped.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest

from coi_common import executables, naming, proc
from coi_common.errors import CoiError
from coi_common.protocol import parse_record
from coi_common.sessions import SlotRecord
from coi_net import nft
from coi_net import policy as np

pytestmark = pytest.mark.incus

ROOT = Path(__file__).resolve().parents[2]
COI_NET = str(ROOT / "bin" / "coi-net")
SYSTEM_PYTHON = "/usr/bin/python3"
PORT = 8080
PUBLIC, PUBLIC2, DNS_ADDR, HOST_PUBLIC_SIDE = ("198.51.100.10", "198.51.100.20",
                                              "198.51.100.53", "198.51.100.1")
PRIVATE, METADATA = "10.77.0.2", "169.254.169.254"
PUBLIC6, PUBLIC6B, HOST_PUBLIC6_SIDE = "2001:db8:51::10", "2001:db8:51::20", "2001:db8:51::1"
PRIVATE6, HOST_PRIVATE6_SIDE = "fd77:77::2", "fd77:77::1"
REACHED = {0, 7}
DROPPED = 28
PROBE_SECONDS = 2


def run(*argv: str, check: bool = True) -> proc.Result:
    return proc.run(list(argv), check=check, timeout=30)


def wait_tcp(address: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.3)
            if sock.connect_ex((address, port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"test server {address}:{port} did not come up in {timeout:g} s")


def stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=5)


@dataclass
class World:
    """The test hosts: namespaces, servers, DNS. See the module docstring."""

    tag: str
    bridge_ip: str
    host_port: int
    web_root: Path
    namespaces: list[str] = field(default_factory=list)
    servers: list[subprocess.Popen] = field(default_factory=list)
    dns: subprocess.Popen | None = None

    @property
    def ns_pub(self) -> str:
        return f"coi-test-{self.tag}-pub"

    @property
    def ns_lan(self) -> str:
        return f"coi-test-{self.tag}-lan"

    def targets(self) -> dict[str, str]:
        """label -> URL of every HTTP test host."""
        return {"public": f"http://{PUBLIC}:{PORT}/", "public2": f"http://{PUBLIC2}:{PORT}/",
                "private": f"http://{PRIVATE}:{PORT}/", "metadata": f"http://{METADATA}:{PORT}/",
                "host_bridge": f"http://{self.bridge_ip}:{self.host_port}/",
                "host_public_side": f"http://{HOST_PUBLIC_SIDE}:{self.host_port}/"}

    def set_dns(self, mapping: Mapping[str, str], *, ttl: int = 600,
                log: Path | None = None) -> None:
        """(Re)start the DNS server with `mapping`; other coi.test names are NXDOMAIN.
        With `log`, every query it gets is written there."""
        self.stop_dns()
        argv = ["ip", "netns", "exec", self.ns_pub, "dnsmasq", "--keep-in-foreground",
                "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces",
                f"--listen-address={DNS_ADDR}", "--port=53", "--pid-file=",
                f"--local-ttl={ttl}", "--local=/coi.test/",
                *(["--log-queries", f"--log-facility={log}"] if log else []),
                *(f"--address=/{name}/{address}" for name, address in mapping.items())]
        self.dns = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
        self._wait_dns()

    def _wait_dns(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.dns is not None and self.dns.poll() is not None:
                pytest.fail(f"dnsmasq exited: {self.dns.stderr.read().decode()[-300:]}")
            try:
                dns.query.udp(dns.message.make_query("probe.coi.test", "A"), DNS_ADDR,
                              timeout=0.3)
                return
            except (dns.exception.Timeout, OSError):
                time.sleep(0.05)
        pytest.fail("the test DNS server did not answer within 10 s")

    def stop_dns(self) -> None:
        if self.dns is not None:
            stop(self.dns)
            self.dns = None


def _free_port(address: str) -> int:
    for _ in range(50):
        port = 20000 + secrets.randbelow(40000)
        with socket.socket() as sock:
            try:
                sock.bind((address, port))
            except OSError:
                continue
            return port
    pytest.fail("no free TCP port for a test server")


def _http_server(argv_prefix: list[str], port: int, bind: str, root: Path) -> subprocess.Popen:
    return subprocess.Popen([*argv_prefix, SYSTEM_PYTHON, "-m", "http.server", str(port),
                             "--bind", bind, "--directory", str(root)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def world(incus_run_lock, bridge_subnet, tmp_path_factory) -> Iterator[World]:
    """Build the test world after the sweep (incus_run_lock) and remove it at the end."""
    del incus_run_lock
    if executables.which("dnsmasq") is None:
        pytest.fail("dnsmasq is not installed (apt-get install dnsmasq-base)", pytrace=False)
    bridge_ip = str(next(bridge_subnet.hosts()))
    web_root = tmp_path_factory.mktemp("web")
    (web_root / "index.html").write_text("coi test host\n")
    item = World(secrets.token_hex(3), bridge_ip, _free_port(bridge_ip), web_root)
    try:
        for ns, veth, host_cidrs, ns_addresses, extra_route in (
                (item.ns_pub, f"ctp{item.tag}", [f"{HOST_PUBLIC_SIDE}/24",
                                                  f"{HOST_PUBLIC6_SIDE}/64"],
                 [f"{PUBLIC}/24", f"{PUBLIC2}/24", f"{DNS_ADDR}/24", f"{PUBLIC6}/64",
                  f"{PUBLIC6B}/64"], None),
                (item.ns_lan, f"ctl{item.tag}", ["10.77.0.1/24", f"{HOST_PRIVATE6_SIDE}/64"],
                 [f"{PRIVATE}/24", f"{METADATA}/32", f"{PRIVATE6}/64"], f"{METADATA}/32")):
            run("ip", "netns", "add", ns)
            item.namespaces.append(ns)
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            for cidr in host_cidrs:  # IPv6 without duplicate detection: usable at once
                run("ip", "addr", "add", cidr, "dev", veth, *(["nodad"] if ":" in cidr else []))
            run("ip", "link", "set", veth, "up")
            if extra_route:
                run("ip", "route", "add", extra_route, "dev", veth)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            for cidr in ns_addresses:
                run("ip", "-n", ns, "addr", "add", cidr, "dev", "eth0",
                    *(["nodad"] if ":" in cidr else []))
            for gateway in (cidr.split("/")[0] for cidr in host_cidrs):
                run("ip", "-n", ns, "-6" if ":" in gateway else "-4", "route", "add", "default",
                    "via", gateway)
            item.servers.append(_http_server(["ip", "netns", "exec", ns], PORT, "::",
                                             web_root))
        for bind in (bridge_ip, HOST_PUBLIC_SIDE):
            item.servers.append(_http_server([], item.host_port, bind, web_root))
        for address, port in ((PUBLIC, PORT), (PRIVATE, PORT), (METADATA, PORT),
                              (bridge_ip, item.host_port), (HOST_PUBLIC_SIDE, item.host_port)):
            wait_tcp(address, port)
        yield item
    finally:
        item.stop_dns()
        for server in item.servers:
            stop(server)
        for ns in item.namespaces:
            run("ip", "netns", "delete", ns, check=False)


@dataclass(frozen=True)
class Net:
    """One test's coi-net environment: its own tables and state dir."""

    table: str
    state_dir: Path

    def __call__(self, *args: str, input_text: str | None = None) -> proc.Result:
        """`bin/coi-net ARGS` (never raises on the exit status)."""
        return proc.run([COI_NET, *args], input_text=input_text, check=False, timeout=60)

    def bridge_listing(self) -> np.Existing:
        return np.Existing.from_listing(nft.list_table("bridge", self.table))

    def status(self, name: str) -> dict:
        done = self("status", name, "--format", "json")
        assert done.ok, done.stderr
        [record] = parse_record(done.stdout, "net_status_list")["containers"]
        return record


@pytest.fixture
def net(coi_env, tmp_path, monkeypatch) -> Iterator[Net]:
    del coi_env
    item = Net(f"coi_test_{secrets.token_hex(4)}", tmp_path / "net-state")
    monkeypatch.setenv("COI_NFT_TABLE", item.table)
    monkeypatch.setenv("COI_NET_STATE_DIR", str(item.state_dir))
    yield item
    for family in nft.FAMILIES:
        run("nft", "delete", "table", family, item.table, check=False)


def probe(run_in, name: str, targets: Mapping[str, str]) -> dict[str, int]:
    """curl every target from inside the container at once; label -> curl's exit code."""
    script = " ".join(
        f"(curl -g -s -o /dev/null --connect-timeout {PROBE_SECONDS} -m {PROBE_SECONDS} "
        f"'{url}'; echo \"{label} $?\") &" for label, url in targets.items()) + " wait"
    done = run_in(name, ["bash", "-c", script], timeout=30)
    codes = dict(line.split() for line in done.stdout.splitlines() if line.strip())
    assert set(codes) == set(targets), (done.stdout, done.stderr)
    return {label: int(code) for label, code in codes.items()}


def reached(codes: Mapping[str, int]) -> set[str]:
    return {label for label, code in codes.items() if code in REACHED}


def dropped(codes: Mapping[str, int]) -> set[str]:
    assert all(code in REACHED | {DROPPED} for code in codes.values()), codes
    return {label for label, code in codes.items() if code == DROPPED}


def start(incus_client, wait_for_ipv4, name: str) -> str:
    incus_client.set_state(name, "start")
    return wait_for_ipv4(name)


def apply_ok(net: Net, *args: str) -> dict:
    done = net("apply", *args, "--format", "json")
    assert done.ok, done.stderr
    return parse_record(done.stdout, "net_rules")


# -- restricted ------------------------------------------------------------------------------


def test_restricted_reaches_public_but_not_private_metadata_host_or_other_containers(
        world, net, make_container, incus_client, run_in, wait_for_ipv4):
    other = make_container()  # unfiltered: the control that reaches everything
    box = make_container(start=False)
    record = apply_ok(net, box.name)
    assert record["mode"] == "restricted"
    ifname = np.host_name_for(box.name)
    # In place before the first start: the port's chain and the NIC's fixed name.
    assert ifname in net.bridge_listing().ports
    devices = incus_client.instance_config(box.name)["devices"]
    assert devices["eth0"]["host_name"] == ifname
    assert devices["eth0"]["security.ipv4_filtering"] == "true"
    start(incus_client, wait_for_ipv4, box.name)
    live = incus_client.instance_state(box.name)["network"]["eth0"]["host_name"]
    assert live == ifname

    targets = {**world.targets(), "other_container": f"http://{other.ipv4}:80/"}
    control = probe(run_in, other.name, world.targets())
    assert reached(control) == set(world.targets())
    codes = probe(run_in, box.name, targets)
    assert reached(codes) == {"public", "public2"}
    assert dropped(codes) == {"private", "metadata", "host_bridge", "host_public_side",
                              "other_container"}
    dns = run_in(box.name, ["getent", "hosts", "_gateway.incus"], timeout=20)
    assert dns.ok
    assert dns.stdout.split()[0] == world.bridge_ip
    status = net.status(box.name)
    assert status["dropped"] > 0
    assert status["link"]["on_bridge"] is True


# -- allowlist -------------------------------------------------------------------------------


def test_allowlist_follows_dns_keeps_cache_on_failure_and_never_allows_private_answers(
        world, net, make_container, incus_client, run_in, wait_for_ipv4):
    world.set_dns({"public.coi.test": PUBLIC, "rebind.coi.test": PRIVATE,
                   "other.coi.test": PUBLIC2})
    box = make_container(start=False)
    record = apply_ok(net, box.name, "--mode", "allowlist", "--allow", "public.coi.test",
                      "--allow", "rebind.coi.test", "--resolver", DNS_ADDR,
                      "--dns-timeout", "1")
    assert record["allowed"] == [PUBLIC]
    assert record["names"]["rebind.coi.test"]["blocked"] == [PRIVATE]
    start(incus_client, wait_for_ipv4, box.name)
    codes = probe(run_in, box.name, world.targets())
    assert reached(codes) == {"public"}
    assert dropped(codes) == {"public2", "private", "metadata", "host_bridge",
                              "host_public_side"}

    # The record moves; the cron sweep leaves it until the answer expires (TTL 600 s)...
    world.set_dns({"public.coi.test": PUBLIC2, "rebind.coi.test": PRIVATE})
    swept = net("refresh", "--all")
    assert (swept.returncode, swept.stdout, swept.stderr) == (0, "", "")
    assert net.status(box.name)["allowed"] == [PUBLIC]
    # ...and an explicit refresh follows it at once, in one swap.
    moved = net("refresh", box.name)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout == f"{box.name}: allowed +{PUBLIC2} -{PUBLIC}\n"
    codes = probe(run_in, box.name, {"public": world.targets()["public"],
                                     "public2": world.targets()["public2"]})
    assert reached(codes) == {"public2"}
    assert dropped(codes) == {"public"}

    # DNS down: the failure is reported, the cached address stays in force.
    world.stop_dns()
    failed = net("refresh", box.name)
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert "public.coi.test" in failed.stderr
    assert "kept 1 cached address" in failed.stderr
    codes = probe(run_in, box.name, {"public2": world.targets()["public2"]})
    assert reached(codes) == {"public2"}
    status = net.status(box.name)
    assert status["allowed"] == [PUBLIC2]
    assert "public.coi.test" in status["last_error"]

    # The name disappears (NXDOMAIN): its addresses go.
    world.set_dns({"rebind.coi.test": PRIVATE})
    gone = net("refresh", box.name)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout == f"{box.name}: allowed -{PUBLIC2}\n"
    assert net.status(box.name)["allowed"] == []


@pytest.fixture
def resolver_for(net, world) -> Iterator[int]:
    """`coi-net dns` of the test's table, as coi's host service runs it; its port."""
    del world  # the bridge's address is up
    port = np.dns_port(net.table)
    child = subprocess.Popen([COI_NET, "dns"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        bridge_ip = _bridge_ip()
        deadline = time.monotonic() + 20
        while True:
            if child.poll() is not None:
                pytest.fail(f"coi-net dns ended: {child.stderr.read().decode()[-400:]}")
            try:  # it refuses the host: an answer all the same
                dns.query.udp(dns.message.make_query("up.invalid", "A"), bridge_ip,
                              port=port, timeout=0.3)
                break
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > deadline:
                    pytest.fail("coi-net dns did not answer within 20 s")
                time.sleep(0.1)
        yield port
    finally:
        stop(child)


def _bridge_ip() -> str:
    """The IPv4 address of the bridge coi-net takes as coi's (coibr0, or a test's own)."""
    name = os.environ.get("COI_INCUS_NETWORK") or "coibr0"
    done = run("incus", "network", "get", name, "ipv4.address")
    return done.stdout.strip().split("/")[0]


def test_the_allowlist_resolver_answers_only_allowed_names_and_lets_their_hosts_in_for_it(
        world, net, resolver_for, make_container, incus_client, run_in, wait_for_ipv4,
        tmp_path):
    del resolver_for
    log = tmp_path / "upstream.log"
    world.set_dns({"a.pub.coi.test": PUBLIC, "b.pub.coi.test": PUBLIC2,
                   "rebind.pub.coi.test": PRIVATE, "evil.coi.test": PUBLIC}, ttl=30, log=log)
    box = make_container(start=False)
    record = apply_ok(net, box.name, "--mode", "allowlist", "--allow", "*.pub.coi.test",
                      "--resolver", DNS_ADDR, "--dns-timeout", "1")
    assert (record["allowed"], record["wildcards"]) == ([], ["*.pub.coi.test"])
    assert record["resolver"] is True
    start(incus_client, wait_for_ipv4, box.name)
    by_address = {"public": world.targets()["public"], "public2": world.targets()["public2"]}
    assert dropped(probe(run_in, box.name, by_address)) == {"public", "public2"}

    # The container's own DNS (the bridge) answers the wildcard's names, and their
    # hosts are reachable at once: the address was allowed before the answer came.
    looked_up = run_in(box.name, ["getent", "ahostsv4", "a.pub.coi.test"], timeout=20)
    assert looked_up.ok, looked_up.stderr
    assert looked_up.stdout.split()[0] == PUBLIC
    by_name = {"a": f"http://a.pub.coi.test:{PORT}/", "b": f"http://b.pub.coi.test:{PORT}/"}
    assert reached(probe(run_in, box.name, by_name)) == {"a", "b"}
    answered = net.status(box.name)["answered"]
    assert sorted(answered) == sorted([PUBLIC, PUBLIC2])

    # Any other name does not resolve, and never reaches the upstream server; a name
    # answered with a private address resolves to nothing, and stays blocked.
    for name in ("evil.coi.test", "data-out-1.evil.coi.test", "_gateway.incus"):
        assert not run_in(box.name, ["getent", "hosts", name], timeout=20).ok, name
    assert not run_in(box.name, ["getent", "ahostsv4", "rebind.pub.coi.test"], timeout=20).ok
    assert dropped(probe(run_in, box.name, {"private": world.targets()["private"]})) == \
        {"private"}
    asked = log.read_text()
    assert "a.pub.coi.test" in asked
    assert "rebind.pub.coi.test" in asked
    assert "evil" not in asked
    assert ".incus" not in asked


# -- IPv6, on a bridge of the test's own ---------------------------------------------------------


@dataclass(frozen=True)
class Bridge6:
    """A test bridge with IPv6 (a ULA prefix, NAT66 out), taken as coi's bridge."""

    name: str
    ipv6: ipaddress.IPv6Interface

    def nic(self) -> dict[str, dict[str, str]]:
        return {"eth0": {"type": "nic", "network": self.name, "name": "eth0"}}


@pytest.fixture
def bridge6(world, monkeypatch) -> Iterator[Bridge6]:
    """Made for the test and deleted after it (after its containers: ask for it first);
    coi-net (and coi-net dns) take it as coi's bridge through COI_INCUS_NETWORK."""
    del world
    name = f"coi-test-{secrets.token_hex(3)}"
    ipv6 = ipaddress.IPv6Interface(f"fd78:{secrets.token_hex(2)}::1/64")
    forwarding = Path("/proc/sys/net/ipv6/conf/all/forwarding")
    before = forwarding.read_text()
    run("incus", "network", "create", name, f"ipv4.address=10.78.{secrets.randbelow(200) + 20}"
        ".1/24", "ipv4.nat=true", f"ipv6.address={ipv6}", "ipv6.nat=true")
    monkeypatch.setenv("COI_INCUS_NETWORK", name)
    try:
        yield Bridge6(name, ipv6)
    finally:
        run("incus", "network", "delete", name, check=False)
        forwarding.write_text(before)  # Incus turned IPv6 forwarding on for the bridge


def wait_for_ipv6(run_in, name: str, seconds: int = 30) -> None:
    """Until the container's SLAAC address has passed duplicate detection and its
    default route (from the router advertisement) is there: before that a connection
    from it waits for nothing."""
    script = (f"for i in $(seq {seconds * 5}); do "
              "ip -6 addr show dev eth0 scope global -tentative | grep -q inet6 && "
              "ip -6 route show default | grep -q via && exit 0; sleep 0.2; done; exit 1")
    if not run_in(name, ["sh", "-c", script], timeout=seconds + 10).ok:
        pytest.fail(f"{name} got no usable IPv6 address and route within {seconds} s")


def v6_targets() -> dict[str, str]:
    """The IPv6 test hosts; `host_v6` is the host's own side of the public veth (no
    server: a refused connection proves the packet arrived)."""
    return {"public6": f"http://[{PUBLIC6}]:{PORT}/", "public6b": f"http://[{PUBLIC6B}]:{PORT}/",
            "private6": f"http://[{PRIVATE6}]:{PORT}/",
            "host_v6": f"http://[{HOST_PUBLIC6_SIDE}]:{PORT + 1}/"}


def _start6(bridge6: Bridge6, make_container, incus_client, wait_for_ipv4, run_in, net,
            *apply_args: str):
    box = make_container(start=False, devices=bridge6.nic())
    record = apply_ok(net, box.name, *apply_args)
    start(incus_client, wait_for_ipv4, box.name)
    wait_for_ipv6(run_in, box.name)
    return box, record


def test_restricted_on_an_ipv6_bridge_reaches_public_v6_hosts_but_not_ula_or_the_host(
        world, net, bridge6, make_container, incus_client, run_in, wait_for_ipv4):
    box, record = _start6(bridge6, make_container, incus_client, wait_for_ipv4, run_in, net,
                          "--mode", "restricted")
    assert record["rules"] == len(np.container_rules(
        np.Policy(box.name, record["interface"], "restricted"),
        np.Bridge("b", ipaddress.IPv4Interface("10.0.0.1/24"), bridge6.ipv6), net.table))
    codes = probe(run_in, box.name, {**v6_targets(), "public": world.targets()["public"]})
    assert reached(codes) == {"public6", "public6b", "public"}
    assert dropped(codes) == {"private6", "host_v6"}


def test_an_ipv6_allowlist_reaches_its_address_and_a_wildcard_s_aaaa_answer_only(
        world, net, bridge6, resolver_for, make_container, incus_client, run_in,
        wait_for_ipv4, tmp_path):
    del resolver_for
    world.set_dns({"v6.pub.coi.test": PUBLIC6B}, log=tmp_path / "upstream.log")
    box, record = _start6(bridge6, make_container, incus_client, wait_for_ipv4, run_in, net,
                          "--mode", "allowlist", "--allow", PUBLIC6, "--allow",
                          "*.pub.coi.test", "--resolver", DNS_ADDR, "--dns-timeout", "1")
    assert record["allowed"] == [PUBLIC6]
    codes = probe(run_in, box.name, {**v6_targets(), "public": world.targets()["public"]})
    assert reached(codes) == {"public6"}
    assert dropped(codes) == {"public6b", "private6", "host_v6", "public"}
    looked_up = run_in(box.name, ["getent", "ahostsv6", "v6.pub.coi.test"], timeout=20)
    assert looked_up.ok, looked_up.stderr
    assert looked_up.stdout.split()[0] == PUBLIC6B
    codes = probe(run_in, box.name, {"v6": f"http://v6.pub.coi.test:{PORT}/",
                                     "private6": v6_targets()["private6"]})
    assert reached(codes) == {"v6"}
    assert PUBLIC6B in net.status(box.name)["answered"]


# -- open ------------------------------------------------------------------------------------


def test_open_reaches_everything_and_has_no_rules(world, net, make_container, incus_client,
                                                  run_in, wait_for_ipv4):
    other = make_container()
    box = make_container(start=False)
    apply_ok(net, box.name, "--mode", "restricted")
    record = apply_ok(net, box.name, "--mode", "open")
    assert record["rules"] == 0
    listing, ifname = net.bridge_listing(), np.host_name_for(box.name)
    assert ifname in listing.ports  # in force, as an accept
    assert np.chain_name(ifname) not in listing.chains
    assert ifname not in listing.filtered
    nic = incus_client.instance_config(box.name)["devices"]["eth0"]
    assert nic["security.port_isolation"] == "false"
    start(incus_client, wait_for_ipv4, box.name)
    codes = probe(run_in, box.name, {**world.targets(),
                                     "other_container": f"http://{other.ipv4}:80/"})
    assert reached(codes) == {*world.targets(), "other_container"}


def test_switching_a_running_container_s_mode_changes_rules_and_keeps_its_network(
        world, net, make_container, incus_client, run_in, wait_for_ipv4):
    box = make_container(start=False)
    apply_ok(net, box.name)
    address = start(incus_client, wait_for_ipv4, box.name)
    pick = {k: v for k, v in world.targets().items() if k in ("public", "public2", "private")}
    assert apply_ok(net, box.name, "--mode", "allowlist", "--allow", PUBLIC2)["nic_pending"] \
        is False
    codes = probe(run_in, box.name, pick)
    assert (reached(codes), dropped(codes)) == ({"public2"}, {"public", "private"})
    # Open wants Incus's NIC filtering off, which would unplug the NIC of a running
    # container: left for the next stopped apply, said on stderr.
    done = net("apply", box.name, "--mode", "open", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert parse_record(done.stdout, "net_rules")["nic_pending"] is True
    assert "NIC filtering stays as it is" in done.stderr
    assert incus_client.ipv4_address(box.name) == address
    assert reached(probe(run_in, box.name, pick)) == set(pick)


# -- spoofing --------------------------------------------------------------------------------

SPOOF = ("ip addr flush dev eth0 && ip addr add 10.151.43.{a}/24 dev eth0 && "
         "ip addr add 10.151.43.{b}/24 dev eth0 && "
         "ip link set dev eth0 address 02:c0:1a:{a:02x}:{b:02x}:01 && "
         "ip route replace default via {gw} dev eth0 && ip -br addr show dev eth0 && "
         "ip -br link show dev eth0")


def _spoof(run_in, incus_client, name: str, gateway: str) -> str:
    """Root inside takes two other addresses and another MAC; addresses other
    containers hold (other test runs too) are never taken."""
    used = {address["address"] for instance in incus_client.instances(with_state=True)
            for nic in ((instance.get("state") or {}).get("network") or {}).values()
            for address in nic.get("addresses") or []}
    free = [a for a in range(200, 225)
            if f"10.151.43.{a}" not in used and f"10.151.43.{a + 25}" not in used]
    assert free, "no free addresses to spoof"
    a = free[secrets.randbelow(len(free))]
    done = run_in(name, ["bash", "-c", SPOOF.format(a=a, b=a + 25, gw=gateway)], timeout=20)
    assert done.ok, done.stderr
    assert f"10.151.43.{a + 25}" in done.stdout
    assert f"02:c0:1a:{a:02x}" in done.stdout
    return done.stdout


def test_changing_ip_adding_an_address_and_changing_mac_escape_nothing(
        world, net, make_container, incus_client, run_in, wait_for_ipv4):
    other = make_container()
    targets = {**world.targets(), "other_container": f"http://{other.ipv4}:80/"}
    blocked = {"private", "metadata", "host_bridge", "host_public_side", "other_container"}
    # coi's rules alone (Incus's NIC filtering off): the port is the key, not the address.
    bare = make_container(start=False)
    apply_ok(net, bare.name, "--no-nic-filtering")
    start(incus_client, wait_for_ipv4, bare.name)
    assert dropped(probe(run_in, bare.name, targets)) == blocked
    _spoof(run_in, incus_client, bare.name, world.bridge_ip)
    after = probe(run_in, bare.name, targets)
    assert dropped(after) == blocked
    assert reached(after) == {"public", "public2"}  # it does get out, only not there
    # With Incus's filtering as well (the default): spoofed frames go nowhere at all.
    full = make_container(start=False)
    apply_ok(net, full.name)
    start(incus_client, wait_for_ipv4, full.name)
    _spoof(run_in, incus_client, full.name, world.bridge_ip)
    assert dropped(probe(run_in, full.name, targets)) == set(targets)


def _forward_drops(table: str) -> int:
    return sum(expr["counter"]["packets"] for item in nft.list_table("bridge", table)
               if item.get("rule", {}).get("chain") == "c_fwd"
               for expr in item["rule"]["expr"] if "counter" in expr)


def test_frames_sent_straight_to_another_container_s_mac_die_on_the_bridge(
        world, net, make_container, incus_client, run_in, wait_for_ipv4):
    other = make_container()
    mac = incus_client.instance_state(other.name)["network"]["eth0"]["hwaddr"]
    box = make_container(start=False)
    apply_ok(net, box.name)
    start(incus_client, wait_for_ipv4, box.name)
    # The other container answers for PUBLIC too, so a frame that got to it would
    # come back as "connection refused".
    taken = run_in(other.name, ["ip", "addr", "add", f"{PUBLIC}/32", "dev", "eth0"], timeout=20)
    assert taken.ok, taken.stderr
    before = _forward_drops(net.table)
    # A public destination whose frames go to the other container's MAC: past the
    # address checks, so only the bridge's forward chain can stop them.
    trick = run_in(box.name, ["bash", "-c", f"ip route add {PUBLIC}/32 dev eth0 && "
                              f"ip neigh replace {PUBLIC} lladdr {mac} dev eth0 nud permanent"],
                   timeout=20)
    assert trick.ok, trick.stderr
    codes = probe(run_in, box.name, {"public": world.targets()["public"]})
    assert dropped(codes) == {"public"}
    assert _forward_drops(net.table) > before


# -- lifecycle -------------------------------------------------------------------------------


def test_remove_after_deletion_leaves_no_rules_and_no_state(net, make_container,
                                                             incus_client):
    box = make_container(start=False)
    apply_ok(net, box.name, "--mode", "allowlist", "--allow", PUBLIC)
    ifname = np.host_name_for(box.name)
    assert net.bridge_listing().has(ifname)
    incus_client.delete_instance(box.name)
    done = net("remove", box.name)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{box.name}: rules removed ({ifname})\n"
    assert not net.bridge_listing().has(ifname)
    assert not (net.state_dir / "default" / f"{box.name}.json").exists()
    again = net("remove", box.name)
    assert (again.returncode, again.stdout) == (0, f"{box.name}: had no rules ({ifname})\n")
    missing = net("status", box.name)
    assert missing.returncode == 3


def test_gc_removes_rules_of_containers_a_killed_coi_left_and_keeps_live_ones(
        net, make_container, incus_client):
    killed, half_done, alive = (make_container(start=False) for _ in range(3))
    for box in (killed, half_done, alive):
        apply_ok(net, box.name)
    # coi killed between the nft transaction and the state write: rules, no state.
    (net.state_dir / "default" / f"{half_done.name}.json").unlink()
    incus_client.delete_instance(killed.name)
    incus_client.delete_instance(half_done.name)
    done = net("gc")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(
        f"{b.name}: rules removed ({np.host_name_for(b.name)})" for b in (killed, half_done))
    listing = net.bridge_listing()
    assert listing.ifnames() == {np.host_name_for(alive.name)}
    assert np.Store(str(net.state_dir)).containers() == [alive.name]
    assert net("gc").stdout == ""


def test_a_new_container_with_an_old_name_inherits_no_openings(net, incus_client,
                                                               test_image, container_name):
    incus_client.create_instance(container_name, test_image, profiles=["coi"])
    apply_ok(net, container_name, "--mode", "allowlist", "--allow", PUBLIC2)
    ifname = np.host_name_for(container_name)
    assert net.bridge_listing().elements[np.set_name(ifname)] == (PUBLIC2,)
    incus_client.delete_instance(container_name)  # deleted behind coi's back
    incus_client.create_instance(container_name, test_image, profiles=["coi"])
    apply_ok(net, container_name, "--mode", "restricted")
    listing = net.bridge_listing()
    assert np.set_name(ifname) not in listing.sets
    assert listing.rules[np.chain_name(ifname)] == 9
    assert net.status(container_name)["allowed"] == []


def test_refresh_restores_rules_that_vanished(net, make_container):
    box = make_container(start=False)
    apply_ok(net, box.name, "--mode", "allowlist", "--allow", PUBLIC)
    for family in nft.FAMILIES:  # what a reboot or `nft flush ruleset` does
        run("nft", "delete", "table", family, net.table)
    done = net("refresh", "--all")
    assert (done.returncode, done.stdout) == (0, f"{box.name}: rules restored\n")
    listing = net.bridge_listing()
    assert listing.elements[np.set_name(np.host_name_for(box.name))] == (PUBLIC,)
    assert {"c_pre", "c_in", "c_fwd"} <= {i["chain"]["name"] for i in
                                         nft.list_table("inet", net.table) if "chain" in i}


def test_a_running_container_with_a_random_veth_is_refused(net, make_container):
    box = make_container()
    done = net("apply", box.name)
    assert done.returncode == 2
    assert "stop it, run coi-net apply, then start it" in done.stderr
    assert not net.bridge_listing().has(np.host_name_for(box.name))


def test_apply_takes_container_and_mode_from_a_slot_record_on_stdin(
        net, coi_env, incus_client, test_image, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    name = naming.container_name(workspace, 1, coi_env.prefix)
    record = SlotRecord(str(workspace), 1, name, False, "coi", "coi", network="allowlist")
    incus_client.create_instance(name, test_image, profiles=["coi"])
    try:
        done = net("apply", "--allow", PUBLIC, "--format", "json",
                   input_text=json.dumps(record.to_record()) + "\n")
        assert done.returncode == 0, done.stderr
        applied = parse_record(done.stdout, "net_rules")
        assert (applied["container"], applied["mode"], applied["allowed"]) == \
            (name, "allowlist", [PUBLIC])
    finally:
        incus_client.delete_instance_force(name)


def test_dry_run_prints_the_transaction_and_changes_nothing(net, make_container,
                                                            incus_client):
    box = make_container(start=False)
    done = net("apply", box.name, "--dry-run")
    assert done.returncode == 0, done.stderr
    transaction, end = json.JSONDecoder().raw_decode(done.stdout)
    plan = transaction["nftables"]
    # Then the plan: the NIC given coi's host-side name, and that transaction.
    steps = done.stdout[end:].strip().splitlines()
    assert steps[0].startswith("dry run: nothing was changed; the real run makes 2 changes")
    assert steps[1].startswith(f"  1. PATCH /1.0/instances/{box.name}?project=default  ")
    assert steps[2].startswith(f"  2. nft transaction in table {net.table}  {{\"commands\": ")
    nft.check_ours(plan, net.table)
    assert any("rule" in c.get("add", {}) for c in plan)
    assert nft.list_table("bridge", net.table) == []
    assert "host_name" not in (incus_client.instance_config(box.name)["devices"]
                               .get("eth0") or {})


# -- the ruleset in the kernel ---------------------------------------------------------------


@pytest.mark.parametrize("ipv6", [None, "fd42:1::1/64"])
def test_every_mode_loads_into_the_kernel(ipv6):
    """`nft -c` (check only, nothing applied) accepts base + every mode, with and
    without IPv6 on the bridge (an IPv6 allowlist set with it)."""
    bridge = np.Bridge("coibr0", ipaddress.IPv4Interface("10.151.43.1/24"),
                       ipaddress.IPv6Interface(ipv6) if ipv6 else None)
    table = f"coi_test_{secrets.token_hex(4)}"
    commands = np.base_commands(table, bridge)
    for number, mode in enumerate(("restricted", "allowlist")):
        ifname = np.host_name_for(f"coi-test-check-{number}")
        policy = np.Policy(f"coi-test-check-{number}", ifname, mode, (PUBLIC, PUBLIC6))
        commands += np.container_commands(table, policy, bridge, np.Existing())
    commands += np.answered_commands(table, ifname, bridge, {PUBLIC: 90, PUBLIC6: 60})
    done = proc.run(["nft", "-c", "-j", "-f", "-"], input_text=nft.dump(commands),
                    check=False)
    assert done.ok, done.stderr
    assert table not in proc.run(["nft", "list", "tables"]).stdout


# -- fail closed: the start hook and the guard --------------------------------------------------


def delete_tables(net: Net) -> None:
    """What a host reboot or `nft flush ruleset` does to coi's rules."""
    for family in nft.FAMILIES:
        run("nft", "delete", "table", family, net.table)


def test_apply_makes_coi_net_hook_the_container_s_start_hook(net, make_container,
                                                             incus_client):
    box = make_container(start=False)
    incus_client.patch_instance(box.name, config={"raw.lxc": "lxc.apparmor.allow_nesting = 1\n"})
    apply_ok(net, box.name)
    apply_ok(net, box.name, "--mode", "allowlist", "--allow", PUBLIC)  # replaced, not added
    raw = incus_client.instance_config(box.name)["config"]["raw.lxc"].splitlines()
    assert raw[0] == "lxc.apparmor.allow_nesting = 1"
    assert raw[1:] == [f"lxc.hook.start-host = {ROOT / 'bin' / 'coi-net-hook'} {net.table} "
                       f"{np.host_name_for(box.name)} {box.name} default {net.state_dir}"]


def test_a_container_started_behind_coi_s_back_after_a_reboot_starts_with_its_rules(
        world, net, make_container, incus_client, run_in, wait_for_ipv4):
    box = make_container(start=False)
    apply_ok(net, box.name)
    delete_tables(net)
    done = net("status", box.name)
    assert done.returncode == 1
    assert "POLICY MISSING" in done.stdout
    incus_client.set_state(box.name, "start")  # as `incus start` does, without coi
    # The hook ran before the container's init: its port's policy is in force already.
    listing, ifname = net.bridge_listing(), np.host_name_for(box.name)
    assert ifname in listing.ports
    assert np.chain_name(ifname) in listing.chains
    wait_for_ipv4(box.name)
    codes = probe(run_in, box.name, world.targets())
    assert reached(codes) == {"public", "public2"}
    assert dropped(codes) == {"private", "metadata", "host_bridge", "host_public_side"}


def test_a_container_coi_recorded_no_policy_for_does_not_start(net, make_container,
                                                              incus_client):
    box = make_container(start=False)
    apply_ok(net, box.name)
    state = net.state_dir / "default" / f"{box.name}.json"
    assert state.is_file()
    state.unlink()
    delete_tables(net)
    with pytest.raises(CoiError):
        incus_client.set_state(box.name, "start")
    assert incus_client.status(box.name) == "Stopped"
    assert not net.bridge_listing().has(np.host_name_for(box.name))


def test_a_port_with_coi_s_name_and_no_policy_passes_nothing_until_restored(
        world, net, make_container, incus_client, run_in, wait_for_ipv4):
    box = make_container(start=False)
    apply_ok(net, box.name)
    start(incus_client, wait_for_ipv4, box.name)
    ifname = np.host_name_for(box.name)
    assert net("status", box.name).returncode == 0
    run("nft", "delete", "element", "bridge", net.table, "ports", f"{{ {ifname} }}")
    assert reached(probe(run_in, box.name, {"public": world.targets()["public"]})) == set()
    done = net("status", box.name, "--format", "json")
    assert done.returncode == 4
    [record] = parse_record(done.stdout, "net_status_list")["containers"]
    assert record["policy"] == "blocked"
    done = net("restore", box.name)
    assert (done.returncode, done.stdout) == (0, f"{box.name}: rules restored\n")
    # The gateway's ARP entry failed while blocked (connect: EHOSTUNREACH, curl's 7, which
    # probe() counts as reached): the container asks again within seconds.
    deadline = time.monotonic() + 20
    while probe(run_in, box.name, {"public": world.targets()["public"]})["public"] != 0:
        assert time.monotonic() < deadline, "the restored container never reached public"
        time.sleep(0.5)
    assert reached(probe(run_in, box.name, world.targets())) == {"public", "public2"}
    done = net("restore", box.name)  # in force: nothing to do, nothing said
    assert (done.returncode, done.stdout) == (0, "")



# -- the host service's upkeep: no cron ----------------------------------------------------


@pytest.fixture
def upkeep(net, open_tmp) -> Iterator[Path]:
    """A `coi-host serve` of this checkout on `net`'s table and state, its upkeep ticking
    every second; stopped at the end."""
    socket_path = open_tmp / "host.sock"
    log = open(open_tmp / "service.log", "ab")  # noqa: SIM115 - closed below
    child = subprocess.Popen([str(ROOT / "bin" / "coi-host"), "serve", "--socket",
                              str(socket_path), "--tick", "1"], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not socket_path.exists():
            assert child.poll() is None, (open_tmp / "service.log").read_text()
            assert time.monotonic() < deadline, "the host service did not start"
            time.sleep(0.05)
        yield socket_path
    finally:
        child.terminate()
        child.wait(timeout=10)
        log.close()


def until(check, seconds: float) -> float:
    """Seconds until check() held (polled); fails after `seconds`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"not within {seconds:g} s"
        time.sleep(0.2)
    return time.monotonic() - started


def test_rules_flushed_under_a_running_container_come_back_within_the_tick(
        world, net, upkeep, make_container, incus_client, run_in, wait_for_ipv4):
    box = make_container(start=False)
    apply_ok(net, box.name)
    start(incus_client, wait_for_ipv4, box.name)
    ifname = np.host_name_for(box.name)
    delete_tables(net)
    until(lambda: ifname in net.bridge_listing().ports, 10)
    assert net("status", box.name).returncode == 0
    deadline = time.monotonic() + 20  # its ARP entry may have failed meanwhile
    while probe(run_in, box.name, {"public": world.targets()["public"]})["public"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    codes = probe(run_in, box.name, world.targets())
    assert dropped(codes) == {"private", "metadata", "host_bridge", "host_public_side"}


def test_a_container_deleted_behind_coi_s_back_loses_its_rules_within_the_gc_interval(
        net, upkeep, make_container, incus_client):
    box = make_container(start=False)
    apply_ok(net, box.name)
    state = net.state_dir / "default" / f"{box.name}.json"
    assert state.is_file()
    incus_client.delete_instance_force(box.name)  # `incus delete -f`, without coi
    until(lambda: not state.exists(), 20)
    assert not net.bridge_listing().has(np.host_name_for(box.name))


def test_an_allowlisted_name_whose_record_moves_is_followed_without_a_refresh_command(
        world, net, upkeep, make_container):
    world.set_dns({"moving.coi.test": PUBLIC}, ttl=2)
    box = make_container(start=False)
    record = apply_ok(net, box.name, "--mode", "allowlist", "--allow", "moving.coi.test",
                      "--resolver", DNS_ADDR, "--dns-timeout", "1")
    assert record["allowed"] == [PUBLIC]
    world.set_dns({"moving.coi.test": PUBLIC2}, ttl=2)
    until(lambda: net.status(box.name)["allowed"] == [PUBLIC2], 20)
    aset = np.set_name(np.host_name_for(box.name))
    assert net.bridge_listing().elements[aset] == (PUBLIC2,)


def test_another_coi_table_s_guard_passes_the_ports_this_table_holds_the_policy_of(
        world, net, make_container, incus_client, run_in, wait_for_ipv4, tmp_path):
    """Tests, projects: several coi tables on one host, each with its guard; a port
    whose policy one of them holds passes the others' guards (its policy marks it)."""
    other = f"coi_test_{secrets.token_hex(4)}"
    helper = make_container(start=False)
    try:
        done = proc.run([COI_NET, "apply", helper.name], check=False, timeout=60,
                        env={**os.environ, "COI_NFT_TABLE": other,
                             "COI_NET_STATE_DIR": str(tmp_path / "other-state")})
        assert done.ok, done.stderr
        assert "c_guard" in {i["chain"]["name"] for i in nft.list_table("bridge", other)
                             if "chain" in i}
        box = make_container(start=False)
        apply_ok(net, box.name)
        start(incus_client, wait_for_ipv4, box.name)
        codes = probe(run_in, box.name, world.targets())
        assert reached(codes) == {"public", "public2"}
    finally:
        for family in nft.FAMILIES:
            run("nft", "delete", "table", family, other, check=False)
