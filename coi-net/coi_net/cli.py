"""From docopt arguments to coi-net's verbs and back to text or JSON.

Inputs are validated here before anything runs as root: container names,
modes, allowlist entries, resolvers and numbers all go through
coi_common.naming and coi_net.policy validators. The config is read
once (coi_common.config) for defaults; flags win over it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any, Final

from coi_common import config, incus
from coi_common.entry import Args
from coi_common.errors import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, CoiError, PermissionDenied
from coi_common.naming import validate_container_name
from coi_common.protocol import Record, make_record, validate, write_record
from coi_net import nft, ops
from coi_net import policy as np

PROG = "coi-net"


def run(args: Args, *, as_json: bool) -> int:
    """Validate, run one verb, render its records; return the exit status."""
    if args["apply"] or args["dns"]:
        return _apply(args, as_json=as_json) if args["apply"] else _dns()
    dry_run = bool(args["--dry-run"])
    names = [validate_container_name(n) for n in args["<name>"] or []]
    if args["remove"] and not names:
        names = [_slot_record().container]
    remote = bool(config.load(None).get("incus.remote")) if args["remove"] else False
    if args["remove"] and (remote or (not dry_run and os.geteuid() != 0)):
        return _render([_remove_elsewhere(name, remote=remote, dry_run=dry_run)
                        for name in names], None, as_json=as_json, text=_removed_text)
    if args["status"]:
        return _status(names, as_json=as_json)
    if not dry_run:
        ops.require_root(_verb(args))
    ctx = _context(config.load(None), dry_run=dry_run)
    if args["remove"]:
        records = [ops.remove(ctx, name) for name in names]
        return _render(records, ctx, as_json=as_json, text=_removed_text)
    if args["refresh"] or args["restore"]:
        records = ops.refresh(ctx, names, force=bool(args["--force"]),
                              resolve=not args["restore"])
        return _render_refresh(records, as_json=as_json)
    if args["teardown"]:
        records, text = [ops.teardown(ctx)], _teardown_text
    else:
        records, text = ops.gc(ctx), _removed_text
    return _render(records, ctx, as_json=as_json, text=text)


def _verb(args: Args) -> str:
    return next(v for v in ("apply", "remove", "refresh", "restore", "status", "dns", "gc",
                            "teardown") if args[v])


def _teardown_text(record: Record) -> str:
    tables = ", ".join(record["tables"]) or "no table"
    return f"deleted {tables}; the state of {len(record['states'])} container(s)"


def _dns() -> int:
    """The allowlist resolver, until stopped (coi's host service runs it)."""
    ops.require_root("dns")
    from coi_net import resolver  # noqa: PLC0415 - dnspython and the servers

    ctx = _context(config.load(None), dry_run=False)
    return resolver.serve(ctx, ops.bridge_facts(ctx.client, ctx.bridge_name))


def _context(settings: config.Config, *, dry_run: bool) -> ops.Context:
    _this_host_only(settings)
    project = np.validate_project(settings.get("incus.project"))
    return ops.Context(client=incus.connect(settings), table=nft.table_name(),
                       store=np.Store(ops.state_dir(), project),
                       bridge_name=settings.get("incus.network"), dry_run=dry_run)


def _remove_elsewhere(name: str, *, remote: bool, dry_run: bool) -> Record:
    """A member's remove: coi's host service does it. On a remote: nothing here; the
    server's coi removes the rules of a deleted container itself (its gc)."""
    if remote:
        return make_record("net_removed", container=name, interface="", removed=False,
                           dry_run=dry_run)
    return _by_service("net_remove", "net_removed", container=name)


def _mark_on_server(settings: config.Config, name: str, mode: str, *, dry_run: bool
                    ) -> Record:
    """coi-net apply of a container on a remote: marked for the server's own coi, which
    enforces restricted mode there (ops.mark_for_server); this host's rules untouched."""
    project = np.validate_project(settings.get("incus.project"))
    ctx = ops.Context(client=incus.connect(settings), table=nft.DEFAULT_TABLE,
                      store=np.Store(ops.DEFAULT_STATE_DIR, project),
                      bridge_name=settings.get("incus.network"), dry_run=dry_run)
    return ops.mark_for_server(ctx, ops.Request(name, mode, np.Allowed(), (), 0))


def _this_host_only(settings: config.Config) -> None:
    """coi-net's rules are this host's nftables: a container on a remote is not filtered
    by them, so no rule is made or reported for it (fail closed; docs/remote.md)."""
    if settings.get("incus.remote"):
        raise CoiError(f"coi-net enforces egress on this host only; for containers on the "
                       f"remote {settings.get('incus.remote')} it is not built yet "
                       "(docs/remote.md)")


def _slot_record() -> Any:
    """The slot record on stdin (coi-slot next | coi-net apply; coi-slot end's remove)."""
    from coi_common.protocol import read_record  # noqa: PLC0415
    from coi_common.sessions import SlotRecord  # noqa: PLC0415

    return SlotRecord.from_record(read_record("slot"))


def _by_service(verb: str, kind: str, **fields: Any) -> Record:
    """A member's apply or remove: coi's host service runs its own root-owned coi-net
    with these fields (checked again there) and hands its record back."""
    from coi_common import hostservice  # noqa: PLC0415

    records = hostservice.call(verb, timeout=ops.SERVICE_SECONDS, **fields).get("records")
    if not isinstance(records, list) or len(records) != 1:
        raise CoiError(f"coi's host service answered {verb} without one {kind} record")
    return validate(records[0], kind)


def _status(names: list[str], *, as_json: bool) -> int:
    """Rendered status records; the exit code says whether each policy is in force. A
    member gets root's, by coi's host service (only root reads nftables)."""
    if os.geteuid() == 0:
        records = ops.status(_context(config.load(None), dry_run=False),
                             names[0] if names else None)
    else:
        from coi_common import hostservice  # noqa: PLC0415

        fields = {"container": names[0]} if names else {}
        found = hostservice.call("net_status", timeout=ops.SERVICE_SECONDS,
                                 **fields).get("records")
        if not isinstance(found, list):
            raise CoiError("coi's host service answered net_status without records")
        records = [validate(record, "net_status") for record in _status_records(found)]
    if as_json:  # one document: the listing
        write_record(make_record("net_status_list", containers=records))
    else:
        _render(records, None, as_json=False, text=_status_text)
    return status_code(records)


def _status_records(found: list[Any]) -> list[Any]:
    """The net_status records of the service's answer: one net_status_list document
    (a service of an older coi sent the records themselves)."""
    return [record for listed in found for record in (
        validate(listed, "net_status_list")["containers"]
        if isinstance(listed, dict) and listed.get("kind") == "net_status_list" else [listed])]


def _apply(args: Args, *, as_json: bool) -> int:
    dry_run = bool(args["--dry-run"])
    member = os.geteuid() != 0 and not dry_run
    if member and (args["--no-nic-filtering"] or args["--dns-timeout"] != "2"):
        raise PermissionDenied("--no-nic-filtering and --dns-timeout need root",
                               hint=ops.SUDO_HINT)
    name, mode, workspace = args["<name>"][0] if args["<name>"] else None, None, None
    profile = None
    if name is None:
        slot = _slot_record()
        name, mode, workspace = slot.container, slot.network, slot.workspace
        profile = slot.config_profile or None
    name = validate_container_name(name)
    settings = config.load(workspace, profile=profile)
    if args["--mode"] is not None:  # an empty --mode is refused, not read as the default
        mode = args["--mode"]
    elif not mode:
        mode = settings.get("network.mode")
    mode = np.validate_mode(mode)
    if settings.get("incus.remote"):
        return _render([_mark_on_server(settings, name, mode, dry_run=dry_run)], None,
                       as_json=as_json, text=_applied_text)
    timeout = np.parse_timeout(args["--dns-timeout"])
    minutes = (np.parse_refresh_minutes(args["--refresh-minutes"])
               if args["--refresh-minutes"] is not None
               else np.validate_refresh_minutes(settings.get("network.refresh_interval_minutes")))
    entries = args["--allow"] or settings.get("network.allowed_domains")
    np.parse_allowed(entries, None)  # every flag is refused before Incus is asked
    resolver_entries = [str(r) for r in args["--resolver"] or settings.get("network.resolvers")]
    resolvers = np.parse_resolvers(resolver_entries)
    ctx = _context(settings, dry_run=dry_run)
    bridge = ops.bridge_facts(ctx.client, ctx.bridge_name)
    allowed = np.parse_allowed(entries, bridge)  # nor an address in the bridge's subnet
    if mode == "allowlist" and not allowed.entries():
        print(f"{PROG}: warning: allowlist mode with nothing allowed: {name} can reach "
              "nothing, and coi's resolver answers it no name", file=sys.stderr)
    request = ops.Request(name, mode, allowed if mode == "allowlist" else np.Allowed(),
                          resolvers, minutes, timeout,
                          nic_filtering=not args["--no-nic-filtering"])
    record = _by_service("net_apply", "net_rules", container=name, mode=mode,
                         allow=[str(e) for e in entries], resolvers=resolver_entries,
                         refresh_minutes=minutes) if member else ops.apply(ctx, request)
    if record["nic_pending"]:
        print(f"{PROG}: warning: {name} is running: Incus's NIC filtering stays as it is "
              "until coi-net apply runs with the container stopped (coi's rules are in "
              "force now)", file=sys.stderr)
    if record["resolver"] is False:
        print(f"{PROG}: warning: {name}: no allowlist resolver answers on the bridge, so "
              "its names do not resolve until one does (coi's host service runs it: "
              "sudo coi setup)", file=sys.stderr)
    for failure in record["failures"]:
        print(f"{PROG}: warning: {name}: {failure['name']}: {failure['error']}; "
              f"{_kept(failure['kept'])}", file=sys.stderr)
    return _render([record], ctx, as_json=as_json, text=_applied_text)


def _kept(addresses: list[str]) -> str:
    if not addresses:
        return "no cached address, nothing allowed for it"
    return f"kept {len(addresses)} cached address{'es' if len(addresses) > 1 else ''}"


def _render(records: Iterable[Record], ctx: ops.Context | None, *, as_json: bool,
            text: Any) -> int:
    if ctx is not None and ctx.dry_run:
        for commands in ctx.planned:
            print(nft.dump(commands))
        return EXIT_OK
    for record in records:
        if as_json:
            write_record(record)
        else:
            line = text(record)
            if line:
                print(line, flush=True)
    return EXIT_OK


def _render_refresh(records: list[Record], *, as_json: bool) -> int:
    """Quiet unless something changed or failed; failures on stderr, exit 1."""
    failed = False
    for record in records:
        if as_json:
            write_record(record)
        elif record["changed"]:
            parts = [f"+{a}" for a in record["added"]] + [f"-{a}" for a in record["removed"]]
            what = "rules restored" if record["restored"] else "allowed " + " ".join(parts)
            print(f"{record['container']}: {what}", flush=True)
        for failure in record["failures"]:
            failed = True
            subject = f"{failure['name']}: " if failure["name"] else ""
            suffix = f"; {_kept(failure['kept'])}" if failure["name"] else ""
            print(f"{PROG}: {record['container']}: {subject}{failure['error']}{suffix}",
                  file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _applied_text(record: Record) -> str:
    if record.get("enforced_by") == "server":
        return (f"{record['container']}: {record['mode']} on {record['interface']}, "
                "put in force by the server's coi at every start")
    line = (f"{record['container']}: {record['mode']} on {record['interface']}, "
            f"{record['rules']} rules")
    if record["mode"] == "allowlist":
        line += f", {len(record['allowed'])} allowed addresses"
    return line


def _removed_text(record: Record) -> str:
    what = "rules removed" if record["removed"] else "had no rules"
    return f"{record['container']}: {what} ({record['interface']})"


def _when(moment: float | None) -> str:
    if moment is None:
        return "never"
    from datetime import UTC, datetime  # noqa: PLC0415 - only status shows times

    ago = time.time() - moment
    stamp = datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{stamp} ({ago:.0f} s ago)" if ago >= 0 else f"{stamp} (in {-ago:.0f} s)"


STATUS_CODES: Final = {"in_force": EXIT_OK, "missing": EXIT_FAILED, "blocked": EXIT_UNAVAILABLE}
"""status's exit: 0 every policy in force, 1 one missing (its traffic is not filtered),
4 one container blocked pending its policy (fail closed); not root, it cannot tell: 0."""
POLICY_TEXT: Final = {"in_force": "policy in force", "missing": "POLICY MISSING",
                      "blocked": "blocked pending policy"}


def status_code(records: Iterable[Record]) -> int:
    found = {record.get("policy") for record in records}
    return next((STATUS_CODES[p] for p in ("missing", "blocked") if p in found), EXIT_OK)


def _status_text(record: Record) -> str:
    link = record["link"]
    state = ("unknown" if link.get("present") is None else "absent" if not link["present"]
             else f"{'up' if link.get('up') else 'down'} on {link.get('bridge') or 'no bridge'}")
    rules = "?" if record["rules"] is None else record["rules"]
    dropped = "?" if record["dropped"] is None else record["dropped"]
    policy = POLICY_TEXT.get(record.get("policy") or "", "policy unknown (not root)")
    lines = [f"{record['container']}: {record['mode']}, {policy}, interface "
             f"{record['interface']} ({state}), {rules} rules, {dropped} packets dropped"]
    if record["mode"] == "allowlist":
        lines.append(f"  allowed: {' '.join(record['allowed']) or '(nothing)'}")
        if record["wildcards"]:
            lines.append(f"  wildcards: {' '.join(record['wildcards'])}")
        if record["answered"]:
            lines.append(f"  answered by coi's resolver: {' '.join(record['answered'])}")
        for name, entry in record["names"].items():
            addresses = " ".join(entry["addresses"]) or "-"
            extra = f" ({entry['error']})" if entry["error"] else ""
            blocked = f" blocked: {' '.join(entry['blocked'])}" if entry["blocked"] else ""
            lines.append(f"  {name}: {entry['status']} {addresses}{blocked}{extra}")
        lines.append(f"  last refresh: {_when(record['last_refresh'])}; next: "
                     f"{_when(record['next_refresh'])}")
    if record["last_error"]:
        lines.append(f"  last error: {record['last_error']}")
    return "\n".join(lines)
