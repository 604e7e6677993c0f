"""coi-net's egress policy: validation, the nftables ruleset as data, allowlist
resolution and the per-container cache (the parts the rest of coi needs are in
coi_common.netpolicy, re-exported here).

How the rules work (docs/network.md has the picture):

* Every rule is keyed on the container's host-side veth, the bridge port its
  frames enter by. coi gives that veth a fixed name (`host_name_for`) with a
  NIC override set before the first start, so the rules exist before the
  container's first packet and root inside cannot step around them by
  changing its IP or MAC address: the port stays the same.
* `bridge` table: a verdict map `ports` sends each filtered port to its own
  chain `p_<ifname>`, which lets ARP, DHCP and DNS to the bridge through,
  marks everything else with MARK and drops private, link-local, CGNAT,
  multicast and bridge-subnet destinations (and, in allowlist mode,
  everything not in the container's set `a_<ifname>`). A `forward` chain
  drops every frame a filtered port would send straight to another port
  (container to container). The bridge family has no conntrack, reject or
  fib, so:
* `inet` table: MARK survives into the IP layer, where `fib daddr type
  local` drops marked packets to any of the host's own addresses (before
  DNAT), `input` drops any marked packet that still reaches the host, and
  `forward` re-checks private destinations after DNAT.
* An allowlist container's DNS to the bridge carries the table's DNS mark
  (`dns_mark`), which the nat chain `c_dns` redirects to coi's resolver
  (coi_net.resolver); the addresses it answers go into the sets
  `d_<ifname>` / `d6_<ifname>` (with timeouts) beside the static `a_` ones.

Nothing here touches the system: building is pure (unit-tested), resolution
needs dnspython (imported lazily; ~150 ms) and the store writes files.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from coi_common import locks
from coi_common.errors import BadInput
from coi_common.naming import NETWORK_MODES, validate_container_name
from coi_net.nft import TABLE_PATTERN

MODES: Final = NETWORK_MODES
DEFAULT_MODE: Final = "restricted"

IFNAME_PREFIX: Final = "coi"
IFNAME_HASH_LEN: Final = 12
IFNAME_PATTERN: Final = re.compile(r"coi[0-9a-f]{12}")
NIC_SECURITY: Final = ("security.ipv4_filtering", "security.mac_filtering",
                       "security.port_isolation")
MAX_REFRESH_MINUTES: Final = 10080
_PROJECT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
LOCK_SECONDS: Final = 60.0
"""The longest wait for another coi-net changing rules (each holds the lock for one
nftables transaction and its state file)."""


# -- validation -------------------------------------------------------------------------


def validate_mode(mode: object) -> str:
    if mode not in MODES:
        raise BadInput(f"network mode {mode!r} is not one of {', '.join(MODES)}")
    return str(mode)


def validate_project(project: object) -> str:
    if not isinstance(project, str) or not _PROJECT.fullmatch(project):
        raise BadInput(f"Incus project name {project!r} is not valid")
    return project


def validate_ifname(name: object) -> str:
    """A host-side interface name coi made (`coi` + 12 hex digits)."""
    if not isinstance(name, str) or not IFNAME_PATTERN.fullmatch(name):
        raise BadInput(f"interface name {name!r} is not one coi makes")
    return name


def validate_refresh_minutes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 0 <= value <= MAX_REFRESH_MINUTES:
        raise BadInput(f"refresh interval {value!r} must be whole minutes from 0 to "
                       f"{MAX_REFRESH_MINUTES} (0 turns automatic refresh off)")
    return value


# -- names on the host and the NIC -----------------------------------------------------------


def host_name_for(container: str, project: str = "default") -> str:
    """The fixed host-side veth name of a container: `coi` + 12 hex digits (15 chars,
    the kernel's limit), from the project and the container name."""
    validate_container_name(container)
    validate_project(project)
    import hashlib  # noqa: PLC0415 - a member's coi-net never names an interface

    digest = hashlib.sha256(f"{project}/{container}".encode()).hexdigest()
    return IFNAME_PREFIX + digest[:IFNAME_HASH_LEN]


def nic_settings(current: Mapping[str, str], ifname: str, mode: str, *,
                 nic_filtering: bool = True) -> dict[str, str]:
    """The NIC device as coi wants it: its settings plus the fixed host_name and, unless
    the mode is open, Incus's own MAC/IPv4 anti-spoofing and port isolation."""
    settings = {**current, "host_name": validate_ifname(ifname)}
    value = "true" if validate_mode(mode) != "open" and nic_filtering else "false"
    settings.update(dict.fromkeys(NIC_SECURITY, value))
    return settings


def net_device_override(container: str, *, network: str = "coibr0", mode: str = DEFAULT_MODE,
                        device: str = "eth0", project: str = "default",
                        nic_filtering: bool = True) -> dict[str, dict[str, str]]:
    """Devices to merge into a container's create request so its NIC has coi's fixed
    host-side name (and filtering) from the very first start.

    coi-shell: `devices = {**container_devices(...), **net_device_override(name, ...)}`,
    create stopped, run `coi-net apply` (with the slot record), then start.
    """
    base = {"type": "nic", "network": network, "name": device}
    return {device: nic_settings(base, host_name_for(container, project), mode,
                                 nic_filtering=nic_filtering)}


MARK: Final = 0x636F6900
"""The packet mark of filtered containers' traffic ('coi\\0'); see docs/network.md."""
POLICY_MARK: Final = MARK | 1
"""The mark of traffic a port's policy let through unfiltered (ARP, DHCP and DNS to the
bridge, anything of an open port): not MARK, so the inet chains leave it alone."""
MARK_MASK: Final = 0xFFFFFF00
DNS_PORT: Final = 10053
"""Where coi's allowlist resolver (coi-net dns) listens on the bridge, for table `coi`."""
GUARD_PRIORITY: Final = -190
"""After every coi table's policy chains (-200): the guard sees the mark any of them set."""

BLOCKED_V4: Final = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8",
                     "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3")
"""Never reachable from a filtered container: RFC 1918, CGNAT, link-local (cloud
metadata), loopback, 'this network', multicast, reserved and broadcast."""

BLOCKED_V6: Final = ("::/127", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64",
                     "2001::/32", "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8")
"""Loopback/unspecified, v4-mapped, NAT64 and 6to4/Teredo (they embed IPv4 and so
reach private ranges), discard, ULA, link-local, multicast."""

ND_TYPES: Final = ("nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert")

MAX_ALLOWED: Final = 512
MAX_RESOLVERS: Final = 8
DEFAULT_DNS_TIMEOUT: Final = 2.0
NEGATIVE_RETRY: Final = 300.0
"""Seconds before a name that did not exist (NXDOMAIN) or had no A record is asked again."""

_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT: Final = re.compile(r"[1-9][0-9]{0,4}")

Command = dict[str, Any]


def validate_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not 0.1 <= float(value) <= 30:
        raise BadInput(f"DNS timeout {value!r} must be 0.1 to 30 seconds")
    return float(value)


def parse_timeout(text: str) -> float:
    if not re.fullmatch(r"[0-9]{1,2}(\.[0-9]{1,3})?", text or ""):
        raise BadInput(f"DNS timeout {text!r} must be seconds, e.g. 2 or 0.5")
    return validate_timeout(float(text))


def parse_refresh_minutes(text: str) -> int:
    if not re.fullmatch(r"0|[1-9][0-9]{0,4}", text or ""):
        raise BadInput(f"refresh interval {text!r} must be a whole number of minutes")
    return validate_refresh_minutes(int(text))


def _ipv6(text: str) -> ipaddress.IPv6Address | None:
    """An IPv6 address without a zone (`%eth0`): a literal a policy can hold."""
    try:
        return ipaddress.IPv6Address(text) if "%" not in text else None
    except ValueError:
        return None


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    """A dotted-quad IPv4 address, strictly (no leading zeros, no short forms)."""
    if not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3}){3}", text):
        return None
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


def validate_domain(text: str) -> str:
    """A DNS name as allowed_domains takes it: lowercase LDH labels, two or more,
    a non-numeric last label, at most 253 characters; one trailing dot is dropped."""
    name = text.strip(" ").lower()
    name = name.removesuffix(".")
    labels = name.split(".")
    if (not name or len(name) > 253 or len(labels) < 2
            or not all(_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise BadInput(f"allowed domain {text!r} is neither a domain name, a wildcard nor "
                       "an IP address", hint="use names like api.github.com, wildcards "
                                             "like *.githubusercontent.com or addresses "
                                             "like 8.8.8.8")
    return name


def validate_wildcard(text: str) -> str:
    """`*.DOMAIN` (DOMAIN as validate_domain takes it, so never `*.com`): every name
    under DOMAIN, at any depth, not DOMAIN itself."""
    stripped = text.strip(" ")
    try:
        if not stripped.startswith("*."):
            raise BadInput("no '*.' prefix")
        return "*." + validate_domain(stripped[2:])
    except BadInput:
        raise BadInput(f"allowed wildcard {text!r} is not '*.' and a domain of two or more "
                       "labels", hint="e.g. *.githubusercontent.com (never *.com)") from None


def name_allowed(name: str, names: Collection[str], wildcards: Iterable[str]) -> bool:
    """Whether a queried `name` (any case, one trailing dot or none) is one of `names`
    or under one of `wildcards` (`*.example.com`: a.example.com, a.b.example.com)."""
    wanted = name.lower().removesuffix(".")
    return wanted in names or any(wanted.endswith(w[1:]) for w in wildcards)


def dns_port(table: str) -> int:
    """The allowlist resolver's port for `table`: DNS_PORT for coi's own, another fixed
    one (20000-29999) for every other coi table, so a test's resolver is its own."""
    return DNS_PORT if table == "coi" else 20000 + _table_hash(table) % 10000


def dns_mark(table: str) -> int:
    """The mark of DNS queries of `table`'s allowlist containers: the redirect to its
    resolver matches it, so one table never takes another table's queries."""
    return MARK | (2 if table == "coi" else 3 + _table_hash(table) % 253)


def _table_hash(table: str) -> int:
    import zlib  # noqa: PLC0415

    return zlib.crc32(table.encode())


@dataclass(frozen=True)
class Bridge:
    """What the rules need to know about coi's bridge."""

    name: str
    ipv4: ipaddress.IPv4Interface
    ipv6: ipaddress.IPv6Interface | None = None

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, str]) -> Bridge:
        """From an Incus network's config (`ipv4.address`, `ipv6.address`)."""
        v4 = config.get("ipv4.address") or ""
        v6 = config.get("ipv6.address") or ""
        try:
            ipv4 = ipaddress.IPv4Interface(v4)
        except ValueError:
            raise BadInput(f"network {name} has no usable IPv4 address ({v4 or 'none'}); "
                           "coi's rules need one") from None
        ipv6 = None
        if v6 and v6 not in ("none", "auto"):
            with contextlib.suppress(ValueError):
                ipv6 = ipaddress.IPv6Interface(v6)
        return cls(name, ipv4, ipv6)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ipv4": str(self.ipv4),
                "ipv6": str(self.ipv6) if self.ipv6 else None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Bridge:
        try:
            return cls(str(data["name"]), ipaddress.IPv4Interface(data["ipv4"]),
                       ipaddress.IPv6Interface(data["ipv6"]) if data.get("ipv6") else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"stored bridge facts are malformed: {exc}") from None


def blocked_v4(bridge: Bridge | None) -> list[ipaddress.IPv4Network]:
    """The destinations no filtered container may reach, without overlaps; without a
    bridge (not asked for yet) the fixed ranges only."""
    nets = [ipaddress.IPv4Network(n) for n in BLOCKED_V4]
    if bridge is not None:
        nets.append(bridge.ipv4.network)
    return list(ipaddress.collapse_addresses(nets))


def blocked_v6(bridge: Bridge | None) -> list[ipaddress.IPv6Network]:
    nets = [ipaddress.IPv6Network(n) for n in BLOCKED_V6]
    if bridge is not None and bridge.ipv6 is not None:
        nets.append(bridge.ipv6.network)
    return list(ipaddress.collapse_addresses(nets))


def is_blocked(address: str, bridge: Bridge | None) -> bool:
    """True for an address (IPv4 or IPv6) a filtered container may never reach (DNS
    rebinding)."""
    ip = ipaddress.ip_address(address)
    nets: list[Any] = blocked_v4(bridge) if ip.version == 4 else blocked_v6(bridge)
    return any(ip in net for net in nets)


def address_key(address: str) -> tuple[int, int]:
    """Sort order of addresses: IPv4 first, then IPv6, each by value."""
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


@dataclass(frozen=True)
class Allowed:
    """allowed_domains split into names to resolve, raw addresses and wildcards (which
    only coi's resolver answers: nothing to resolve ahead)."""

    names: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    wildcards: tuple[str, ...] = ()

    def entries(self) -> list[str]:
        return [*self.names, *self.addresses, *self.wildcards]


def parse_allowed(entries: Iterable[object], bridge: Bridge | None) -> Allowed:
    """Validate allowed_domains: names and public IPv4 and IPv6 addresses, deduplicated in order
    (bridge None: not yet checked against the bridge's own subnet)."""
    names: list[str] = []
    addresses: list[str] = []
    wildcards: list[str] = []
    count = 0
    for entry in entries:
        count += 1
        if count > MAX_ALLOWED:
            raise BadInput(f"allowed_domains has more than {MAX_ALLOWED} entries")
        if not isinstance(entry, str):
            raise BadInput(f"allowed domain {entry!r} must be a string")
        text = entry.strip(" ")
        if text.startswith("*"):
            wildcard = validate_wildcard(text)
            if wildcard not in wildcards:
                wildcards.append(wildcard)
            continue
        ip = _ipv6(text) if ":" in text else _ipv4(text)
        if ip is None and ":" in text:
            raise BadInput(f"allowed entry {text!r} is not an IPv6 address")
        if ip is None:
            name = validate_domain(text)
            if name not in names:
                names.append(name)
            continue
        if is_blocked(str(ip), bridge):
            ranges = "private, link-local or reserved" if ip.version == 4 else \
                "private (ULA), link-local, IPv4-embedding or reserved"
            raise BadInput(f"allowed address {text} is in a {ranges} range, which coi "
                           "always blocks")
        if str(ip) not in addresses:
            addresses.append(str(ip))
    return Allowed(tuple(names), tuple(addresses), tuple(wildcards))


@dataclass(frozen=True)
class Resolver:
    """A DNS server to ask: address and port."""

    address: str
    port: int = 53

    def __str__(self) -> str:
        if self.port == 53:
            return self.address
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def parse_resolver(text: object) -> Resolver:
    """`ADDR`, `ADDR:PORT` or `[V6ADDR]:PORT`."""
    if not isinstance(text, str):
        raise BadInput(f"resolver {text!r} must be a string")
    host, port = text.strip(), "53"
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::([0-9]+))?", host)
    if match:
        host, port = match.group(1), match.group(2) or "53"
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise BadInput(f"resolver {text!r} is not an IP address (optionally with :PORT)") \
            from None
    if isinstance(address, ipaddress.IPv4Address) and _ipv4(host) is None:
        raise BadInput(f"resolver {text!r} is not a plain dotted IPv4 address")
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise BadInput(f"resolver {text!r} has a bad port")
    return Resolver(str(address), int(port))


def parse_resolvers(entries: Iterable[object]) -> tuple[Resolver, ...]:
    found = tuple(dict.fromkeys(parse_resolver(e) for e in entries))
    if len(found) > MAX_RESOLVERS:
        raise BadInput(f"at most {MAX_RESOLVERS} resolvers")
    return found


# -- the ruleset as nftables JSON --------------------------------------------------------------


def _match(left: Any, right: Any, op: str = "==") -> Command:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, name: str) -> Command:
    return {"payload": {"protocol": protocol, "field": name}}


def _meta(key: str) -> Command:
    return {"meta": {"key": key}}


def _prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


_COUNTER: Final[Command] = {"counter": None}
_ACCEPT: Final[Command] = {"accept": None}
_DROP: Final[Command] = {"drop": None}
_POLICY_MARKED: Final[Command] = {"mangle": {"key": {"meta": {"key": "mark"}},
                                             "value": POLICY_MARK}}
DNS_CHAIN: Final = "c_dns"
OPEN_CHAIN: Final = "c_open"
"""Where an open-mode port jumps: marked as under its policy, and accepted."""
GUARD: Final[list[Command]] = [
    _match(_meta("iifname"), f"{IFNAME_PREFIX}*"),
    _match({"&": [_meta("mark"), MARK_MASK]}, MARK, "!="), _COUNTER, _DROP]
"""Any frame of a port with coi's name that no coi policy chain marked: dropped. Every
coi table's policy chain marks what it lets through, so one table's guard never drops
a port another table (a test's, another project's) holds the policy of."""


def chain_name(ifname: str) -> str:
    return f"p_{validate_ifname(ifname)}"


def set_name(ifname: str) -> str:
    return f"a_{validate_ifname(ifname)}"


def set_name6(ifname: str) -> str:
    return f"a6_{validate_ifname(ifname)}"


def answered_set(ifname: str, version: int = 4) -> str:
    """The set of addresses coi's resolver answered the container, each for its TTL."""
    return f"{'d' if version == 4 else 'd6'}_{validate_ifname(ifname)}"


def set_names(ifname: str) -> tuple[str, ...]:
    """Every allowlist set a container may have."""
    return (set_name(ifname), set_name6(ifname), answered_set(ifname), answered_set(ifname, 6))


@dataclass(frozen=True)
class Policy:
    """One container's egress policy as the rules need it. In allowlist mode
    `addresses` are the IPv4 addresses allowed (resolved and raw); blocked ones
    are filtered out again when the rules are built."""

    container: str
    ifname: str
    mode: str
    addresses: tuple[str, ...] = ()
    project: str = "default"


def _obj(family: str, table: str, **fields: Any) -> dict[str, Any]:
    return {"family": family, "table": table, **fields}


def base_commands(table: str, bridge: Bridge) -> list[Command]:
    """coi's tables, shared sets and base chains, made or refreshed idempotently.

    Base chains are flushed and refilled in the same transaction, so a change of
    the bridge (or of coi) heals itself and no packet ever sees a half chain.
    """
    v4 = [_prefix(n) for n in blocked_v4(bridge)]
    v6 = [_prefix(n) for n in blocked_v6(bridge)]
    cmds: list[Command] = []
    for family in ("bridge", "inet"):
        cmds += [
            {"add": {"table": {"family": family, "name": table}}},
            {"add": {"set": _obj(family, table, name="blocked4", type="ipv4_addr",
                                 flags=["interval"])}},
            {"flush": {"set": _obj(family, table, name="blocked4")}},
            {"add": {"element": _obj(family, table, name="blocked4", elem=v4)}},
            {"add": {"set": _obj(family, table, name="blocked6", type="ipv6_addr",
                                 flags=["interval"])}},
            {"flush": {"set": _obj(family, table, name="blocked6")}},
            {"add": {"element": _obj(family, table, name="blocked6", elem=v6)}},
        ]
    b = "bridge"
    cmds += [
        {"add": {"map": _obj(b, table, name="ports", type="ifname", map="verdict")}},
        {"add": {"set": _obj(b, table, name="filtered", type="ifname")}},
    ]
    marked = _match(_meta("mark"), MARK)
    chains: list[tuple[str, str, str, str, int, list[list[Command]]]] = [
        # A port with its policy jumps to it (open: to c_open), which marks what passes.
        (b, "c_pre", "filter", "prerouting", -200,
         [[{"vmap": {"key": _meta("iifname"), "data": "@ports"}}]]),
        # Any port with coi's name whose frames no policy marked: its policy is not in
        # force (yet), and nothing it sends passes.
        (b, "c_guard", "filter", "prerouting", GUARD_PRIORITY, [GUARD]),
        # Frames a filtered port sends straight to another port: container to container.
        (b, "c_fwd", "filter", "forward", -200,
         [[_match(_meta("iifname"), "@filtered"), _COUNTER, _DROP]]),
        # Before DNAT: any of the host's own addresses, broadcast and multicast.
        ("inet", "c_pre", "filter", "prerouting", -150,
         [[marked, _match({"fib": {"result": "type", "flags": ["daddr"]}},
                          {"set": ["local", "broadcast", "multicast"]}), _COUNTER, _DROP]]),
        ("inet", "c_in", "filter", "input", -150, [[marked, _COUNTER, _DROP]]),
        # After DNAT: a rewrite to a private address is still refused.
        ("inet", "c_fwd", "filter", "forward", -150,
         [[marked, _match(_payload("ip", "daddr"), "@blocked4"), _COUNTER, _DROP],
          [marked, _match(_payload("ip6", "daddr"), "@blocked6"), _COUNTER, _DROP]]),
        # An allowlist container's DNS to the bridge (this table's DNS mark) goes to
        # coi's resolver on the bridge, never to the bridge's dnsmasq.
        ("inet", DNS_CHAIN, "nat", "prerouting", -100,
         [[_match(_meta("mark"), dns_mark(table)),
           _match(_meta("l4proto"), {"set": ["udp", "tcp"]}),
           _match(_payload("th", "dport"), 53), {"redirect": {"port": dns_port(table)}}]]),
    ]
    cmds += [{"add": {"chain": _obj(b, table, name=OPEN_CHAIN)}},
             {"flush": {"chain": _obj(b, table, name=OPEN_CHAIN)}},
             {"add": {"rule": _obj(b, table, chain=OPEN_CHAIN, expr=[_POLICY_MARKED, _ACCEPT])}}]
    for family, name, kind, hook, prio, rules in chains:
        cmds += [
            {"add": {"chain": _obj(family, table, name=name, type=kind, hook=hook,
                                   prio=prio, policy="accept")}},
            {"flush": {"chain": _obj(family, table, name=name)}},
        ]
        cmds += [{"add": {"rule": _obj(family, table, chain=name, expr=expr)}}
                 for expr in rules]
    return cmds


def container_rules(policy: Policy, bridge: Bridge, table: str) -> list[list[Command]]:
    """The rule expressions of a container's chain in `table`, in order (restricted or
    allowlist: its DNS to the bridge then carries the table's DNS mark, which sends it
    to coi's resolver)."""
    mode = validate_mode(policy.mode)
    if mode == "open":
        raise ValueError("open mode has no rules")
    gw4 = str(bridge.ipv4.ip)
    ether_type = _payload("ether", "type")
    udp_dport, tcp_dport = _payload("udp", "dport"), _payload("tcp", "dport")
    daddr4, daddr6 = _payload("ip", "daddr"), _payload("ip6", "daddr")
    dns = [_ACCEPT] if mode == "restricted" else [
        {"mangle": {"key": _meta("mark"), "value": dns_mark(table)}}, _ACCEPT]
    rules: list[list[Command]] = [[_POLICY_MARKED], [_match(ether_type, "arp"), _ACCEPT]]
    if bridge.ipv6 is None:
        rules.append([_match(ether_type, "ip", "!="), _COUNTER, _DROP])
    else:
        rules.append([_match(ether_type, {"set": ["ip", "ip6"]}, "!="), _COUNTER, _DROP])
    rules += [
        [_match(daddr4, {"set": ["255.255.255.255", gw4]}), _match(_payload("udp", "sport"), 68),
         _match(udp_dport, 67), _ACCEPT],
        [_match(daddr4, gw4), _match(udp_dport, 53), *dns],
        [_match(daddr4, gw4), _match(tcp_dport, 53), *dns],
    ]
    if bridge.ipv6 is not None:
        gw6 = str(bridge.ipv6.ip)
        rules += [
            [_match(_payload("icmpv6", "type"), {"set": list(ND_TYPES)}), _ACCEPT],
            [_match(daddr6, "ff02::1:2"), _match(udp_dport, 547), _ACCEPT],
            [_match(daddr6, gw6), _match(udp_dport, 53), *dns],
            [_match(daddr6, gw6), _match(tcp_dport, 53), *dns],
        ]
    rules += [
        [{"mangle": {"key": _meta("mark"), "value": MARK}}],
        [_match(daddr4, "@blocked4"), _COUNTER, _DROP],
    ]
    if bridge.ipv6 is not None:
        rules.append([_match(daddr6, "@blocked6"), _COUNTER, _DROP])
    if mode == "restricted":
        rules.append([_ACCEPT])
    else:
        rules += [[_match(daddr4, f"@{set_name(policy.ifname)}"), _ACCEPT],
                  [_match(daddr4, f"@{answered_set(policy.ifname)}"), _ACCEPT]]
        if bridge.ipv6 is not None:
            rules += [[_match(daddr6, f"@{set_name6(policy.ifname)}"), _ACCEPT],
                      [_match(daddr6, f"@{answered_set(policy.ifname, 6)}"), _ACCEPT]]
        rules.append([_COUNTER, _DROP])
    return rules


def allowed_elements(policy: Policy, bridge: Bridge) -> list[str]:
    """The allowlist's addresses: unique, IPv4 then IPv6 (only when the bridge has IPv6:
    without it no IPv6 leaves), sorted, never a blocked address."""
    unique = {str(ipaddress.ip_address(a)) for a in policy.addresses}
    return sorted((a for a in unique if not is_blocked(a, bridge)
                   and (":" not in a or bridge.ipv6 is not None)), key=address_key)


def _allowlist_sets(policy: Policy, bridge: Bridge) -> list[tuple[str, str, list[str]]]:
    """(set, type, elements) of each allowlist set the container has: IPv4, and IPv6
    when the bridge has it."""
    elements = allowed_elements(policy, bridge)
    sets = [(set_name(policy.ifname), "ipv4_addr", [a for a in elements if ":" not in a])]
    if bridge.ipv6 is not None:
        sets.append((set_name6(policy.ifname), "ipv6_addr", [a for a in elements if ":" in a]))
    return sets


@dataclass(frozen=True)
class Existing:
    """What coi's bridge table holds now, as far as the commands need to know."""

    chains: frozenset[str] = frozenset()
    sets: frozenset[str] = frozenset()
    ports: frozenset[str] = frozenset()
    filtered: frozenset[str] = frozenset()
    rules: Mapping[str, int] = field(default_factory=dict)
    dropped: Mapping[str, int] = field(default_factory=dict)
    elements: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    comments: Mapping[str, str] = field(default_factory=dict)
    guarded: bool = False
    """Whether the drop of coi-named ports without a policy is in place (base_commands)."""

    @classmethod
    def from_listing(cls, items: Iterable[Mapping[str, Any]]) -> Existing:
        """From `nft -j list table bridge coi` items (metainfo dropped or not)."""
        chains, sets, ports, filtered = set(), set(), set(), set()
        rules: dict[str, int] = {}
        dropped: dict[str, int] = {}
        elements: dict[str, tuple[str, ...]] = {}
        comments: dict[str, str] = {}
        for item in items:
            if "chain" in item:
                chains.add(item["chain"]["name"])
            elif "set" in item:
                name = item["set"]["name"]
                sets.add(name)
                elems = tuple(_element(e) for e in item["set"].get("elem") or []
                              if isinstance(e, str) or _element(e))
                elements[name] = elems
                if name == "filtered":
                    filtered.update(elems)
            elif "map" in item and item["map"]["name"] == "ports":
                for elem in item["map"].get("elem") or []:
                    if isinstance(elem, list) and elem and isinstance(elem[0], str):
                        ports.add(elem[0])
            elif "rule" in item:
                rule = item["rule"]
                chain = rule["chain"]
                rules[chain] = rules.get(chain, 0) + 1
                if rule.get("comment") and chain not in comments:
                    comments[chain] = str(rule["comment"])
                for expr in rule.get("expr") or []:
                    counter = expr.get("counter") if isinstance(expr, dict) else None
                    if isinstance(counter, dict) and any("drop" in e for e in rule["expr"]):
                        dropped[chain] = dropped.get(chain, 0) + int(counter.get("packets", 0))
        return cls(frozenset(chains), frozenset(sets), frozenset(ports), frozenset(filtered),
                   rules, dropped, elements, comments, rules.get("c_guard", 0) > 0)

    def policy(self, ifname: str) -> str:
        """`in_force` (its port jumps to its rules, or is accepted: open), `blocked` (no
        policy, and the guard drops its traffic) or `missing` (no policy, no guard)."""
        return "in_force" if ifname in self.ports else "blocked" if self.guarded else "missing"

    def has(self, ifname: str) -> bool:
        """True when any object of this interface is in the table."""
        return (ifname in self.ports or ifname in self.filtered
                or chain_name(ifname) in self.chains
                or any(s in self.sets for s in set_names(ifname)))

    def ifnames(self) -> set[str]:
        """Every interface the table holds something for."""
        found = set(self.ports) | set(self.filtered)
        found |= {c[2:] for c in self.chains if c.startswith("p_")}
        found |= {s.split("_", 1)[1] for s in self.sets
                  if s.startswith(("a_", "a6_", "d_", "d6_"))}
        return {name for name in found if IFNAME_PATTERN.fullmatch(name)}


def _element(elem: Any) -> str:
    """A set element as listed: an address, or {"elem": {"val": ADDRESS, "timeout":
    ..., "expires": ...}} in a set with timeouts ("" for anything else)."""
    if isinstance(elem, str):
        return elem
    value = elem.get("elem", {}).get("val") if isinstance(elem, dict) else None
    return value if isinstance(value, str) else ""


# -- the start hook ------------------------------------------------------------------------


START_HOOK_KEY: Final = "lxc.hook.start-host"
START_HOOK_NAME: Final = "coi-net-hook"
_HOOK_PATH: Final = re.compile(r"/[A-Za-z0-9._/-]{1,200}")
"""Paths in the hook's line: plain characters only, since LXC splits it at spaces."""


def start_hook_line(hook: str, *, table: str, ifname: str, container: str, project: str,
                    state_dir: str) -> str:
    """The raw.lxc line that makes LXC run coi-net-hook before the container's init
    (start-host-hook.sh): every word checked, none can hold a space or a newline."""
    for what, path in (("hook", hook), ("state directory", state_dir)):
        if not _HOOK_PATH.fullmatch(path) or "/../" in f"{path}/":
            raise BadInput(f"coi-net's {what} {path!r} cannot go into a start hook: "
                           "plain absolute paths only")
    if not TABLE_PATTERN.fullmatch(table):
        raise BadInput(f"{table!r} is not a coi table name")
    words = (hook, table, validate_ifname(ifname), validate_container_name(container),
             validate_project(project), state_dir)
    return f"{START_HOOK_KEY} = {' '.join(words)}"


def with_start_hook(raw_lxc: str, line: str) -> str:
    """A container's raw.lxc with coi's start hook `line`, in place of any it had; the
    user's own lines stay as they are."""
    kept = [text for text in raw_lxc.splitlines() if not _is_start_hook(text)]
    return "\n".join([*kept, line]) + "\n"


def _is_start_hook(text: str) -> bool:
    key, _, value = text.partition("=")
    words = value.split()
    return key.strip() == START_HOOK_KEY and bool(words) and \
        words[0].rsplit("/", 1)[-1] == START_HOOK_NAME


def comment_for(project: str, container: str) -> str:
    """The comment on a container's first rule: whose rules these are, for gc."""
    return f"coi:{project}/{container}"


def container_commands(table: str, policy: Policy, bridge: Bridge,
                       existing: Existing) -> list[Command]:
    """Replace one container's rules (in open mode: its port jumps to c_open) in one go.

    Whatever an earlier container with the same interface left (rules, allowed
    addresses) is flushed in the same transaction, so nothing is inherited.
    """
    if validate_mode(policy.mode) == "open":  # in force, unfiltered: c_open
        return [*removal_commands(table, policy.ifname, existing),
                {"add": {"element": _obj("bridge", table, name="ports",
                                         elem=[[policy.ifname,
                                                {"jump": {"target": OPEN_CHAIN}}]])}}]
    b = "bridge"
    chain = chain_name(policy.ifname)
    cmds: list[Command] = [
        {"add": {"chain": _obj(b, table, name=chain)}},
        {"flush": {"chain": _obj(b, table, name=chain)}},
    ]
    kept: set[str] = set()
    if policy.mode == "allowlist":
        for aset, kind, elements in _allowlist_sets(policy, bridge):
            kept.add(aset)
            cmds += [{"add": {"set": _obj(b, table, name=aset, type=kind)}},
                     {"flush": {"set": _obj(b, table, name=aset)}}]
            if elements:
                cmds.append({"add": {"element": _obj(b, table, name=aset, elem=elements)}})
        # What the resolver answered under an earlier policy goes too.
        for aset, kind in _answered_sets(policy.ifname, bridge):
            kept.add(aset)
            cmds += [{"add": {"set": _obj(b, table, name=aset, type=kind, flags=["timeout"])}},
                     {"flush": {"set": _obj(b, table, name=aset)}}]
    for number, expr in enumerate(container_rules(policy, bridge, table)):
        rule = _obj(b, table, chain=chain, expr=expr)
        if number == 0:
            rule["comment"] = comment_for(policy.project, policy.container)
        cmds.append({"add": {"rule": rule}})
    for aset in set_names(policy.ifname):
        if aset in existing.sets and aset not in kept:
            cmds.append({"delete": {"set": _obj(b, table, name=aset)}})
    cmds += [
        {"add": {"element": _obj(b, table, name="ports",
                                 elem=[[policy.ifname, {"jump": {"target": chain}}]])}},
        {"add": {"element": _obj(b, table, name="filtered", elem=[policy.ifname])}},
    ]
    return cmds


def removal_commands(table: str, ifname: str, existing: Existing) -> list[Command]:
    """Delete everything of one interface that exists (and nothing that does not,
    since deleting a missing object fails the whole transaction)."""
    b = "bridge"
    chain = chain_name(ifname)
    cmds: list[Command] = []
    if ifname in existing.ports:
        cmds.append({"delete": {"element": _obj(b, table, name="ports", elem=[ifname])}})
    if ifname in existing.filtered:
        cmds.append({"delete": {"element": _obj(b, table, name="filtered", elem=[ifname])}})
    if chain in existing.chains:
        cmds += [{"flush": {"chain": _obj(b, table, name=chain)}},
                 {"delete": {"chain": _obj(b, table, name=chain)}}]
    for aset in set_names(ifname):
        if aset in existing.sets:
            cmds.append({"delete": {"set": _obj(b, table, name=aset)}})
    return cmds


def set_refill_commands(table: str, policy: Policy, bridge: Bridge) -> list[Command]:
    """Replace the allowlist sets' elements: flush and refill (part of one transaction)."""
    cmds: list[Command] = []
    for aset, _kind, elements in _allowlist_sets(policy, bridge):
        cmds.append({"flush": {"set": _obj("bridge", table, name=aset)}})
        if elements:
            cmds.append({"add": {"element": _obj("bridge", table, name=aset, elem=elements)}})
    return cmds


def _answered_sets(ifname: str, bridge: Bridge) -> list[tuple[str, str]]:
    """(set, type) of the resolver's sets of a container: IPv4, IPv6 with the bridge's."""
    found = [(answered_set(ifname), "ipv4_addr")]
    if bridge.ipv6 is not None:
        found.append((answered_set(ifname, 6), "ipv6_addr"))
    return found


def answered_commands(table: str, ifname: str, bridge: Bridge,
                      lifetimes: Mapping[str, int]) -> list[Command]:
    """Put each answered address into the container's resolver sets for its lifetime
    (seconds), replacing any shorter one: add (so the delete cannot fail), delete, add
    with the timeout; one transaction for them all. IPv6 only with the bridge's."""
    cmds: list[Command] = []
    for address, seconds in sorted(lifetimes.items(), key=lambda item: address_key(item[0])):
        version = ipaddress.ip_address(address).version
        if is_blocked(address, bridge) or (version == 6 and bridge.ipv6 is None):
            continue
        where = _obj("bridge", table, name=answered_set(ifname, version))
        cmds += [{"add": {"element": {**where, "elem": [address]}}},
                 {"delete": {"element": {**where, "elem": [address]}}},
                 {"add": {"element": {**where, "elem": [
                     {"elem": {"val": address, "timeout": max(1, int(seconds))}}]}}}]
    return cmds


# -- resolution ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """One name's answer: status ok, nxdomain, no_answer or failed."""

    name: str
    status: str
    addresses: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    expires: float = 0.0
    error: str = ""


def resolve(names: Sequence[str], resolvers: Sequence[Resolver], *, bridge: Bridge,
            timeout: float = DEFAULT_DNS_TIMEOUT, now: float | None = None) -> dict[str, Lookup]:
    """A (and, when the bridge has IPv6, AAAA) records of every name, asked concurrently,
    each within `timeout` seconds.

    Private answers are split off into `blocked` (DNS rebinding). `expires` is
    the answer's own expiration (the lowest TTL along a CNAME chain), not the
    A record's TTL. A failure is reported per name; nothing raises.
    """
    if not names:
        return {}
    import asyncio  # noqa: PLC0415 - only allowlists resolve

    return asyncio.run(_resolve_all(list(names), list(resolvers), bridge, timeout,
                                    time.time() if now is None else now))


async def _resolve_all(names: list[str], resolvers: list[Resolver], bridge: Bridge,
                       timeout: float, now: float) -> dict[str, Lookup]:
    import asyncio  # noqa: PLC0415

    import dns.asyncresolver  # noqa: PLC0415 - ~150 ms, allowlists only
    import dns.nameserver  # noqa: PLC0415

    try:
        resolver = dns.asyncresolver.Resolver(configure=not resolvers)
    except Exception as exc:  # no resolv.conf: every name fails, reported
        return {n: Lookup(n, "failed", expires=now, error=f"no resolver: {exc}") for n in names}
    if resolvers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(r.address, r.port)
                                for r in resolvers]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None
    results = await asyncio.gather(*(_resolve_one(resolver, n, bridge, timeout, now)
                                     for n in names))
    return {lookup.name: lookup for lookup in results}


async def _resolve_one(resolver: Any, name: str, bridge: Bridge, timeout: float,
                       now: float) -> Lookup:
    """A records, and AAAA too when the bridge has IPv6, asked at once."""
    import asyncio  # noqa: PLC0415

    kinds = ("A", "AAAA") if bridge.ipv6 is not None else ("A",)
    answers = await asyncio.gather(*(_ask(resolver, name, kind, timeout) for kind in kinds))
    return _combined(name, answers, bridge, now)


async def _ask(resolver: Any, name: str, kind: str, timeout: float) -> tuple[str, Any]:
    """(outcome, answer or error text) of one query: ok, nxdomain, no_answer or failed."""
    import dns.exception  # noqa: PLC0415
    import dns.resolver  # noqa: PLC0415

    try:
        return "ok", await resolver.resolve(name, kind, lifetime=timeout, search=False)
    except dns.resolver.NXDOMAIN:
        return "nxdomain", None
    except dns.resolver.NoAnswer:
        return "no_answer", None
    except dns.exception.Timeout:
        return "failed", f"no answer within {timeout:g} s"
    except dns.exception.DNSException as exc:
        return "failed", str(exc).split(":")[0][:200]


def _combined(name: str, answers: Sequence[tuple[str, Any]], bridge: Bridge,
              now: float) -> Lookup:
    """One name's lookup from its answers: any failure fails it (its cached addresses
    stay), NXDOMAIN ends it, else the addresses of every answer, expiring with the
    first of them."""
    failure = next((value for outcome, value in answers if outcome == "failed"), None)
    if failure is not None:
        return Lookup(name, "failed", expires=now, error=failure)
    if any(outcome == "nxdomain" for outcome, _ in answers):
        return Lookup(name, "nxdomain", expires=now + NEGATIVE_RETRY)
    got = [answer for outcome, answer in answers if outcome == "ok"]
    if not got:
        return Lookup(name, "no_answer", expires=now + NEGATIVE_RETRY)
    found = sorted({str(r.address) for answer in got for r in answer.rrset or []},
                   key=address_key)
    public = tuple(a for a in found if not is_blocked(a, bridge))
    blocked = tuple(a for a in found if is_blocked(a, bridge))
    return Lookup(name, "ok", public, blocked, min(float(a.expiration) for a in got))


# -- the per-container state and cache --------------------------------------------------------


STATE_VERSION: Final = 1


def name_entry(lookup: Lookup, previous: Mapping[str, Any] | None, now: float) -> dict[str, Any]:
    """A name's cache entry after a lookup: a failure keeps the cached addresses;
    NXDOMAIN and 'no A record' remove them."""
    if lookup.status == "failed":
        kept = list((previous or {}).get("addresses") or [])
        return {"addresses": kept, "blocked": list((previous or {}).get("blocked") or []),
                "status": "failed", "error": lookup.error,
                "resolved_at": (previous or {}).get("resolved_at"),
                "expires": lookup.expires, "failed_at": now}
    return {"addresses": list(lookup.addresses), "blocked": list(lookup.blocked),
            "status": lookup.status, "error": "", "resolved_at": now,
            "expires": lookup.expires}


def due_names(state: Mapping[str, Any], now: float) -> list[str]:
    """Names whose answer has expired, or is older than the refresh interval."""
    interval = int(state.get("refresh_interval_minutes") or 0) * 60
    due = []
    for name in state.get("allowed_names") or []:
        entry = (state.get("names") or {}).get(name)
        if entry is None:
            due.append(name)
            continue
        expires = float(entry.get("expires") or 0)
        resolved = entry.get("resolved_at")
        too_old = interval > 0 and resolved is not None and now >= float(resolved) + interval
        if now >= expires or too_old:
            due.append(name)
    return due


def state_addresses(state: Mapping[str, Any]) -> tuple[str, ...]:
    """Every address in force for a state: raw ones plus each name's cached ones."""
    found: set[str] = set(state.get("allowed_addresses") or [])
    names = state.get("names") or {}
    for name in state.get("allowed_names") or []:
        found.update((names.get(name) or {}).get("addresses") or [])
    return tuple(sorted(found, key=address_key))


def next_refresh(state: Mapping[str, Any]) -> float | None:
    """When the earliest name falls due (None: no names, or automatic refresh off)."""
    interval = int(state.get("refresh_interval_minutes") or 0) * 60
    if not interval or not state.get("allowed_names"):
        return None
    times = []
    for name in state.get("allowed_names") or []:
        entry = (state.get("names") or {}).get(name) or {}
        moments = [float(entry.get("expires") or 0)]
        if entry.get("resolved_at") is not None:
            moments.append(float(entry["resolved_at"]) + interval)
        times.append(min(moments))
    return min(times)


class Store:
    """The per-container state files, one JSON file per container, written atomically
    (temp file + fsync + rename) under one lock (flock)."""

    def __init__(self, directory: str, project: str = "default") -> None:
        self.root = directory
        self.project = validate_project(project)
        self.directory = os.path.join(directory, project)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with locks.private(self.root, ".lock", timeout=LOCK_SECONDS,
                           what="coi-net's state", mode=0o755):
            yield

    def path(self, container: str) -> str:
        return os.path.join(self.directory, f"{validate_container_name(container)}.json")

    def load(self, container: str) -> dict[str, Any] | None:
        try:
            with open(self.path(container), encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInput(f"state of {container} is unreadable ({exc}); "
                           f"remove {self.path(container)}") from None
        if not isinstance(data, dict) or data.get("container") != container:
            raise BadInput(f"state file {self.path(container)} is not coi's")
        if int(data.get("version") or 0) > STATE_VERSION:
            raise BadInput(f"state of {container} was written by a newer coi",
                           hint="upgrade coi")
        return data

    def save(self, container: str, state: Mapping[str, Any]) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        target = self.path(container)
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"version": STATE_VERSION, **state}, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temp, 0o644)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    def delete(self, container: str) -> bool:
        try:
            os.unlink(self.path(container))
        except FileNotFoundError:
            return False
        return True

    def containers(self) -> list[str]:
        """Every container with a state file, sorted."""
        try:
            files = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        names = []
        for file in files:
            if file.endswith(".json") and not file.startswith("."):
                with contextlib.suppress(BadInput):
                    names.append(validate_container_name(file[:-5]))
        return sorted(names)
