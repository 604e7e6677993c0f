"""The verbs of coi-net: apply, remove, refresh, status, gc. They return records;
coi_net.cli renders them.

Each change to nftables is ONE transaction (coi_net.nft.run) made under the
store's lock, and the state file is written after it, so concurrent runs
(a session start and the cron refresh) never interleave.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from coi_common import plan
from coi_common.errors import BadInput, CoiError, NotFound, PermissionDenied
from coi_common.executables import find_executable
from coi_common.incus import Incus
from coi_common.naming import validate_container_name
from coi_common.protocol import Record, make_record
from coi_net import nft
from coi_net import policy as np

STATE_VARIABLE: Final = "COI_NET_STATE_DIR"
DEFAULT_STATE_DIR: Final = "/var/lib/coi/net"
SUDO_HINT: Final = ("run it as root; a member of incus-admin applies and removes the "
                    "rules of coi's own containers through coi's host service (coi setup)")
INSTALLED_HOOK: Final = "/usr/local/lib/coi/bin/coi-net-hook"
"""Where `coi setup` puts coi-net-hook (coi_host.install), for a coi-net run from elsewhere."""
SERVICE_SECONDS: Final = 120.0
"""How long a member's apply or remove waits for the host service (its DNS lookups)."""


def state_dir(env: Mapping[str, str] | None = None) -> str:
    source = os.environ if env is None else env
    path = source.get(STATE_VARIABLE) or DEFAULT_STATE_DIR
    if not os.path.isabs(path):
        raise BadInput(f"{STATE_VARIABLE} must be an absolute path, got {path!r}")
    return path


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PermissionDenied(f"coi network {what} changes firewall rules and needs root",
                               hint=SUDO_HINT)


@dataclass
class Context:
    """Where coi-net acts: the Incus client, coi's table, the state store, the bridge."""

    client: Incus
    table: str
    store: np.Store
    bridge_name: str
    dry_run: bool = False
    planned: list[list[dict[str, Any]]] = field(default_factory=list)

    def commit(self, commands: list[dict[str, Any]]) -> None:
        """Apply one transaction, or remember it for --dry-run (printed whole, and a step
        of the plan)."""
        if self.dry_run:
            self.planned.append(commands)
            plan.step("nft", f"transaction in table {self.table}", commands=len(commands))
            return
        nft.run(commands, table=self.table)

    def existing(self) -> np.Existing:
        try:
            return np.Existing.from_listing(nft.list_table("bridge", self.table))
        except PermissionDenied:
            if self.dry_run:
                return np.Existing()
            raise

    def base_present(self, existing: np.Existing) -> bool:
        """True when both tables have their base chains (else the base is rebuilt);
        `existing` is the bridge table as listed already."""
        if not {"c_pre", "c_guard", "c_open", "c_fwd"} <= existing.chains:
            return False
        inet = {i["chain"]["name"] for i in nft.list_table("inet", self.table) if "chain" in i}
        return {"c_pre", "c_in", "c_fwd", np.DNS_CHAIN} <= inet


# -- apply -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A validated apply request."""

    container: str
    mode: str
    allowed: np.Allowed
    resolvers: tuple[np.Resolver, ...]
    refresh_minutes: int
    dns_timeout: float = np.DEFAULT_DNS_TIMEOUT
    nic_filtering: bool = True


def find_nic(instance: Mapping[str, Any], bridge_name: str) -> tuple[str, dict[str, str]]:
    """The container's one NIC on coi's bridge: (device name, expanded settings).

    A container with another NIC is refused: traffic through it would pass
    around the rules.
    """
    nics = {name: dict(dev) for name, dev in (instance.get("expanded_devices") or {}).items()
            if dev.get("type") == "nic"}
    name = instance.get("name", "?")
    if len(nics) != 1:
        raise BadInput(f"container {name} has {len(nics)} network devices; coi-net filters "
                       "exactly one, on the bridge "
                       f"{bridge_name}")
    device, settings = next(iter(nics.items()))
    if bridge_name not in (settings.get("network"), settings.get("parent")):
        raise BadInput(f"container {name}: its NIC {device} is not on coi's bridge "
                       f"{bridge_name}")
    return device, settings


def bridge_facts(client: Incus, bridge_name: str) -> np.Bridge:
    network = client.get_optional(f"/1.0/networks/{bridge_name}")
    if network is None:
        raise NotFound(f"network {bridge_name} does not exist", hint="run 'coi setup'")
    return np.Bridge.from_config(bridge_name, network.get("config") or {})


def prepare_nic(ctx: Context, request: Request, ifname: str, hook: str | None = None) -> str:
    """Give the NIC coi's host_name and filtering: `unchanged`, `changed` or `pending`.

    A running container must already use the fixed name (its veth cannot be
    renamed under it): the rules would otherwise key on a name it does not
    have. Its other NIC settings are left alone while it runs (`pending`):
    Incus applies a NIC change by unplugging the device, which leaves the
    container without its address. They take effect at the next apply of the
    stopped container; coi's own rules do not depend on them.
    """
    instance = ctx.client.instance_config(request.container)
    device, settings = find_nic(instance, ctx.bridge_name)
    wanted = np.nic_settings(settings, ifname, request.mode,
                             nic_filtering=request.nic_filtering)
    raw_lxc = str((instance.get("config") or {}).get("raw.lxc") or "")
    hooked = np.with_start_hook(raw_lxc, np.start_hook_line(
        hook or start_hook(), table=ctx.table, ifname=ifname, container=request.container,
        project=ctx.store.project, state_dir=ctx.store.root))
    config = {"raw.lxc": hooked} if hooked != raw_lxc else {}
    if instance.get("status") != "Stopped":
        live = ((ctx.client.instance_state(request.container).get("network") or {})
                .get(settings.get("name") or device) or {}).get("host_name")
        if live != ifname:
            raise BadInput(f"container {request.container} is running with host-side "
                           f"interface {live or '?'}, not coi's {ifname}",
                           hint="stop it, run coi-net apply, then start it (or create it "
                                "with net_device_override)")
        if config:  # raw.lxc counts from the next start; the NIC waits for a stop
            ctx.client.patch_instance(request.container, config=config)
        return "unchanged" if wanted == settings else "pending"
    if wanted == settings and not config:
        return "unchanged"
    # One PATCH (a dry run plans it): the NIC, and the start hook that restores its
    # rules whenever the container starts (coi-net-hook).
    ctx.client.patch_instance(request.container, config=config,
                              devices={device: wanted} if wanted != settings else None)
    return "changed"


def start_hook() -> str:
    """coi-net-hook beside this coi-net (a checkout's bin/, or the copy `coi setup`
    installs for the host service), else that installed copy."""
    found = find_executable(np.START_HOOK_NAME)
    if found is None and os.access(INSTALLED_HOOK, os.X_OK):
        found = INSTALLED_HOOK
    if found is None:
        raise NotFound(f"{np.START_HOOK_NAME} is not installed, so rules could not come back "
                       "at a start", hint="run 'sudo coi setup'")
    return os.path.abspath(found)  # not the link's target: the hook finds coi-net beside it


def apply(ctx: Context, request: Request, *, now: float | None = None,
          nic_prepared: bool = False) -> Record:
    """Put one container's rules in place; the NIC first (unless `nic_prepared`: adopt),
    then one nft transaction."""
    now = time.time() if now is None else now
    project = ctx.store.project
    ifname = np.host_name_for(request.container, project)
    nic = "unchanged" if nic_prepared else prepare_nic(ctx, request, ifname)
    bridge = bridge_facts(ctx.client, ctx.bridge_name)
    for address in request.allowed.addresses:
        if np.is_blocked(address, bridge):
            raise BadInput(f"allowed address {address} is inside the bridge's subnet")
    lookups: dict[str, np.Lookup] = {}
    if request.mode == "allowlist":
        lookups = np.resolve(request.allowed.names, request.resolvers, bridge=bridge,
                             timeout=request.dns_timeout, now=now)
    with ctx.store.lock():
        previous = ctx.store.load(request.container) or {}
        cached = previous.get("names") or {} if previous.get("ifname") == ifname else {}
        names = {name: np.name_entry(lookups[name], cached.get(name), now)
                 for name in request.allowed.names if name in lookups}
        state = {
            "container": request.container, "project": project, "ifname": ifname,
            "mode": request.mode, "bridge": bridge.to_json(),
            "allowed_names": list(request.allowed.names),
            "allowed_addresses": list(request.allowed.addresses),
            "allowed_wildcards": list(request.allowed.wildcards),
            "resolvers": [str(r) for r in request.resolvers],
            "dns_timeout": request.dns_timeout,
            "refresh_interval_minutes": request.refresh_minutes,
            "names": names, "applied_at": now,
            "last_refresh": now if request.mode == "allowlist" else None,
            "last_error": _failures_text(names),
        }
        existing = ctx.existing()
        policy = np.Policy(request.container, ifname, request.mode, np.state_addresses(state),
                           project)
        commands = np.base_commands(ctx.table, bridge)
        commands += np.container_commands(ctx.table, policy, bridge, existing)
        ctx.commit(commands)
        if not ctx.dry_run:
            _forget_others(ctx, ifname, request.container)
            ctx.store.save(request.container, state)
    rules = 0 if request.mode == "open" else len(np.container_rules(policy, bridge, ctx.table))
    answered = None
    if request.mode == "allowlist" and not ctx.dry_run:
        from coi_net import resolver  # noqa: PLC0415 - dnspython, as resolution needs

        answered = resolver.answering(bridge, ctx.table)
    return make_record("net_rules", container=request.container, mode=request.mode,
                       interface=ifname, rules=rules,
                       allowed=list(np.allowed_elements(policy, bridge))
                       if request.mode == "allowlist" else [],
                       wildcards=list(request.allowed.wildcards), resolver=answered,
                       names=_names_view(names), failures=_failures(names),
                       nic_changed=nic == "changed", nic_pending=nic == "pending",
                       dry_run=ctx.dry_run)


def _forget_others(ctx: Context, ifname: str, container: str) -> None:
    """Drop any other state that claims this interface: its rules were just replaced
    in the transaction, and its cached addresses must not come back."""
    for other in ctx.store.containers():
        if other != container and (ctx.store.load(other) or {}).get("ifname") == ifname:
            ctx.store.delete(other)


def _names_view(names: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {name: {"status": e.get("status"), "addresses": list(e.get("addresses") or []),
                   "blocked": list(e.get("blocked") or []), "expires": e.get("expires"),
                   "error": e.get("error") or ""}
            for name, e in names.items()}


def _failures(names: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": name, "error": e.get("error") or "", "kept": list(e.get("addresses") or [])}
            for name, e in names.items() if e.get("status") == "failed"]


def _failures_text(names: Mapping[str, Mapping[str, Any]]) -> str:
    return "; ".join(f"{f['name']}: {f['error']}" for f in _failures(names))


# -- remove ------------------------------------------------------------------------------------


def remove(ctx: Context, container: str) -> Record:
    """Remove one container's rules and state; fine when there are none."""
    validate_container_name(container)
    with ctx.store.lock():
        state = ctx.store.load(container) or {}
        ifname = state.get("ifname") or np.host_name_for(container, ctx.store.project)
        np.validate_ifname(ifname)
        existing = ctx.existing()
        commands = np.removal_commands(ctx.table, ifname, existing)
        ctx.commit(commands)
        had_state = bool(state)
        if not ctx.dry_run:
            ctx.store.delete(container)
    return make_record("net_removed", container=container, interface=ifname,
                       removed=bool(commands) or had_state, dry_run=ctx.dry_run)


# -- containers of a remote coi (docs/remote.md, section 4) --------------------------------------


SERVER_MODES: Final = ("restricted",)
"""What a server's coi enforces for a remote coi: restricted needs nothing but the
container's own keys; allowlist would need names the server must not trust."""


def mark_for_server(ctx: Context, request: Request) -> Record:
    """A container on a remote, made stopped by this host's coi: its NIC gets coi's name
    and filtering, and its start hook is the coi-net-hook that `coi setup` installed
    on the server (INSTALLED_HOOK, the server's own table and state directory). At
    every start the server's hook puts the rules in place (adopt), or the container
    does not start: fail closed, enforced where its packets flow. This host's nftables
    are not touched."""
    if request.mode not in SERVER_MODES:
        raise CoiError(f"network mode {request.mode} cannot be enforced on a remote: only "
                       "restricted is, by the server's own coi", hint="use --network "
                       "restricted or open there, or run the session on this machine")
    ifname = np.host_name_for(request.container, ctx.store.project)
    nic = prepare_nic(ctx, request, ifname, hook=INSTALLED_HOOK)
    return make_record("net_rules", container=request.container, mode=request.mode,
                       interface=ifname, rules=0, allowed=[], wildcards=[], resolver=None,
                       names={}, failures=[], nic_changed=nic == "changed",
                       nic_pending=nic == "pending", dry_run=ctx.dry_run,
                       enforced_by="server")


def adopt(ctx: Context, name: str) -> Record | str:
    """On a server: a container that a remote host's coi made here in restricted mode
    (user.coi.origin, user.coi.network, its NIC named by mark_for_server), starting with
    no policy recorded yet. Its rules are applied from its own keys (the start hook's
    restore). Only restricted mode is adopted: it widens nothing. A string: why it is
    not such a container (the hook then fails, and the container does not start)."""
    from coi_common.sessions import SessionContainer  # noqa: PLC0415

    try:
        instance = ctx.client.instance_config(name)
    except NotFound:
        return "no such container"
    keys = SessionContainer.from_instance(instance)
    if keys is None or not keys.origin:
        return "no rules applied by coi"
    if keys.network not in SERVER_MODES:
        return f"a remote coi's container in {keys.network} mode, which no server enforces"
    ifname = np.host_name_for(name, ctx.store.project)
    _device, settings = find_nic(instance, ctx.bridge_name)
    if settings.get("host_name") != ifname:
        return f"its NIC is not named {ifname}"  # its packets would not pass coi's port
    return apply(ctx, Request(name, keys.network, np.Allowed(), (), 0), nic_prepared=True)


# -- refresh -----------------------------------------------------------------------------------


def refresh(ctx: Context, containers: Sequence[str], *, force: bool = False,
            resolve: bool = True, now: float | None = None) -> list[Record]:
    """Re-resolve what is due, swap changed allowlist sets, restore missing rules.

    Explicitly named containers resolve every name; the sweep over all of them
    (no names: cron) takes only names whose answers expired and skips
    containers whose refresh interval is 0, unless `force`. Without `resolve`
    (restore: the start hook) only missing rules come back, from the cache.
    Every change of every container goes into ONE transaction.
    """
    now = time.time() if now is None else now
    explicit = bool(containers)
    targets = [validate_container_name(c) for c in containers] or ctx.store.containers()
    states: dict[str, dict[str, Any]] = {}
    records: list[Record] = []
    for name in targets:
        state = ctx.store.load(name)
        adopted = adopt(ctx, name) if state is None and explicit and not resolve else \
            "no rules applied by coi"
        if state is None:
            ok = not isinstance(adopted, str)
            records.append(make_record("net_refresh", container=name, ok=ok, changed=ok,
                                       added=[], removed=[], restored=ok, failures=[] if ok
                                       else [{"name": "", "error": adopted, "kept": []}]))
            continue
        states[name] = state
    lookups = _resolve_due(states, explicit=explicit, force=force, now=now) if resolve else {}
    with ctx.store.lock():
        existing = ctx.existing()
        commands: list[dict[str, Any]] = []
        need_base = not ctx.base_present(existing)
        saves: dict[str, dict[str, Any]] = {}
        for name in states:
            state = ctx.store.load(name)  # fresh, under the lock
            if state is None:
                continue
            record, cmds, heal = _refresh_one(ctx, state, lookups.get(name) or {}, existing, now)
            need_base = need_base or heal
            commands += cmds
            saves[name] = state
            records.append(record)
        if need_base and saves:  # a base of an older coi is healed too
            bridges = [np.Bridge.from_json(s["bridge"]) for s in saves.values()]
            commands = np.base_commands(ctx.table, bridges[0]) + commands
        ctx.commit(commands)
        if not ctx.dry_run:
            for name, state in saves.items():
                ctx.store.save(name, state)
    order = {name: i for i, name in enumerate(targets)}
    return sorted(records, key=lambda r: order.get(r["container"], 0))


def _resolve_due(states: Mapping[str, Mapping[str, Any]], *, explicit: bool, force: bool,
                 now: float) -> dict[str, dict[str, np.Lookup]]:
    """Resolve, concurrently and once per name and resolver set, what each state needs."""
    wanted: dict[tuple[tuple[np.Resolver, ...], float], dict[str, list[str]]] = {}
    for name, state in states.items():
        if state.get("mode") != "allowlist":
            continue
        if explicit or force:
            due = [np.validate_domain(n) for n in state.get("allowed_names") or []]
        elif not state.get("refresh_interval_minutes"):
            continue
        else:
            due = [np.validate_domain(n) for n in np.due_names(state, now)]
        if not due:
            continue
        key = (np.parse_resolvers(state.get("resolvers") or []),
               float(state.get("dns_timeout") or np.DEFAULT_DNS_TIMEOUT))
        wanted.setdefault(key, {})[name] = due
    results: dict[str, dict[str, np.Lookup]] = {}
    for (resolvers, timeout), per_container in wanted.items():
        unique = sorted({n for names in per_container.values() for n in names})
        bridge = np.Bridge.from_json(states[next(iter(per_container))]["bridge"])
        answers = np.resolve(unique, resolvers, bridge=bridge, timeout=timeout, now=now)
        for container, names in per_container.items():
            results[container] = {n: answers[n] for n in names}
    return results


def _refresh_one(ctx: Context, state: dict[str, Any], lookups: Mapping[str, np.Lookup],
                 existing: np.Existing, now: float) -> tuple[Record, list[dict[str, Any]], bool]:
    """Update one state in place; return its record, its commands, whether it healed."""
    name, mode = state["container"], state.get("mode")
    ifname = np.validate_ifname(state.get("ifname"))
    bridge = np.Bridge.from_json(state["bridge"])
    before = {*existing.elements.get(np.set_name(ifname), ()),
              *existing.elements.get(np.set_name6(ifname), ())}
    names = dict(state.get("names") or {})
    for domain, lookup in lookups.items():
        names[domain] = np.name_entry(lookup, names.get(domain), now)
    state["names"] = names
    if lookups:
        state["last_refresh"] = now
    failures = [f for f in _failures(names) if f["name"] in lookups]
    state["last_error"] = "; ".join(f"{f['name']}: {f['error']}" for f in failures)
    policy = np.Policy(name, ifname, str(mode), np.state_addresses(state),
                       str(state.get("project") or "default"))
    commands: list[dict[str, Any]] = []
    healed = False
    sets = {np.set_name(ifname), np.answered_set(ifname),
            *([np.set_name6(ifname), np.answered_set(ifname, 6)] if bridge.ipv6 else [])}
    complete = ifname in existing.ports and (mode == "open" or (
        np.chain_name(ifname) in existing.chains
        and (mode != "allowlist" or sets <= existing.sets)))
    if not complete:
        commands = np.container_commands(ctx.table, policy, bridge, existing)
        healed = True
    after = set(np.allowed_elements(policy, bridge)) if mode == "allowlist" else set()
    if mode == "allowlist" and not healed and after != before:
        commands = np.set_refill_commands(ctx.table, policy, bridge)
    record = make_record("net_refresh", container=name, ok=not failures,
                         changed=bool(commands), added=sorted(after - before),
                         removed=sorted(before - after), restored=healed, failures=failures)
    return record, commands, healed


# -- status ------------------------------------------------------------------------------------


def status(ctx: Context, container: str | None, *, now: float | None = None) -> list[Record]:
    """What is in force for one container (or all with state)."""
    now = time.time() if now is None else now
    names = [validate_container_name(container)] if container else ctx.store.containers()
    try:
        existing: np.Existing | None = ctx.existing()
    except PermissionDenied:
        existing = None  # not root: what the state says, without the live counters
    records = []
    for name in names:
        state = ctx.store.load(name)
        if state is None:
            raise NotFound(f"coi has no network rules for container {name}",
                           hint=f"coi network apply {name}")
        ifname = np.validate_ifname(state.get("ifname"))
        chain = np.chain_name(ifname)
        in_table = None if existing is None else existing.has(ifname)
        if existing is not None and state.get("mode") == "allowlist":
            allowed = sorted({*existing.elements.get(np.set_name(ifname), ()),
                              *existing.elements.get(np.set_name6(ifname), ())},
                             key=np.address_key)
        else:
            allowed = list(np.state_addresses(state)) if state.get("mode") == "allowlist" else []
        last = state.get("last_refresh")
        answered = [] if existing is None else sorted(
            {*existing.elements.get(np.answered_set(ifname), ()),
             *existing.elements.get(np.answered_set(ifname, 6), ())}, key=np.address_key)
        records.append(make_record(
            "net_status", container=name, mode=state.get("mode"), interface=ifname,
            rules=None if existing is None else existing.rules.get(chain, 0),
            dropped=None if existing is None else existing.dropped.get(chain, 0),
            in_table=in_table, policy=None if existing is None else existing.policy(ifname),
            allowed=allowed, answered=answered, wildcards=state.get("allowed_wildcards") or [],
            names=_names_view(state.get("names") or {}),
            refresh_interval_minutes=state.get("refresh_interval_minutes"),
            applied_at=state.get("applied_at"), last_refresh=last,
            cache_age=None if last is None else round(now - float(last), 1),
            next_refresh=np.next_refresh(state), last_error=state.get("last_error") or "",
            link=link_info(ifname, np.Bridge.from_json(state["bridge"]).name)))
    return records


def link_info(ifname: str, bridge_name: str) -> dict[str, Any]:
    """The host-side veth as netlink sees it: present, up, a port of the bridge."""
    try:
        from pyroute2 import IPRoute  # noqa: PLC0415 - ~200 ms: status only
    except ImportError:
        return {"present": None}
    try:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=ifname)
            if not index:
                return {"present": False}
            link = ipr.get_links(index[0])[0]
            master = link.get_attr("IFLA_MASTER")
            master_name = None
            if master:
                master_name = ipr.get_links(master)[0].get_attr("IFLA_IFNAME")
            return {"present": True, "up": link.get_attr("IFLA_OPERSTATE") == "UP",
                    "bridge": master_name, "on_bridge": master_name == bridge_name}
    except Exception as exc:  # status must still show the rules
        return {"present": None, "error": str(exc)[:120]}


# -- gc ----------------------------------------------------------------------------------------


def gc(ctx: Context) -> list[Record]:
    """Remove rules and state of containers that no longer exist in our project.

    Rules without state (coi killed between the transaction and the state
    write) are found by the container named in their chain's comment.
    """
    project = ctx.store.project
    records: list[Record] = []
    with ctx.store.lock():
        # Listed under the lock: a container applied after the listing cannot be
        # taken for gone (apply records its state under this lock, once it exists).
        alive = set(ctx.client.names("/1.0/instances"))
        existing = ctx.existing()
        commands: list[dict[str, Any]] = []
        gone: list[tuple[str, str]] = []
        claimed: set[str] = set()
        for name in ctx.store.containers():
            state = ctx.store.load(name) or {}
            ifname = np.validate_ifname(state.get("ifname"))
            claimed.add(ifname)
            if name not in alive:
                commands += np.removal_commands(ctx.table, ifname, existing)
                gone.append((name, ifname))
        for ifname in sorted(existing.ifnames() - claimed):
            owner = _owner(existing.comments.get(np.chain_name(ifname), ""))
            if owner is None or owner[0] != project or owner[1] in alive:
                continue
            if np.host_name_for(owner[1], project) != ifname:
                continue
            commands += np.removal_commands(ctx.table, ifname, existing)
            gone.append((owner[1], ifname))
        ctx.commit(commands)
        for name, ifname in gone:
            if not ctx.dry_run:
                ctx.store.delete(name)
            records.append(make_record("net_removed", container=name, interface=ifname,
                                       removed=True, dry_run=ctx.dry_run))
    return records


def _owner(comment: str) -> tuple[str, str] | None:
    """(project, container) from a chain comment `coi:PROJECT/NAME`."""
    if not comment.startswith("coi:") or "/" not in comment:
        return None
    project, _, name = comment[4:].partition("/")
    try:
        return np.validate_project(project), validate_container_name(name)
    except CoiError:
        return None


# -- teardown ----------------------------------------------------------------------------------


def teardown(ctx: Context) -> Record:
    """Delete coi's own tables (both families) and every container's recorded state, in
    one transaction: what `coi setup --uninstall` runs once coi's containers are gone.
    A second run finds nothing and changes nothing."""
    with ctx.store.lock():
        families = [family for family in nft.FAMILIES if nft.list_table(family, ctx.table)]
        ctx.commit([{"delete": {"table": {"family": family, "name": ctx.table}}}
                    for family in families])
        states = ctx.store.containers()
        if not ctx.dry_run:
            for name in states:
                ctx.store.delete(name)
    return make_record("net_teardown", tables=[f"{family} {ctx.table}" for family in families],
                       states=states, dry_run=ctx.dry_run)
