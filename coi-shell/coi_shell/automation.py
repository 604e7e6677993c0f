"""`coi tmux list|send|capture`: drive running sessions from scripts.

Each user drives the sessions they started (coi_common.owners): `list` shows
only those, and naming another user's container is refused (exit 5), unless
--all-users; root sees everyone's.
"""

from __future__ import annotations

from typing import Any

from coi_common import config, incus, naming, owners, proc, sessions
from coi_common.entry import Args
from coi_common.errors import CoiError, NotFound
from coi_common.protocol import make_record, write_record
from coi_shell import container

TMUX_TIMEOUT = 30
"""Seconds one tmux command in a container may take."""


def run(args: Args) -> int:
    settings = config.load(None)
    client = incus.connect(settings)
    uid, all_users = owners.caller_uid(), bool(args["--all-users"])
    if args["list"]:
        return list_sessions(client, uid=uid, all_users=all_users,
                             as_json=args["--format"] == "json")
    name = _running_session(client, args["<name>"], uid=uid, all_users=all_users)
    if args["send"]:
        _tmux(client, name, ["send-keys", "-t", sessions.TMUX_SESSION, "-l", args["<text>"]])
        _tmux(client, name, ["send-keys", "-t", sessions.TMUX_SESSION, "Enter"])
        return 0
    print(_tmux(client, name, ["capture-pane", "-p", "-t", sessions.TMUX_SESSION]).rstrip("\n"))
    return 0


def _running_session(client: incus.Incus, name: str, *, uid: int, all_users: bool) -> str:
    name = naming.validate_container_name(name)
    ours = {i["name"]: i for i in sessions.coi_containers(client, naming.container_prefix())}
    if name not in ours:
        raise NotFound(f"no coi session container {name}", hint="coi tmux list shows them")
    owners.refuse_others([ours[name]], uid=uid, all_users=all_users)
    if ours[name].get("status") != "Running":
        raise CoiError(f"{name} is not running")
    return name


def _in_session(client: incus.Incus, name: str, tmux_args: list[str]) -> proc.Result:
    spec = container.as_code(name, ["tmux", *tmux_args], tty=False, env=container.session_env())
    return client.exec_capture(spec, timeout=TMUX_TIMEOUT)


def _tmux(client: incus.Incus, name: str, tmux_args: list[str]) -> str:
    done = _in_session(client, name, tmux_args)
    if not done.ok:
        raise CoiError(f"{name}: no tmux session ({proc.last_line(done.stderr)})",
                       hint=f"coi attach {name} starts one")
    return done.stdout


def list_sessions(client: incus.Incus, *, uid: int, all_users: bool, as_json: bool) -> int:
    """Each running coi container of the caller (everyone's with all_users) and whether
    its tmux session exists and is attached."""
    found = owners.visible(sessions.coi_containers(client, naming.container_prefix()),
                           uid=uid, all_users=all_users)
    rows = [_session_row(client, i) for i in found if i.get("status") == "Running"]
    if as_json:  # one document: the listing
        write_record(make_record("tmux_list", sessions=[make_record("tmux_session", **row)
                                                        for row in rows]))
        return 0
    if not rows:
        print("no running coi sessions")
    for row in rows:
        state = ("attached" if row["attached"] else "detached") if row["tmux"] else "no tmux"
        print(f"{row['name']}  {state}  {row['workspace']}")
    return 0


def _session_row(client: incus.Incus, instance: dict[str, Any]) -> dict[str, Any]:
    done = _in_session(client, instance["name"],
                       ["list-sessions", "-F", "#{session_name} #{session_attached}"])
    attached = {line.split()[0]: line.split()[1] != "0"
                for line in done.stdout.splitlines() if len(line.split()) == 2}
    return {"name": instance["name"],
            "workspace": instance["config"].get(f"{sessions.KEY}workspace", ""),
            "tmux": sessions.TMUX_SESSION in attached,
            "attached": attached.get(sessions.TMUX_SESSION, False),
            "owner_uid": owners.owner_uid(instance)}
