"""coi-net: egress rules (nftables) of coi's containers.

Usage:
  coi-net [network] apply [<name>] [--mode MODE] [--allow ENTRY]... [--resolver ADDR]...
                    [--refresh-minutes N] [--dns-timeout S] [--no-nic-filtering]
                    [--dry-run] [--format FMT] [--debug]
  coi-net [network] remove [<name>...] [--dry-run] [--format FMT] [--debug]
  coi-net [network] refresh [--force] [--format FMT] [--debug] [--all | <name>...]
  coi-net [network] restore <name> [--format FMT] [--debug]
  coi-net [network] status [<name>] [--format FMT] [--debug]
  coi-net [network] gc [--dry-run] [--format FMT] [--debug]
  coi-net [network] teardown [--dry-run] [--format FMT] [--debug]
  coi-net [network] dns [--debug]
  coi-net (-h | --help)
  coi-net --version

Commands:
  apply     Put a container's rules in place (replacing any it had) and give its
            NIC coi's fixed host-side name and Incus's own MAC/IPv4 filtering and
            port isolation. Run it after creating the container and before
            starting it, so the rules are there before its first packet. Without
            <name>, reads a slot record (of coi's slots) on stdin and takes the
            container and mode from it. On a remote ([incus] remote): only marks
            the container for the server's own coi, which puts restricted rules
            in place at each start (allowlist is refused; docs/remote.md).
  remove    Remove a container's rules and state (at deletion); without <name>,
            the container of a slot record on stdin. Missing rules
            are not an error. On a remote: nothing (the server's gc does it).
  refresh   Re-resolve allowlists whose DNS answers have expired (or all names
            with --force, or of the named containers) and swap the allowed
            addresses in one transaction; restore rules that are missing (after
            a reboot). Quiet unless something changed or failed; exits 1 when a
            name could not be resolved (its cached addresses stay in force).
            coi's host service runs `refresh --all` every 10 s by itself.
  restore   Put a container's recorded rules back when they are missing, without
            resolving anything (the cached addresses stand); exits 1 when coi
            recorded no policy for it (a restricted container a remote coi marked
            is adopted: its rules from its own keys). Incus runs it, through coi's
            start hook, each
            time the container starts: apply makes that the container's
            lxc.hook.start-host, so a container whose rules cannot be put in
            place does not start at all.
  status    Mode, whether its policy is in force, interface, rule count, dropped
            packets, allowed addresses, last refresh and cache age of one or
            every container. Exits 0 when every policy is in force, 1 when one
            is missing (that container's traffic is not filtered), 4 when one
            container is blocked pending its policy (coi's guard drops all it
            sends until apply or restore).
  gc        Remove the rules of containers that no longer exist.
  teardown  Delete coi's own nftables tables (`coi` in the bridge and inet
            families) and the recorded state of every container: what
            `coi setup --uninstall` runs after removing coi's containers.
  dns       The allowlist resolver, until stopped: the only DNS an allowlist
            container gets (its queries to the bridge come here). Names its
            policy allows, exact or under a `*.` wildcard, are asked upstream
            and each answered address is allowed for the answer's TTL (plus
            60 s) before the answer goes back; every other name is NXDOMAIN
            and nothing leaves. coi's host service runs it.

Modes:
  restricted  (default) Internet yes; private ranges (10/8, 172.16/12,
              192.168/16), link-local and cloud metadata (169.254/16), CGNAT
              (100.64/10), the host itself (except DHCP and DNS on the bridge)
              and other containers no. IPv6 only when the bridge has IPv6.
  allowlist   Only the addresses of --allow entries (domain names, resolved
              here, `*.example.com` wildcards, and IPv4 or IPv6 addresses; names
              get AAAA answers too when the bridge has IPv6), plus what coi's
              resolver answered the container for those names; private ranges
              stay blocked even when an allowed name resolves into one.
  open        No filtering (its port is accepted as such: a port with coi's name
              and no policy at all passes nothing).

Options:
  --mode MODE          restricted, allowlist or open (default: network.mode of
                       the config, restricted).
  --allow ENTRY        A domain name, a *.wildcard, an IPv4 or IPv6 address to
                       allow (repeatable; default: network.allowed_domains of
                       the config).
  --resolver ADDR      DNS server for allowlists, ADDR or ADDR:PORT
                       (repeatable; default: network.resolvers, else the host's
                       /etc/resolv.conf).
  --refresh-minutes N  Longest time a resolved address is kept before it is
                       asked again; 0 turns automatic refresh off (default:
                       network.refresh_interval_minutes, 30).
  --dns-timeout S      Seconds to wait for one DNS answer [default: 2].
  --no-nic-filtering   Leave Incus's NIC filtering (MAC/IPv4 anti-spoofing,
                       port isolation) off; coi's own rules still apply.
  --all                Refresh every container (the default with no names).
  --force              Re-resolve every name, expired or not.
  --dry-run            Print the nftables transaction (JSON) instead of
                       applying it, and the plan of the other changes (the
                       NIC's settings); change nothing.
  --format FMT         Output format: text or json [default: text].
  --debug              Show tracebacks on errors.
  -h --help            Show this help.

Changing rules needs root. A member of incus-admin who runs apply, remove or
status gets them done by coi's host service (started by `coi setup`), which
runs its own root-owned coi-net with the same, re-checked values; refresh,
restore, gc and dns stay root's (the service runs them by itself, no cron).
`coi network ARGS` is `coi-net network ARGS`; the word `network` is optional.

Examples:
  coi-net apply coi-3f2a9c1b-1 --mode allowlist --allow github.com --allow 8.8.8.8
  coi-slot next | coi-net apply
  coi network status --format json
  coi network apply coi-3f2a9c1b-1 --mode restricted
  coi network remove coi-3f2a9c1b-1
  coi network refresh --force coi-3f2a9c1b-1
  coi network restore coi-3f2a9c1b-1
  coi network gc --dry-run
  coi network teardown --dry-run
  coi network dns
  coi-net refresh --all
  coi-net restore coi-3f2a9c1b-1
  coi-net remove coi-3f2a9c1b-1
  coi-net gc
"""

from __future__ import annotations

from coi_common import output
from coi_common.entry import Args, run_main


def main(argv: list[str] | None = None) -> None:
    """Entry point of coi-net."""
    run_main("coi-net", __doc__ or "", dispatch, argv, warm=_warm)


def _warm() -> None:
    """What a spare coi-net (coi-host's service keeps one) loads before it waits."""
    from coi_net import cli  # noqa: F401, PLC0415


def dispatch(args: Args) -> int:
    """Run the chosen command; each returns the exit status."""
    as_json = output.wants_json(args)
    from coi_net import cli  # noqa: PLC0415 - keeps --help fast

    return cli.run(args, as_json=as_json)
