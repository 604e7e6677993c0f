"""The verbs of coi-session on top of coi_session.saved_sessions; rendering at the edge.

Each verb returns records (sessions, save or restore results); `run()` prints
them as text or JSON (one record, or JSON Lines for listings).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

from coi_common import config, incus, naming, output
from coi_common.entry import Args
from coi_common.errors import BadInput, CoiError, NotFound
from coi_common.protocol import make_record, read_record, write_record
from coi_common.sessions import RESUME_LATEST, SlotRecord
from coi_session import saved_sessions
from coi_session.saved_sessions import ORIGINAL, Session, Store

NONE_SHOWN: Final = "-"
_KEEP: Final = re.compile(r"0|[1-9][0-9]{0,5}")
_EVERY: Final = re.compile(r"[1-9][0-9]{0,4}")


def run(args: Args) -> int:
    """Dispatch one coi-session command; returns the exit status."""
    as_json = output.wants_json(args)
    for verb in ("save", "restore", "list", "latest", "show", "delete", "prune", "info",
                 "sync"):
        if args.get(verb):
            return int(globals()[f"_{verb}"](args, as_json) or 0)
    raise BadInput("no command given")  # docopt makes this unreachable


# -- helpers ------------------------------------------------------------------------------


def _workspace(args: Args) -> str:
    given = args.get("--workspace")
    return naming.canonical_workspace("." if given is None else given)  # "" is refused


def _store(workspace: str | None = None) -> tuple[Store, Any]:
    settings = config.load(workspace, lenient=True)
    return Store(settings.path("paths.state_dir")), settings


def _tool_filter(args: Args) -> str | None:
    return naming.validate_tool_name(args["--tool"]) if args.get("--tool") is not None \
        else None


def _container(args: Args) -> str:
    """<name>, or the container of a slot record on stdin."""
    if args.get("<name>") is not None:
        return naming.validate_container_name(args["<name>"])
    return _slot_record().container


def _slot_record() -> SlotRecord:
    if sys.stdin.isatty():
        raise BadInput("name a container, or pipe a slot record in (coi-slot next | ...)")
    return SlotRecord.from_record(read_record("slot"))


def _client(name: str) -> incus.Incus:
    """A client for the daemon and project of the effective config (`name` is checked)."""
    naming.validate_container_name(name)
    return incus.connect(config.load(None))


def _when(text: str) -> str:
    return text[:19].replace("T", " ") if text else NONE_SHOWN


# -- verbs --------------------------------------------------------------------------------


def _save(args: Args, as_json: bool) -> int:
    name = _container(args)
    result = saved_sessions.save_container(_client(name), name)
    if result.synced is not None:
        print(f"coi: {result.synced.line()}", file=sys.stderr)
        _tell_sync(result.synced)
    for dropped in result.dropped[:saved_sessions.SHOWN_DROPS]:
        print(f"coi: dropped {dropped}", file=sys.stderr)
    if as_json:
        write_record(result.to_record())
    else:
        print(result.line(), flush=True)
    return 0


def _restore(args: Args, as_json: bool) -> int:
    if args["<id>"] is not None:
        session_id = naming.validate_session_id(args["<id>"])
        name = _container(args)
        store, _ = _store(None)
        session: Session | None = store.find(session_id)
        settings = None  # the config of the container's own workspace
    else:
        record = _slot_record()
        name = record.container
        settings = config.load(record.workspace, profile=record.config_profile or None,
                               lenient=True)
        session = _asked_for(Store(settings.path("paths.state_dir")), record)
    if args["--check"]:
        if session is not None:
            _print_session(session, as_json)
        return 0
    result = saved_sessions.restore_into(_client(name), name, session, settings=settings)
    if as_json:
        write_record(result.to_record())
    else:
        print(result.line(), flush=True)
    return 0


def _asked_for(store: Store, record: SlotRecord) -> Session | None:
    """The saved session a slot record's `resume` asks for: only ever one of its
    workspace and tool; None (with a warning) when it asks for the newest and there
    is none: the tool then starts fresh."""
    if not record.resume:
        return None
    wanted = None if record.resume == RESUME_LATEST else record.resume
    session = store.for_resume(record.workspace, record.tool, wanted)
    if session is None:
        print(f"coi: no saved {record.tool} session for {record.workspace}; starting fresh",
              file=sys.stderr)
    return session


def _list(args: Args, as_json: bool) -> int:
    workspace = None if args["--all"] else _workspace(args)
    store, _ = _store(workspace)
    found = store.sessions(tool=_tool_filter(args), workspace=workspace)
    if as_json:  # one document: the listing
        write_record(make_record("session_list", sessions=[s.to_record() for s in found]))
        return 0
    if not found:
        print("no saved sessions" + (f" for {workspace}" if workspace else ""), flush=True)
        return 0
    rows = [("SESSION", "TOOL", "UPDATED", "SLOT", "FILES", "WORKSPACE")]
    rows += [(s.id, s.tool, _when(s.updated_at), str(s.slot or NONE_SHOWN),
              str(s.files) if s.layout != ORIGINAL else NONE_SHOWN, s.workspace)
             for s in found]
    print(output.table(rows), flush=True)
    return 0


def _latest_of_workspace(args: Args, hint: str) -> Session:
    workspace = _workspace(args)
    store, _ = _store(workspace)
    session = store.latest(workspace, _tool_filter(args))
    if session is None:
        raise NotFound(f"no saved session for {workspace}", hint=hint)
    return session


def _latest(args: Args, as_json: bool) -> int:
    session = _latest_of_workspace(args, "sessions are saved when a coi session ends")
    if as_json:
        write_record(session.to_record())
    else:
        print(session.id, flush=True)
    return 0


def _show(args: Args, as_json: bool) -> int:
    store, _ = _store(None)
    _print_session(store.find(args["<id>"]), as_json)
    return 0


def _info(args: Args, as_json: bool) -> int:
    if args.get("<id>") is not None:  # an empty id is refused, not read as "the newest"
        return _show(args, as_json)
    return _show_latest(args, as_json)


def _show_latest(args: Args, as_json: bool) -> int:
    """The newest session of the workspace; outside any workspace with sessions (and no
    --workspace given), the newest of every workspace, said so on stderr."""
    try:
        session = _latest_of_workspace(args, "coi session list --all shows every workspace's")
    except NotFound:
        store, _ = _store(None)
        newest = store.sessions(tool=_tool_filter(args), workspace=None)
        if args["--workspace"] is not None or not newest:
            raise
        session = newest[0]
        print(f"coi: no saved session for {_workspace(args)}; the newest of every workspace "
              f"is {session.id} ({session.workspace})", file=sys.stderr, flush=True)
    _print_session(session, as_json)
    return 0


def _print_session(session: Session, as_json: bool) -> None:
    if as_json:
        write_record(session.to_record())
        return
    fields = [("session", session.id), ("tool", session.tool),
              ("workspace", session.workspace),
              ("slot", str(session.slot) if session.slot else NONE_SHOWN),
              ("container", session.container or NONE_SHOWN),
              ("image", session.image or NONE_SHOWN),
              ("persistent", str(session.persistent).lower()),
              ("created", session.created_at or NONE_SHOWN),
              ("updated", session.updated_at),
              ("resumed from", session.resumed_from or NONE_SHOWN),
              ("files", f"{session.files} ({session.bytes} bytes)"
               if session.layout != ORIGINAL else "not counted (saved by the original coi)"),
              ("coi version", session.coi_version or NONE_SHOWN), ("path", session.path),
              ("layout", session.layout),
              ("resume", f"coi shell --resume={session.id} (in {session.workspace})")]
    width = max(len(key) for key, _ in fields) + 1
    print("\n".join(f"{key + ':':<{width}} {value}" for key, value in fields), flush=True)


def _delete(args: Args, as_json: bool) -> int:
    store, _ = _store(None)
    tool, path = store.locate(args["<id>"])
    # A session whose metadata is unreadable can still be deleted: that is the fix.
    session = store.read(path, tool) or Session(
        id=args["<id>"], tool=tool, workspace="", updated_at="", path=path)
    store.delete(session)
    _print_deleted([session], as_json)
    return 0


def _prune(args: Args, as_json: bool) -> int:
    keep = older = None
    if args["--keep"] is not None:
        if not _KEEP.fullmatch(args["--keep"]):
            raise BadInput(f"--keep {args['--keep']!r} is not a whole number 0 or more")
        keep = int(args["--keep"])
    else:
        older = saved_sessions.parse_duration(args["--older-than"])
    workspace = None if args["--all"] else _workspace(args)
    store, _ = _store(workspace)
    deleted = store.prune(keep=keep, older_than=older, tool=_tool_filter(args),
                          workspace=workspace)
    if not deleted and not as_json:
        print("nothing to prune", flush=True)
    _print_deleted(deleted, as_json)
    return 0


def _print_deleted(deleted: Sequence[Session], as_json: bool) -> None:
    for session in deleted:
        if as_json:
            write_record(make_record("session_deleted", id=session.id, tool=session.tool,
                                     workspace=session.workspace,
                                     updated_at=session.updated_at, path=session.path))
        else:
            print(f"deleted session {session.id} ({session.tool}, {session.workspace}, "
                  f"{_when(session.updated_at)})", flush=True)



def _sync(args: Args, as_json: bool) -> int:
    """coi sync pull|push: each container's result; conflicts are warnings (exit 0).
    --every: again until every container named is gone."""
    from coi_session import workspace_sync  # noqa: PLC0415

    direction = "pull" if args["pull"] else "push"
    every = _every(args["--every"]) if args["--every"] is not None else None
    settings = config.load(None)
    client = incus.connect(settings)
    wanted = _sync_targets(args, settings, client)
    while wanted:
        for name, workspace, mask in list(wanted):
            try:
                instance = client.instance_config(name) if every is not None else None
                if instance is not None and instance.get("status") != "Running":
                    continue  # stopped, or stopping: its end pulls, and it may start again
                result = workspace_sync.sync(client, name, settings, direction,
                                             workspace=workspace, mask=mask,
                                             instance=instance)
            except NotFound:
                if every is None:
                    raise
                wanted.remove((name, workspace, mask))  # gone: its last save pulled it
                continue
            except CoiError as exc:
                if every is None:
                    raise
                print(f"coi: {exc.one_line()}; again in {every:g} s", file=sys.stderr)
                continue
            _tell_sync(result)
            if every is not None and not (result.copied or result.deleted or result.conflicts):
                continue  # nothing came over: no line every few seconds
            if as_json:
                write_record(result.to_record())
            else:
                print(result.line(), flush=True)
        if every is None:
            break
        time.sleep(every)
    return 0


def _every(text: str) -> float:
    if not _EVERY.fullmatch(text) or not 1 <= int(text) <= 86400:
        raise BadInput(f"--every {text!r}: give whole seconds, 1 to 86400")
    return float(text)


def _sync_targets(args: Args, settings: Any, client: Any) -> list[tuple[str, str | None, bool]]:
    """(container, the workspace of a first push, mask) for each container to sync."""
    from coi_session import workspace_sync  # noqa: PLC0415

    if args.get("<name>") is not None:
        return [(naming.validate_container_name(args["<name>"]), None, True)]
    if not sys.stdin.isatty():
        record = _slot_record()
        return [(record.container, record.workspace, record.mask)]
    found = [(name, None, True) for name in workspace_sync.synced_here(
        settings, client, naming.canonical_workspace("."))]
    if not found:
        raise NotFound("no container of this workspace was synced from this host",
                       hint="coi list shows the sessions; name one")
    return found


def _tell_sync(result: Any) -> None:
    for line in result.warnings():
        print(f"coi: {line}", file=sys.stderr)
