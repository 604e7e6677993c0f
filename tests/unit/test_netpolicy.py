"""coi_net.policy and coi_net.nft without touching the system.

The rules are checked two ways: their JSON shape, and what they DO, by a
small evaluator of exactly the expressions netpolicy emits, run over
packets a hostile container could send. DNS resolution runs against a
dnspython server this test starts on 127.0.0.1 (a test host of its own).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
from collections.abc import Mapping
from types import SimpleNamespace

import pytest

import coi_net
from coi_common import config
from coi_common.errors import BadInput, CoiError
from coi_net import nft
from coi_net import policy as np
from zone_server import SILENT, ZONE

BRIDGE = np.Bridge("coibr0", ipaddress.IPv4Interface("10.151.43.1/24"))
BRIDGE6 = np.Bridge("coibr0", ipaddress.IPv4Interface("10.151.43.1/24"),
                    ipaddress.IPv6Interface("2001:db8:43::1/64"))
TABLE = "coi_test_unit"
NAME = "coi-3f2a9c1b-1"
IFNAME = np.host_name_for(NAME)


# -- a tiny evaluator of the rules netpolicy builds ----------------------------------------


def sets_of(commands: list[dict]) -> dict[str, list]:
    """Set name -> elements, from the `add element` commands of a transaction."""
    found: dict[str, list] = {}
    for command in commands:
        element = command.get("add", {}).get("element")
        if element and element["family"] == "bridge":
            found.setdefault(element["name"], []).extend(element["elem"])
        flushed = command.get("flush", {}).get("set")
        if flushed and flushed["family"] == "bridge":
            found[flushed["name"]] = []
    return found


def _same(value, item) -> bool:
    if isinstance(item, dict) and "prefix" in item:
        net = ipaddress.ip_network(f"{item['prefix']['addr']}/{item['prefix']['len']}")
        try:
            return ipaddress.ip_address(value) in net
        except ValueError:
            return False
    if isinstance(item, str) and isinstance(value, str):
        try:
            return ipaddress.ip_address(value) == ipaddress.ip_address(item)
        except ValueError:
            return value == item
    return value == item


def _matches(match: dict, packet: Mapping, sets: Mapping[str, list]) -> bool:
    left, mask = match["left"], None
    if "&" in left:  # `meta mark & MASK`: an unmarked packet's mark is 0
        left, mask = left["&"]
        packet = {"meta.mark": 0, **packet}
    if "payload" in left:
        key = f"{left['payload']['protocol']}.{left['payload']['field']}"
    else:
        key = f"meta.{left['meta']['key']}"
    if key not in packet:
        return False  # nft's implicit dependency: `udp dport` never matches a TCP packet
    right = match["right"]
    if mask is not None:
        return (packet[key] & mask == right) == (match["op"] == "==")
    if isinstance(right, str) and right.endswith("*"):  # an interface name wildcard
        return packet[key].startswith(right[:-1]) == (match["op"] == "==")
    if isinstance(right, str) and right.startswith("@"):
        candidates = sets.get(right[1:], [])
    elif isinstance(right, dict) and "set" in right:
        candidates = right["set"]
    else:
        candidates = [right]
    hit = any(_same(packet[key], item) for item in candidates)
    return hit if match["op"] == "==" else not hit


def verdict(rules: list[list[dict]], packet: Mapping, sets: Mapping[str, list]) -> str:
    """accept, drop, or continue (end of chain) for one packet; marks it on the way."""
    packet = dict(packet)
    for exprs in rules:
        for expr in exprs:
            if "match" in expr:
                if not _matches(expr["match"], packet, sets):
                    break
            elif "mangle" in expr:
                packet["meta.mark"] = expr["mangle"]["value"]
            elif "accept" in expr:
                return "accept"
            elif "drop" in expr:
                return "drop"
    return "continue"


def ip4(daddr: str, proto: str = "tcp", dport: int = 443, sport: int = 40000) -> dict:
    return {"ether.type": "ip", "ip.daddr": daddr, f"{proto}.dport": dport,
            f"{proto}.sport": sport}


def ip6(daddr: str, proto: str = "tcp", dport: int = 443, **extra) -> dict:
    return {"ether.type": "ip6", "ip6.daddr": daddr, f"{proto}.dport": dport, **extra}


def decide(mode: str, packet: Mapping, *, bridge: np.Bridge = BRIDGE,
           addresses: tuple[str, ...] = ()) -> str:
    policy = np.Policy(NAME, IFNAME, mode, addresses)
    commands = np.base_commands(TABLE, bridge) + np.container_commands(
        TABLE, policy, bridge, np.Existing())
    return verdict(np.container_rules(policy, bridge, TABLE), packet, sets_of(commands))


# -- what the rules do ---------------------------------------------------------------------


@pytest.mark.parametrize("daddr", ["10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
                                   "169.254.169.254", "100.64.0.1", "127.0.0.1", "0.0.0.0",
                                   "224.0.0.251", "255.255.255.255", "10.151.43.1",
                                   "10.151.43.77", "10.151.43.255"])
@pytest.mark.parametrize("mode", ["restricted", "allowlist"])
def test_private_link_local_cgnat_host_and_container_destinations_are_dropped(mode, daddr):
    assert decide(mode, ip4(daddr), addresses=(daddr,)) == "drop"


@pytest.mark.parametrize("daddr", ["198.51.100.10", "140.82.121.4", "172.32.0.1",
                                   "100.128.0.1", "192.169.0.1", "11.0.0.1"])
def test_restricted_lets_every_public_address_out(daddr):
    assert decide("restricted", ip4(daddr)) == "accept"


def test_restricted_marks_what_it_lets_out_so_the_inet_table_can_drop_host_addresses():
    policy = np.Policy(NAME, IFNAME, "restricted")
    rules = np.container_rules(policy, BRIDGE, TABLE)
    mark = next(i for i, r in enumerate(rules) if r[0].get("mangle", {}).get("value") == np.MARK)
    final = len(rules) - 1
    assert rules[mark][0]["mangle"]["value"] == np.MARK
    assert mark < final
    assert rules[final] == [{"accept": None}]


def test_allowlist_lets_out_only_its_addresses():
    allowed = ("198.51.100.10",)
    assert decide("allowlist", ip4("198.51.100.10"), addresses=allowed) == "accept"
    assert decide("allowlist", ip4("198.51.100.20"), addresses=allowed) == "drop"
    assert decide("allowlist", ip4("8.8.8.8", "udp", 53), addresses=allowed) == "drop"


def test_an_allowlist_never_holds_a_private_address_even_when_given_one():
    policy = np.Policy(NAME, IFNAME, "allowlist", ("10.77.0.2", "198.51.100.10", "10.151.43.9"))
    assert np.allowed_elements(policy, BRIDGE) == ["198.51.100.10"]
    assert decide("allowlist", ip4("10.77.0.2"), addresses=policy.addresses) == "drop"


@pytest.mark.parametrize("mode", ["restricted", "allowlist"])
def test_dns_and_dhcp_to_the_bridge_pass_but_nothing_else_on_the_host(mode):
    assert decide(mode, ip4("10.151.43.1", "udp", 53)) == "accept"
    assert decide(mode, ip4("10.151.43.1", "tcp", 53)) == "accept"
    assert decide(mode, ip4("255.255.255.255", "udp", 67, 68)) == "accept"
    assert decide(mode, ip4("10.151.43.1", "udp", 67, 68)) == "accept"
    assert decide(mode, ip4("10.151.43.1", "tcp", 22)) == "drop"
    assert decide(mode, ip4("10.151.43.1", "udp", 67, 5353)) == "drop"
    assert decide(mode, ip4("10.151.43.2", "udp", 53)) == "drop"
    assert decide(mode, {"ether.type": "arp"}) == "accept"


@pytest.mark.parametrize("mode", ["restricted", "allowlist"])
def test_dns_and_dhcp_pass_without_mark_and_everything_else_is_marked(mode):
    policy = np.Policy(NAME, IFNAME, mode)
    rules = np.container_rules(policy, BRIDGE, TABLE)
    mark = next(i for i, r in enumerate(rules) if r[0].get("mangle", {}).get("value") == np.MARK)
    for packet in (ip4("10.151.43.1", "udp", 53), ip4("255.255.255.255", "udp", 67, 68)):
        assert verdict(rules[:mark], packet, {}) == "accept"


@pytest.mark.parametrize("ether", ["ip6", "vlan", "8021q", "0x88cc"])
def test_without_ipv6_on_the_bridge_every_non_ipv4_frame_but_arp_is_dropped(ether):
    assert decide("restricted", {"ether.type": ether, "ip6.daddr": "2001:db8::1"}) == "drop"


def test_with_ipv6_on_the_bridge_public_v6_passes_and_ula_link_local_do_not():
    assert decide("restricted", ip6("2606:4700::1"), bridge=BRIDGE6) == "accept"
    for daddr in ("fd00::1", "fe80::1", "::1", "::ffff:10.0.0.1", "64:ff9b::a00:1",
                  "2002:a00:1::1", "2001:db8:43::1", "ff02::1"):
        assert decide("restricted", ip6(daddr), bridge=BRIDGE6) == "drop", daddr
    neighbour = ip6("fe80::1", "udp", 1, **{"icmpv6.type": "nd-neighbor-solicit"})
    assert decide("restricted", neighbour, bridge=BRIDGE6) == "accept"
    assert decide("restricted", ip6("2001:db8:43::1", "udp", 53), bridge=BRIDGE6) == "accept"
    assert decide("allowlist", ip6("2606:4700::1"), bridge=BRIDGE6) == "drop"


def test_an_ipv6_allowlist_passes_its_addresses_and_nothing_else_when_the_bridge_has_ipv6():
    allowed = ("2606:4700::1111", "198.51.100.10")
    assert decide("allowlist", ip6("2606:4700::1111"), bridge=BRIDGE6,
                  addresses=allowed) == "accept"
    assert decide("allowlist", ip4("198.51.100.10"), bridge=BRIDGE6,
                  addresses=allowed) == "accept"
    for daddr in ("2606:4700::1112", "fd00::1"):
        assert decide("allowlist", ip6(daddr), bridge=BRIDGE6, addresses=allowed) == "drop"
    # An allowed ULA (a rebinding answer kept in a cache) is never an element.
    policy = np.Policy(NAME, IFNAME, "allowlist", ("fd00::1", *allowed))
    sets = sets_of(np.container_commands(TABLE, policy, BRIDGE6, np.Existing()))
    assert sets[np.set_name6(IFNAME)] == ["2606:4700::1111"]
    assert sets[np.set_name(IFNAME)] == ["198.51.100.10"]


def test_without_ipv6_on_the_bridge_an_allowlist_has_no_ipv6_set():
    policy = np.Policy(NAME, IFNAME, "allowlist", ("2606:4700::1111", "198.51.100.10"))
    commands = np.container_commands(TABLE, policy, BRIDGE, np.Existing())
    assert np.set_name6(IFNAME) not in sets_of(commands)
    assert np.allowed_elements(policy, BRIDGE) == ["198.51.100.10"]
    had = np.Existing(sets=frozenset({np.set_name(IFNAME), np.set_name6(IFNAME)}))
    deletes = [c["delete"]["set"]["name"] for c in
               np.container_commands(TABLE, policy, BRIDGE, had) if "delete" in c]
    assert deletes == [np.set_name6(IFNAME)]


def _answer(addresses: list[str], expiration: float) -> SimpleNamespace:
    """What dnspython's resolve() answers, as far as coi-net reads it."""
    return SimpleNamespace(rrset=[SimpleNamespace(address=a) for a in addresses],
                           expiration=expiration)


def test_a_and_aaaa_answers_combine_and_expire_with_the_first():
    lookup = np._combined("x.example", [("ok", _answer(["198.51.100.10", "10.0.0.9"], 50.0)),
                                        ("ok", _answer(["2606:4700::1", "fd00::7"], 20.0))],
                          BRIDGE6, now=0.0)
    assert (lookup.status, lookup.addresses) == ("ok", ("198.51.100.10", "2606:4700::1"))
    assert lookup.blocked == ("10.0.0.9", "fd00::7")
    assert lookup.expires == 20.0
    only_a = np._combined("x.example", [("ok", _answer(["198.51.100.10"], 50.0)),
                                        ("no_answer", None)], BRIDGE6, now=0.0)
    assert only_a.addresses == ("198.51.100.10",)
    failed = np._combined("x.example", [("ok", _answer(["198.51.100.10"], 50.0)),
                                        ("failed", "no answer within 2 s")], BRIDGE6, now=0.0)
    assert (failed.status, failed.error) == ("failed", "no answer within 2 s")
    assert np._combined("x.example", [("nxdomain", None), ("nxdomain", None)], BRIDGE6,
                        now=0.0).status == "nxdomain"


# -- the commands --------------------------------------------------------------------------


def test_every_command_is_about_coi_s_own_table_only():
    policy = np.Policy(NAME, IFNAME, "allowlist", ("198.51.100.10",))
    commands = (np.base_commands(TABLE, BRIDGE6)
                + np.container_commands(TABLE, policy, BRIDGE6, np.Existing())
                + np.removal_commands(TABLE, IFNAME, np.Existing(
                    chains=frozenset({np.chain_name(IFNAME)}))))
    nft.check_ours(commands, TABLE)
    with pytest.raises(BadInput):
        nft.check_ours(commands, "coi_test_other")


def test_base_chains_hook_bridge_prerouting_and_forward_and_inet_before_dnat():
    commands = np.base_commands(TABLE, BRIDGE)
    chains = {(c["add"]["chain"]["family"], c["add"]["chain"]["name"]):
              (c["add"]["chain"]["type"], c["add"]["chain"]["hook"], c["add"]["chain"]["prio"])
              for c in commands if "hook" in c.get("add", {}).get("chain", {})}
    assert chains == {("bridge", "c_pre"): ("filter", "prerouting", -200),
                      ("bridge", "c_guard"): ("filter", "prerouting", -190),
                      ("bridge", "c_fwd"): ("filter", "forward", -200),
                      ("inet", "c_pre"): ("filter", "prerouting", -150),
                      ("inet", "c_in"): ("filter", "input", -150),
                      ("inet", "c_fwd"): ("filter", "forward", -150),
                      ("inet", "c_dns"): ("nat", "prerouting", -100)}
    flushed = [c["flush"]["chain"]["name"] for c in commands if "chain" in c.get("flush", {})]
    assert len(flushed) == 8  # base rules (and c_open's) are refilled, never duplicated


def test_blocked_ranges_hold_the_bridge_subnet_without_overlaps():
    public_bridge = np.Bridge("br", ipaddress.IPv4Interface("198.18.7.1/24"))
    nets = np.blocked_v4(public_bridge)
    assert ipaddress.IPv4Network("198.18.7.0/24") in nets
    assert np.blocked_v4(BRIDGE) == sorted(np.blocked_v4(BRIDGE))
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])
    assert np.is_blocked("198.18.7.9", public_bridge)
    assert not np.is_blocked("198.18.8.9", public_bridge)


def test_a_container_chain_replaces_whatever_was_there_and_names_its_owner():
    policy = np.Policy(NAME, IFNAME, "allowlist", ("198.51.100.10",), "proj")
    commands = np.container_commands(TABLE, policy, BRIDGE, np.Existing())
    verbs = [(verb, next(iter(body))) for c in commands for verb, body in c.items()]
    assert verbs[:2] == [("add", "chain"), ("flush", "chain")]
    assert ("flush", "set") in verbs
    rules = [c["add"]["rule"] for c in commands if "rule" in c.get("add", {})]
    assert rules[0]["comment"] == "coi:proj/coi-3f2a9c1b-1"
    assert sets_of(commands)[np.set_name(IFNAME)] == ["198.51.100.10"]
    assert sets_of(commands)["ports"] == [[IFNAME, {"jump": {"target": np.chain_name(IFNAME)}}]]
    assert sets_of(commands)["filtered"] == [IFNAME]


def test_leaving_allowlist_deletes_the_set_only_when_it_exists():
    policy = np.Policy(NAME, IFNAME, "restricted")
    had = np.Existing(sets=frozenset({np.set_name(IFNAME)}))
    deletes = [c for c in np.container_commands(TABLE, policy, BRIDGE, had) if "delete" in c]
    assert deletes == [{"delete": {"set": {"family": "bridge", "table": TABLE,
                                           "name": np.set_name(IFNAME)}}}]
    assert not [c for c in np.container_commands(TABLE, policy, BRIDGE, np.Existing())
                if "delete" in c]


OPEN_PORT = {"add": {"element": {"family": "bridge", "table": TABLE, "name": "ports",
                                  "elem": [[IFNAME, {"jump": {"target": np.OPEN_CHAIN}}]]}}}


def test_open_mode_removes_exactly_what_exists_and_accepts_the_port():
    everything = np.Existing(chains=frozenset({np.chain_name(IFNAME)}),
                             sets=frozenset({np.set_name(IFNAME)}),
                             ports=frozenset({IFNAME}), filtered=frozenset({IFNAME}))
    policy = np.Policy(NAME, IFNAME, "open")
    commands = np.container_commands(TABLE, policy, BRIDGE, everything)
    assert [next(iter(c.values())) for c in commands[:-1]] == [
        {"element": {"family": "bridge", "table": TABLE, "name": "ports", "elem": [IFNAME]}},
        {"element": {"family": "bridge", "table": TABLE, "name": "filtered", "elem": [IFNAME]}},
        {"chain": {"family": "bridge", "table": TABLE, "name": np.chain_name(IFNAME)}},
        {"chain": {"family": "bridge", "table": TABLE, "name": np.chain_name(IFNAME)}},
        {"set": {"family": "bridge", "table": TABLE, "name": np.set_name(IFNAME)}}]
    assert commands[-1] == OPEN_PORT
    assert np.container_commands(TABLE, policy, BRIDGE, np.Existing()) == [OPEN_PORT]


def base_rules(chain: str) -> list[list[dict]]:
    return [c["add"]["rule"]["expr"] for c in np.base_commands(TABLE, BRIDGE)
            if "rule" in c.get("add", {}) and c["add"]["rule"]["family"] == "bridge"
            and c["add"]["rule"]["chain"] == chain]


def guard_verdict(packet: Mapping) -> str:
    return verdict(base_rules("c_guard"), packet, {})


def test_the_guard_drops_a_coi_port_no_policy_marked_and_only_that():
    unmarked = {"meta.iifname": IFNAME, **ip4("198.51.100.10")}
    assert guard_verdict(unmarked) == "drop"
    for mark in (np.MARK, np.POLICY_MARK):
        assert guard_verdict({**unmarked, "meta.mark": mark}) == "continue"
    assert guard_verdict({**unmarked, "meta.mark": 0x12345678}) == "drop"
    assert guard_verdict({**unmarked, "meta.iifname": "veth1234"}) == "continue"


def test_every_policy_marks_what_it_lets_through_so_other_tables_guards_pass_it():
    policy = np.Policy(NAME, IFNAME, "restricted")
    rules = np.container_rules(policy, BRIDGE, TABLE)
    arp = verdict(rules[:2], {"ether.type": "arp"}, {})
    assert arp == "accept"
    assert rules[0] == [{"mangle": {"key": {"meta": {"key": "mark"}},
                                    "value": np.POLICY_MARK}}]
    assert base_rules(np.OPEN_CHAIN)[0][0] == rules[0][0]
    chains = {(c["add"]["chain"]["name"]): c["add"]["chain"].get("prio")
              for c in np.base_commands(TABLE, BRIDGE) if "chain" in c.get("add", {})
              and c["add"]["chain"]["family"] == "bridge"}
    assert chains["c_guard"] > chains["c_pre"]


HOOK = "/usr/local/lib/coi/bin/coi-net-hook"


def hook_line(hook: str = HOOK, **changes: str) -> str:
    words = {"table": TABLE, "ifname": IFNAME, "container": NAME, "project": "default",
             "state_dir": "/var/lib/coi/net", **changes}
    return np.start_hook_line(hook, **words)


def test_the_start_hook_line_names_everything_the_hook_needs():
    assert hook_line() == (f"lxc.hook.start-host = {HOOK} {TABLE} {IFNAME} {NAME} default "
                           "/var/lib/coi/net")


@pytest.mark.parametrize("changes", [
    {"state_dir": "/var/lib/coi net"}, {"state_dir": "/tmp/x\nlxc.hook.stop = /bin/x"},
    {"state_dir": "relative/dir"}, {"state_dir": "/var/../etc"}, {"hook": "/opt/my hook"},
    {"table": "nat"}, {"ifname": "veth1234"}, {"container": "a b"}, {"project": "x y"}])
def test_a_start_hook_word_that_could_split_or_escape_is_refused(changes):
    with pytest.raises(BadInput):
        hook_line(**changes)


def test_the_start_hook_replaces_coi_s_own_line_and_keeps_the_user_s():
    mine = "lxc.apparmor.allow_nesting = 1\nlxc.hook.start-host = /opt/theirs.sh\n"
    old = hook_line(state_dir="/srv/old-state")
    once = np.with_start_hook(mine + old + "\n", hook_line())
    assert once == mine + hook_line() + "\n"
    assert np.with_start_hook(once, hook_line()) == once
    assert np.with_start_hook("", hook_line()) == hook_line() + "\n"


def test_a_refill_flushes_and_adds_in_the_same_list():
    policy = np.Policy(NAME, IFNAME, "allowlist", ("198.51.100.20", "198.51.100.3"))
    commands = np.set_refill_commands(TABLE, policy, BRIDGE)
    assert [next(iter(c)) for c in commands] == ["flush", "add"]
    assert commands[1]["add"]["element"]["elem"] == ["198.51.100.3", "198.51.100.20"]
    empty = np.set_refill_commands(TABLE, np.Policy(NAME, IFNAME, "allowlist"), BRIDGE)
    assert [next(iter(c)) for c in empty] == ["flush"]


# A listing as `nft -j list table bridge coi_test_x` printed it (nftables 1.0.6),
# trimmed to one container. Refresh: apply a container, run that command, drop
# the blocked4/blocked6 elements.
LISTING = json.loads("""{"nftables": [
 {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
 {"table": {"family": "bridge", "name": "coi_test_x", "handle": 48}},
 {"set": {"family": "bridge", "name": "a_coi909532ece01d", "table": "coi_test_x",
          "type": "ipv4_addr", "handle": 5, "elem": ["198.51.100.10"]}},
 {"set": {"family": "bridge", "name": "d_coi909532ece01d", "table": "coi_test_x",
          "type": "ipv4_addr", "handle": 11, "flags": ["timeout"],
          "elem": [{"elem": {"val": "198.51.100.20", "timeout": 100, "expires": 99}}]}},
 {"map": {"family": "bridge", "name": "ports", "table": "coi_test_x", "type": "ifname",
          "handle": 6, "map": "verdict",
          "elem": [["coi909532ece01d", {"jump": {"target": "p_coi909532ece01d"}}]]}},
 {"set": {"family": "bridge", "name": "filtered", "table": "coi_test_x", "type": "ifname",
          "handle": 7, "elem": ["coi909532ece01d"]}},
 {"chain": {"family": "bridge", "table": "coi_test_x", "name": "c_pre", "handle": 2,
            "type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept"}},
 {"chain": {"family": "bridge", "table": "coi_test_x", "name": "p_coi909532ece01d",
            "handle": 1}},
 {"chain": {"family": "bridge", "table": "coi_test_x", "name": "p_coi0123456789ab",
            "handle": 9}},
 {"rule": {"family": "bridge", "table": "coi_test_x", "chain": "p_coi909532ece01d",
           "handle": 8, "comment": "coi:default/coi-test-zz02",
           "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ether",
                    "field": "type"}}, "right": "arp"}}, {"accept": null}]}},
 {"rule": {"family": "bridge", "table": "coi_test_x", "chain": "p_coi909532ece01d",
           "handle": 10, "expr": [{"match": {"op": "!=", "left": {"payload": {"protocol":
           "ether", "field": "type"}}, "right": "ip"}}, {"counter": {"packets": 5,
           "bytes": 350}}, {"drop": null}]}},
 {"rule": {"family": "bridge", "table": "coi_test_x", "chain": "p_coi909532ece01d",
           "handle": 16, "expr": [{"counter": {"packets": 2, "bytes": 120}}, {"drop": null}]}},
 {"rule": {"family": "bridge", "table": "coi_test_x", "chain": "c_pre", "handle": 17,
           "expr": [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@ports"}}]}}
]}""")["nftables"]


def test_the_table_listing_is_read_into_what_exists():
    existing = np.Existing.from_listing(LISTING)
    assert existing.ports == {"coi909532ece01d"}
    assert existing.filtered == {"coi909532ece01d"}
    assert existing.rules["p_coi909532ece01d"] == 3
    assert existing.dropped["p_coi909532ece01d"] == 7
    assert existing.elements["a_coi909532ece01d"] == ("198.51.100.10",)
    assert existing.elements["d_coi909532ece01d"] == ("198.51.100.20",)  # with a timeout
    assert existing.comments["p_coi909532ece01d"] == "coi:default/coi-test-zz02"
    assert existing.ifnames() == {"coi909532ece01d", "coi0123456789ab"}
    assert existing.has("coi0123456789ab")
    assert not existing.has("coiffffffffffff")


# -- names, NIC and validation -------------------------------------------------------------


def test_the_host_side_name_is_fixed_short_and_per_project():
    name = np.host_name_for(NAME)
    assert name == np.host_name_for(NAME)
    assert len(name) == 15
    assert np.IFNAME_PATTERN.fullmatch(name)
    assert name != np.host_name_for(NAME, "other")
    assert name != np.host_name_for("coi-3f2a9c1b-2")
    with pytest.raises(BadInput):
        np.host_name_for("bad/name")


def test_the_nic_override_pins_the_name_and_turns_incus_filtering_on_unless_open():
    devices = np.net_device_override(NAME, network="coibr0")
    assert devices == {"eth0": {"type": "nic", "network": "coibr0", "name": "eth0",
                                "host_name": IFNAME, "security.ipv4_filtering": "true",
                                "security.mac_filtering": "true",
                                "security.port_isolation": "true"}}
    opened = np.net_device_override(NAME, mode="open")["eth0"]
    assert {opened[k] for k in np.NIC_SECURITY} == {"false"}
    kept = np.nic_settings({"type": "nic", "mtu": "1400"}, IFNAME, "restricted",
                           nic_filtering=False)
    assert kept["mtu"] == "1400"
    assert {kept[k] for k in np.NIC_SECURITY} == {"false"}


@pytest.mark.parametrize(("entry", "kind", "value"), [
    ("github.com", "names", "github.com"),
    ("API.GitHub.com.", "names", "api.github.com"),
    (" 8.8.8.8 ", "addresses", "8.8.8.8"),
    ("xn--bcher-kva.example", "names", "xn--bcher-kva.example"),
    ("2606:4700:0::1111", "addresses", "2606:4700::1111"),
])
def test_allowed_entries_are_names_or_public_ipv4_or_ipv6(entry, kind, value):
    assert getattr(np.parse_allowed([entry], BRIDGE), kind) == (value,)


@pytest.mark.parametrize("entry", [
    "10.0.0.1", "192.168.1.1", "169.254.169.254", "10.151.43.7", "127.0.0.1", "0.0.0.0",
    "*.com", "*github.com", "a.*.com", "*.", "**.a.com", "*.-a.com", "github", "-x.com",
    "a..b", "1.2.3", "010.1.1.1", "8.8.8.8/32",
    "fd00::1", "fe80::1%eth0", "::ffff:10.0.0.1", "2002:a00:1::1", "2001:db8::/64",
    "git hub.com", "github.com;drop", "a" * 64 + ".com", "", "é.com",
    "github.com\n", "1.2.3.4.5", "256.1.1.1",
])
def test_allowed_entries_that_are_private_wildcards_or_malformed_are_refused(entry):
    with pytest.raises(BadInput):
        np.parse_allowed([entry], BRIDGE)


def test_an_ipv6_address_in_the_bridge_s_own_prefix_is_refused():
    with pytest.raises(BadInput, match="private"):
        np.parse_allowed(["2001:db8:43::9"], BRIDGE6)


def test_allowed_entries_are_deduplicated_and_bounded():
    allowed = np.parse_allowed(["a.com", "A.com", "1.1.1.1", "1.1.1.1"], BRIDGE)
    assert allowed == np.Allowed(("a.com",), ("1.1.1.1",))
    with pytest.raises(BadInput):
        np.parse_allowed([f"n{i}.com" for i in range(np.MAX_ALLOWED + 1)], BRIDGE)
    with pytest.raises(BadInput):
        np.parse_allowed([42], BRIDGE)


@pytest.mark.parametrize(("text", "address", "port"), [
    ("1.1.1.1", "1.1.1.1", 53), ("127.0.0.1:5353", "127.0.0.1", 5353),
    ("[2001:db8::53]:53", "2001:db8::53", 53), ("2001:db8::53", "2001:db8::53", 53),
])
def test_resolvers_are_addresses_with_an_optional_port(text, address, port):
    assert np.parse_resolver(text) == np.Resolver(address, port)


@pytest.mark.parametrize("text", ["dns.google", "1.1.1.1:0", "1.1.1.1:70000", "01.1.1.1",
                                  "1.1.1.1:53:53", "", "[::1]:x", 53])
def test_bad_resolvers_are_refused(text):
    with pytest.raises(BadInput):
        np.parse_resolver(text)


@pytest.mark.parametrize("text", ["-1", "1e3", "20000", " 5", "5 ", "0x10", ""])
def test_bad_refresh_intervals_are_refused(text):
    with pytest.raises(BadInput):
        np.parse_refresh_minutes(text)


@pytest.mark.parametrize("text", ["0", "0.05", "31", "abc", "1e1", "-1"])
def test_bad_dns_timeouts_are_refused(text):
    with pytest.raises(BadInput):
        np.parse_timeout(text)


def test_modes_and_interface_names_are_strict():
    assert np.validate_mode("allowlist") == "allowlist"
    for bad in ("Open", "none", "", None):
        with pytest.raises(BadInput):
            np.validate_mode(bad)
    for bad in ("eth0", "coi909532ece01", "coi909532ece01dx", "coi90953;ece01d"):
        with pytest.raises(BadInput):
            np.validate_ifname(bad)


def test_bridge_facts_come_from_the_incus_network_config():
    bridge = np.Bridge.from_config("coibr0", {"ipv4.address": "10.151.43.1/24",
                                              "ipv6.address": "none"})
    assert bridge == BRIDGE
    assert np.Bridge.from_json(json.loads(json.dumps(BRIDGE6.to_json()))) == BRIDGE6
    with pytest.raises(BadInput):
        np.Bridge.from_config("coibr0", {"ipv4.address": "none"})


def test_the_table_name_comes_from_the_environment_and_must_be_coi_s():
    assert nft.table_name({}) == "coi"
    assert nft.table_name({"COI_NFT_TABLE": "coi_test_1a2b"}) == "coi_test_1a2b"
    for bad in ("filter", "incus", "coi-x", "coi_", "COI", "coi;flush ruleset"):
        with pytest.raises(BadInput):
            nft.table_name({"COI_NFT_TABLE": bad})


@pytest.mark.parametrize("command", [
    {"flush": {"ruleset": None}},
    {"delete": {"table": {"family": "inet", "name": "incus"}}},
    {"add": {"rule": {"family": "ip", "table": TABLE, "chain": "x", "expr": []}}},
    {"add": {"rule": {"family": "bridge", "table": "incus", "chain": "x", "expr": []}}},
    {"add": {"chain": {"family": "inet", "table": TABLE}}, "delete": {}},
    "flush ruleset",
])
def test_commands_outside_coi_s_tables_are_refused(command):
    with pytest.raises(BadInput):
        nft.check_ours([command], TABLE)


# -- cache and refresh timing --------------------------------------------------------------


def test_a_failed_lookup_keeps_the_cached_addresses_and_nxdomain_removes_them():
    cached = {"addresses": ["198.51.100.10"], "resolved_at": 100.0, "expires": 160.0}
    failed = np.name_entry(np.Lookup("a.test", "failed", expires=200, error="timeout"),
                           cached, 200)
    assert failed["addresses"] == ["198.51.100.10"]
    assert failed["status"] == "failed"
    assert failed["resolved_at"] == 100.0
    gone = np.name_entry(np.Lookup("a.test", "nxdomain", expires=500), cached, 200)
    assert gone["addresses"] == []
    fresh = np.name_entry(np.Lookup("a.test", "ok", ("198.51.100.20",), ("10.0.0.1",), 260),
                          cached, 200)
    assert (fresh["addresses"], fresh["blocked"], fresh["expires"]) == \
        (["198.51.100.20"], ["10.0.0.1"], 260)


def _state(entries: dict, minutes: int = 30) -> dict:
    return {"allowed_names": list(entries), "allowed_addresses": ["203.0.113.9"],
            "refresh_interval_minutes": minutes, "names": {k: v for k, v in entries.items()
                                                           if v is not None}}


def test_names_fall_due_when_their_answer_expires_not_on_a_fixed_ttl():
    state = _state({"short.test": {"resolved_at": 1000, "expires": 1060},
                    "long.test": {"resolved_at": 1000, "expires": 1000 + 86400},
                    "new.test": None})
    assert np.due_names(state, 1059) == ["new.test"]
    assert np.due_names(state, 1060) == ["short.test", "new.test"]
    # The refresh interval bounds how long any answer is kept.
    assert np.due_names(state, 1000 + 1800) == ["short.test", "long.test", "new.test"]
    assert np.next_refresh(_state({"a.test": {"resolved_at": 1000, "expires": 1060}})) == 1060
    assert np.next_refresh(_state({"a.test": {"resolved_at": 1000, "expires": 1060}}, 0)) is None


def test_the_addresses_in_force_are_raw_ones_plus_every_listed_name_s():
    state = _state({"a.test": {"addresses": ["198.51.100.20", "198.51.100.3"]}})
    state["names"]["dropped.test"] = {"addresses": ["198.51.100.99"]}  # no longer listed
    assert np.state_addresses(state) == ("198.51.100.3", "198.51.100.20", "203.0.113.9")


def test_the_store_writes_atomically_and_refuses_foreign_files(tmp_path):
    store = np.Store(str(tmp_path), "default")
    with store.lock():
        store.save(NAME, {"container": NAME, "mode": "restricted"})
    path = tmp_path / "default" / f"{NAME}.json"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert sorted(os.listdir(path.parent)) == [f"{NAME}.json"]
    assert store.load(NAME)["mode"] == "restricted"
    assert store.containers() == [NAME]
    (path.parent / "not a name.json").write_text("{}")
    assert store.containers() == [NAME]
    path.write_text(json.dumps({"container": "someone-else"}))
    with pytest.raises(BadInput):
        store.load(NAME)
    path.write_text(json.dumps({"container": NAME, "version": 99}))
    with pytest.raises(BadInput) as err:
        store.load(NAME)
    assert err.value.hint == "upgrade coi"
    assert store.delete(NAME)
    assert not store.delete(NAME)
    assert store.load(NAME) is None
    with pytest.raises(BadInput):
        store.path("../../etc/passwd")


# -- resolution against a DNS server of our own (conftest.dns_server) --------------------------


def test_names_resolve_concurrently_with_private_answers_split_off(dns_server):
    now = time.time()
    started = time.monotonic()
    found = np.resolve([*ZONE, "gone.coi.test", SILENT], [dns_server.resolver], bridge=BRIDGE,
                       timeout=0.5, now=now)
    elapsed = time.monotonic() - started
    assert found["a.coi.test"].addresses == ("198.51.100.10",)
    assert found["mixed.coi.test"].addresses == ("198.51.100.11",)
    assert found["mixed.coi.test"].blocked == ("10.0.0.5", "169.254.169.254")
    assert found["gone.coi.test"].status == "nxdomain"
    assert found["noa.coi.test"].status == "no_answer"
    assert found[SILENT].status == "failed"
    assert "0.5 s" in found[SILENT].error
    assert elapsed < 3  # one timeout for all, not one per name in a row


def test_expiration_follows_the_whole_answer_not_the_a_record_ttl(dns_server):
    now = time.time()
    found = np.resolve(["a.coi.test", "cname.coi.test"], [dns_server.resolver], bridge=BRIDGE,
                       timeout=1, now=now)
    assert found["a.coi.test"].expires == pytest.approx(now + 300, abs=5)
    assert found["cname.coi.test"].expires == pytest.approx(now + 60, abs=5)
    assert found["cname.coi.test"].addresses == ("198.51.100.10",)


def test_nothing_to_resolve_asks_nobody():
    assert np.resolve([], [np.Resolver("127.0.0.1", 9)], bridge=BRIDGE) == {}


def test_the_help_shows_the_defaults_the_code_uses():
    doc = coi_net.__doc__
    timeout = re.search(r"--dns-timeout S .*?\[default: ([0-9.]+)\]", doc, re.S).group(1)
    assert float(timeout) == np.DEFAULT_DNS_TIMEOUT
    minutes = config.SCHEMA["network"]["refresh_interval_minutes"].default
    assert f"network.refresh_interval_minutes, {minutes})" in " ".join(doc.split())
    assert f"network.mode of\n                       the config, {np.DEFAULT_MODE})" in doc


# -- the allowlist resolver's part of the rules ------------------------------------------------


def test_wildcards_are_kept_apart_from_names_and_match_every_depth_but_not_the_domain():
    allowed = np.parse_allowed(["*.pub.test", "*.PUB.test.", "api.x.com", "1.1.1.1"], BRIDGE)
    assert allowed == np.Allowed(("api.x.com",), ("1.1.1.1",), ("*.pub.test",))
    assert allowed.entries() == ["api.x.com", "1.1.1.1", "*.pub.test"]
    for name in ("a.pub.test", "A.B.pub.test.", "x-1.pub.test"):
        assert np.name_allowed(name, allowed.names, allowed.wildcards), name
    for name in ("pub.test", "evilpub.test", "a.pub.test.evil", "evil.test", "x.com"):
        assert not np.name_allowed(name, allowed.names, allowed.wildcards), name
    assert np.name_allowed("API.x.com.", allowed.names, allowed.wildcards)


def test_an_allowlist_container_s_dns_to_the_bridge_carries_its_table_s_dns_mark():
    for mode, mark in (("allowlist", np.dns_mark(TABLE)), ("restricted", np.POLICY_MARK)):
        rules = np.container_rules(np.Policy(NAME, IFNAME, mode), BRIDGE6, TABLE)
        for packet in (ip4("10.151.43.1", "udp", 53), ip4("10.151.43.1", "tcp", 53),
                       ip6("2001:db8:43::1", "udp", 53)):
            marks = []
            for exprs in rules:  # the mark the rule that accepts it leaves
                if verdict([exprs], {**packet, "meta.mark": 0}, {}) == "accept":
                    marks = [e["mangle"]["value"] for e in exprs if "mangle" in e]
                    break
            assert (marks[-1] if marks else np.POLICY_MARK) == mark, (mode, packet)


def test_each_table_s_dns_mark_passes_every_guard_and_goes_to_its_own_port():
    tables = ["coi", TABLE, "coi_test_other", "coi_test_1a2b3c4d"]
    marks = [np.dns_mark(t) for t in tables]
    assert np.dns_mark("coi") == np.MARK | 2
    assert np.dns_port("coi") == np.DNS_PORT
    assert all(m & np.MARK_MASK == np.MARK and m not in (np.MARK, np.POLICY_MARK) for m in marks)
    assert len(set(marks)) == len(tables)
    assert len({np.dns_port(t) for t in tables}) == len(tables)
    nat = [c["add"]["rule"] for c in np.base_commands(TABLE, BRIDGE)
           if c.get("add", {}).get("rule", {}).get("chain") == "c_dns"]
    assert len(nat) == 1
    expr = nat[0]["expr"]
    assert {"match": {"op": "==", "left": {"meta": {"key": "mark"}},
                      "right": np.dns_mark(TABLE)}} in expr
    assert expr[-1] == {"redirect": {"port": np.dns_port(TABLE)}}


def test_an_answered_address_passes_an_allowlist_until_its_set_drops_it():
    policy = np.Policy(NAME, IFNAME, "allowlist")
    rules = np.container_rules(policy, BRIDGE6, TABLE)
    for daddr, answered in (("198.51.100.7", np.answered_set(IFNAME)),
                            ("2606:4700::7", np.answered_set(IFNAME, 6))):
        packet = ip6(daddr) if ":" in daddr else ip4(daddr)
        assert verdict(rules, packet, {answered: [daddr]}) == "accept"
        assert verdict(rules, packet, {answered: []}) == "drop"


def test_answered_addresses_replace_a_shorter_time_and_never_take_a_blocked_one():
    commands = np.answered_commands(TABLE, IFNAME, BRIDGE, {
        "198.51.100.7": 90, "10.0.0.5": 90, "2606:4700::7": 90, "169.254.169.254": 90})
    assert [next(iter(c)) for c in commands] == ["add", "delete", "add"]
    last = commands[-1]["add"]["element"]
    assert last["name"] == np.answered_set(IFNAME)
    assert last["elem"] == [{"elem": {"val": "198.51.100.7", "timeout": 90}}]
    with_v6 = np.answered_commands(TABLE, IFNAME, BRIDGE6, {"2606:4700::7": 30})
    assert with_v6[-1]["add"]["element"]["name"] == np.answered_set(IFNAME, 6)
    assert np.answered_commands(TABLE, IFNAME, BRIDGE, {"10.1.2.3": 9}) == []


def test_an_allowlist_apply_makes_its_answer_sets_with_timeouts_and_removal_deletes_them():
    policy = np.Policy(NAME, IFNAME, "allowlist", ("198.51.100.7",))
    made = {c["add"]["set"]["name"]: c["add"]["set"].get("flags")
            for c in np.container_commands(TABLE, policy, BRIDGE6, np.Existing())
            if "set" in c.get("add", {})}
    assert made[np.answered_set(IFNAME)] == ["timeout"]
    assert made[np.answered_set(IFNAME, 6)] == ["timeout"]
    existing = np.Existing(sets=frozenset(np.set_names(IFNAME)))
    deleted = {c["delete"]["set"]["name"] for c in np.removal_commands(TABLE, IFNAME, existing)}
    assert deleted == set(np.set_names(IFNAME))
    assert existing.ifnames() == {IFNAME}


# -- containers of a remote coi, on the server (ops.adopt, ops.mark_for_server) ----------------


class _OneInstance:
    """An Incus that holds one instance (pure logic: no call changes anything)."""

    def __init__(self, instance):
        self.instance = instance

    def instance_config(self, _name):
        return self.instance


def _remote_made(name, network="restricted", origin="0123456789abcdef", host_name=None):
    from coi_common.sessions import SessionContainer  # noqa: PLC0415

    keys = SessionContainer("/home/u/w", 1, False, "coi", "claude", network, 1001,
                            origin=origin).to_config()
    nic = {"type": "nic", "network": "coibr0", "name": "eth0",
           "host_name": host_name or np.host_name_for(name, "default")}
    return {"name": name, "config": keys, "expanded_devices": {"eth0": nic}}


@pytest.mark.parametrize(("instance", "why"), [
    (_remote_made("coi-1a2b3c4d-1", origin=""), "no rules applied by coi"),
    (_remote_made("coi-1a2b3c4d-1", network="open"), "in open mode, which no server enforces"),
    (_remote_made("coi-1a2b3c4d-1", network="allowlist"), "which no server enforces"),
    (_remote_made("coi-1a2b3c4d-1", host_name="veth1234"), "its NIC is not named coi"),
    ({"name": "web", "config": {}}, "no rules applied by coi"),
])
def test_a_server_adopts_only_a_remote_cois_restricted_container_with_coi_s_port(
        instance, why, tmp_path):
    from coi_net import ops  # noqa: PLC0415

    ctx = ops.Context(_OneInstance(instance), "coi", np.Store(str(tmp_path)), "coibr0")
    reason = ops.adopt(ctx, "coi-1a2b3c4d-1")
    assert isinstance(reason, str)
    assert why in reason
    assert list(tmp_path.iterdir()) == []  # nothing recorded


def test_only_restricted_mode_is_marked_for_a_server(tmp_path):
    from coi_net import ops  # noqa: PLC0415

    ctx = ops.Context(_OneInstance({}), "coi", np.Store(str(tmp_path)), "coibr0")
    with pytest.raises(CoiError, match="allowlist cannot be enforced on a remote"):
        ops.mark_for_server(ctx, ops.Request("coi-1a2b3c4d-1", "allowlist", np.Allowed(), (),
                                             0))
