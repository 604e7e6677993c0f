"""`coi list`: coi's containers (and saved sessions), as data, a table or one JSON record.

Everything shown comes from one Incus request (sessions.coi_containers):
the `user.coi.*` keys on each container say its workspace, slot, mode,
image, tool and network. Saved sessions come from `coi-session list --all`.

Each user sees the containers they started (coi_common.owners; root and
--all-users see everyone's). The JSON form keeps the shape scripts of the
original tool read: one object with `active_containers` (and
`saved_sessions` with --all), whose entries carry name, status, persistent,
workspace, ipv4 ("" when none), image and created_at; coi adds slot, tool,
network, mode and owner_uid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from coi_common import config, incus, naming, output, owners, plumbing, sessions
from coi_common.incus import ipv4_of
from coi_common.protocol import Record, make_record, validate, write_record

KEY: Final = sessions.KEY
NONE_SHOWN: Final = "-"
EMPTY_LINE: Final = "no coi containers"
NO_SESSIONS_LINE: Final = "no saved sessions"


@dataclass(frozen=True)
class ContainerRow:
    """One coi container as `coi list` shows it."""

    name: str
    status: str
    persistent: bool
    workspace: str
    slot: int | None
    image: str
    tool: str
    network: str
    ipv4: str
    created_at: str
    owner_uid: int | None = None
    pooled: bool = False
    """An idle container of a warm pool: made for sessions, used by none yet."""
    remote: str = "local"
    """The server it runs on: `local`, or the incus client's remote (incus.remote)."""
    location: str = ""
    """The cluster member it runs on ("" off a cluster)."""

    @property
    def mode(self) -> str:
        return "persistent" if self.persistent else "ephemeral"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "persistent": self.persistent,
                "workspace": self.workspace, "ipv4": self.ipv4, "image": self.image,
                "created_at": self.created_at, "slot": self.slot, "tool": self.tool,
                "network": self.network, "mode": self.mode, "owner_uid": self.owner_uid,
                "pooled": self.pooled, "remote": self.remote, "location": self.location}


@dataclass(frozen=True)
class SavedSession:
    """One saved session directory; keys in JSON as the original tool spelt them."""

    id: str
    saved_at: str
    workspace: str
    tool: str

    def to_json(self) -> dict[str, str]:
        return {"ID": self.id, "SavedAt": self.saved_at, "Workspace": self.workspace,
                "Tool": self.tool}


def run(*, everything: bool, all_users: bool, as_json: bool) -> int:
    """List and print; exit status 0."""
    settings = config.load(None)
    rows = list_containers(incus.connect(settings), naming.container_prefix(),
                           uid=owners.caller_uid(), all_users=all_users)
    saved = saved_sessions() if everything else None
    if as_json:
        write_record(list_record(rows, saved))
    else:
        print(render_text(rows, saved), flush=True)
    return 0


# -- data ----------------------------------------------------------------------------------


def list_containers(client: incus.Incus, prefix: str, *, uid: int,
                    all_users: bool) -> list[ContainerRow]:
    """coi's containers under `prefix` that `uid` sees, by workspace, then slot."""
    found = owners.visible(sessions.coi_containers(client, prefix, with_state=True), uid=uid,
                           all_users=all_users)
    where = client.remote.name if client.remote is not None else "local"
    rows = [row_from_incus(raw, where) for raw in found]
    return sorted(rows, key=lambda r: (r.workspace, r.slot or 0, r.name))


def row_from_incus(raw: Mapping[str, Any], remote: str = "local") -> ContainerRow:
    """A row from Incus's JSON for one instance with its state (with_state), on
    `remote`; a container whose keys do not parse shows what it has."""
    location = str(raw.get("location") or "")
    keys = sessions.SessionContainer.from_instance(raw) or sessions.SessionContainer(
        "", 0, False, "", "", "", None)
    return ContainerRow(
        name=str(raw["name"]), status=str(raw.get("status") or ""),
        persistent=keys.persistent, workspace=keys.workspace, slot=keys.slot or None,
        image=keys.image, tool=keys.tool, network=keys.network,
        ipv4=ipv4_of(raw.get("state")), created_at=str(raw.get("created_at") or ""),
        owner_uid=keys.host_uid, pooled=keys.idle_in_pool, remote=remote,
        location="" if location == "none" else location)


def saved_sessions() -> list[SavedSession]:
    """Every saved session, newest first: `coi-session list --all` (the store is
    coi-session's; it warns about unreadable metadata itself)."""
    return [SavedSession(id=str(s["id"]), saved_at=str(s["updated_at"]),
                         workspace=str(s["workspace"]), tool=str(s["tool"]))
            for s in listed_sessions()]


def listed_sessions() -> list[Record]:
    """The session records of `coi-session list --all` (one session_list document),
    each checked as a session record."""
    return [validate(s, "session") for listing in plumbing.call(
        "coi-session", ["list", "--all"], kind="session_list", dry_run=plumbing.READS)
        for s in validate(listing, "session_list")["sessions"]]


# -- rendering -----------------------------------------------------------------------------


def list_record(rows: Sequence[ContainerRow],
                saved: Sequence[SavedSession] | None = None) -> Record:
    """The `container_list` record; `saved_sessions` only when they were asked for."""
    record = make_record("container_list", active_containers=[r.to_json() for r in rows])
    if saved is not None:
        record["saved_sessions"] = [s.to_json() for s in saved]
    return record


def render_text(rows: Sequence[ContainerRow],
                saved: Sequence[SavedSession] | None = None) -> str:
    """The container table (or `no coi containers`), then the sessions when asked for."""
    if rows:
        # Where they run, when that is not simply here: the remote and cluster member.
        placed = any(r.remote != "local" or r.location for r in rows)
        where = [("REMOTE", "LOCATION")] if placed else [()]
        text = output.table([("NAME", "MODE", "STATUS", "SLOT", "IPV4", "IMAGE", "OWNER",
                              "CREATED", *where[0], "WORKSPACE")] +
                            [(r.name, r.mode, _status_word(r),
                              _shown(r.slot), r.ipv4 or NONE_SHOWN, r.image or NONE_SHOWN,
                              _shown(r.owner_uid), short_time(r.created_at),
                              *((r.remote, r.location or NONE_SHOWN) if placed else ()),
                              r.workspace or NONE_SHOWN) for r in rows])
    else:
        text = EMPTY_LINE
    if saved is None:
        return text
    if not saved:
        return f"{text}\n\n{NO_SESSIONS_LINE}"
    sessions_table = output.table([("SESSION", "TOOL", "SAVED", "WORKSPACE")] +
                            [(s.id, s.tool or NONE_SHOWN, short_time(s.saved_at),
                              s.workspace or NONE_SHOWN) for s in saved])
    return f"{text}\n\nSaved sessions:\n{sessions_table}"


def _status_word(row: ContainerRow) -> str:
    status = row.status.upper() or NONE_SHOWN
    return f"{status} (POOL)" if row.pooled else status


def _shown(number: int | None) -> str:
    return NONE_SHOWN if number is None else str(number)


def short_time(value: str) -> str:
    """An RFC 3339 time as `YYYY-MM-DD HH:MM UTC`; anything unreadable as given (or -)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value or NONE_SHOWN
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


