"""`coi tmux list|send|capture`: drive running sessions from scripts."""

from __future__ import annotations

from typing import Any

from coi_common import config, incus, naming, proc, sessions
from coi_common.entry import Args
from coi_common.errors import CoiError, NotFound
from coi_common.protocol import make_record, write_record


def run(args: Args) -> int:
    settings = config.load(None)
    client = incus.connect(settings)
    if args["list"]:
        return list_sessions(client, as_json=args["--format"] == "json")
    name = _running_session(client, args["<name>"])
    if args["send"]:
        _tmux(client, name, ["send-keys", "-t", sessions.TMUX_SESSION, "-l", args["<text>"]])
        _tmux(client, name, ["send-keys", "-t", sessions.TMUX_SESSION, "Enter"])
        return 0
    print(_tmux(client, name, ["capture-pane", "-p", "-t", sessions.TMUX_SESSION]).rstrip("\n"))
    return 0


def _running_session(client: incus.Incus, name: str) -> str:
    name = naming.validate_container_name(name)
    ours = {i["name"]: i for i in sessions.coi_containers(client, naming.container_prefix())}
    if name not in ours:
        raise NotFound(f"no coi session container {name}", hint="coi tmux list shows them")
    if ours[name].get("status") != "Running":
        raise CoiError(f"{name} is not running")
    return name


def _tmux(client: incus.Incus, name: str, tmux_args: list[str]) -> str:
    argv = sessions.exec_argv(client, name, ["tmux", *tmux_args], tty=False,
                              env=sessions.session_env())
    done = proc.run(argv, check=False, timeout=30)
    if not done.ok:
        raise CoiError(f"{name}: no tmux session ({proc.last_line(done.stderr)})",
                       hint=f"coi attach {name} starts one")
    return done.stdout


def list_sessions(client: incus.Incus, *, as_json: bool) -> int:
    """Each running coi container and whether its tmux session exists and is attached."""
    rows = [_session_row(client, i) for i in sessions.coi_containers(
        client, naming.container_prefix()) if i.get("status") == "Running"]
    if as_json:
        for row in rows:
            write_record(make_record("tmux_session", **row))
        return 0
    if not rows:
        print("no running coi sessions")
    for row in rows:
        state = ("attached" if row["attached"] else "detached") if row["tmux"] else "no tmux"
        print(f"{row['name']}  {state}  {row['workspace']}")
    return 0


def _session_row(client: incus.Incus, instance: dict[str, Any]) -> dict[str, Any]:
    argv = sessions.exec_argv(client, instance["name"],
                              ["tmux", "list-sessions", "-F", "#{session_name} "
                               "#{session_attached}"], tty=False, env=sessions.session_env())
    done = proc.run(argv, check=False, timeout=30)
    attached = {line.split()[0]: line.split()[1] != "0"
                for line in done.stdout.splitlines() if len(line.split()) == 2}
    return {"name": instance["name"],
            "workspace": instance["config"].get(f"{sessions.KEY}workspace", ""),
            "tmux": sessions.TMUX_SESSION in attached,
            "attached": attached.get(sessions.TMUX_SESSION, False)}
