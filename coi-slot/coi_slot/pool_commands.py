"""`coi pool status|fill|drain`: the warm pool of a workspace (coi_slot.pool says what
a pooled container is and when a session may claim one).

fill makes containers of the workspace's default session (what `coi run` without
flags would make) until `--size` (pool.size) are idle: each one a slot reserved as
`coi-slot next --pool` does, then `coi-shell warm`, which creates, starts and boots
it under its rules. One fill runs at a time per workspace; `coi shell` and `coi run`
start one in the background after they claim. Idle containers that no session could
claim any more (other settings, a rebuilt image, stopped) are ended by fill and by
drain, without saving: nothing ran in them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

from coi_common import config, incus, locks, naming, output, plumbing, sessions
from coi_common.entry import Args, parse_args
from coi_common.errors import CoiError
from coi_common.protocol import make_record, write_record
from coi_slot import allocate, ending, pool, slots

FILL_LOCK_SECONDS: Final = 0.0
"""A fill finds another under way and leaves the work to it."""


def run(args: Args, *, as_json: bool) -> int:
    """The pool command asked for; exit status 0."""
    workspace = naming.canonical_workspace(args["--workspace"])
    if args["status"]:
        return _status(workspace, everywhere=bool(args["--all"]), as_json=as_json)
    if args["fill"]:
        return _report(fill(workspace, _size(args["--size"])), as_json)
    return _report(drain(workspace, everywhere=bool(args["--all"])), as_json)


def _size(value: str | None) -> int | None:
    return None if value is None else naming.validate_slot(value, naming.SLOT_CEILING,
                                                           allow_auto=True)


def default_session(workspace: str) -> tuple[Any, sessions.SlotRecord]:
    """The settings and the described record of `coi run` without flags here."""
    import coi_slot  # noqa: PLC0415 - its usage, loaded already

    args = parse_args("coi-slot", coi_slot.__doc__ or "",
                      ["next", "--pool", "--workspace", workspace])
    settings = allocate.load_settings(args)
    return settings, allocate.described_record(args, settings)


def fill(workspace: str, size: int | None = None) -> list[Mapping[str, Any]]:
    """Idle containers of the default session made until `size` (pool.size) are;
    first, those no session could claim are ended. The container_action records."""
    settings, record = default_session(workspace)
    wanted = settings.get("pool.size") if size is None else size
    done: list[Mapping[str, Any]] = []
    try:
        with locks.private(os.path.join(settings.path("paths.state_dir"), "pool"),
                           f"{naming.workspace_hash(workspace)}.lock",
                           timeout=FILL_LOCK_SECONDS, what="the warm pool of this workspace"):
            client = incus.connect(settings)
            current = _sorted_out(client, settings, record, done)
            for _ in range(max(0, wanted - current)):
                done.append(_warm(client, settings, record))
    except locks.LockTimeout:
        print("coi: a fill of this workspace's pool is under way already", file=sys.stderr)
    return done


def _sorted_out(client: incus.Incus, settings: Any, record: sessions.SlotRecord,
                done: list[Mapping[str, Any]]) -> int:
    """How many idle containers could serve `record`; the others are ended (into
    `done`)."""
    idle = pool.idle_of(slots.workspace_instances(client, record.workspace),
                        record.workspace, sessions.invoking_ids()[0])
    key = pool.fresh_key(record, settings) if idle else ""
    image = pool.image_fingerprint(client, record.image) if idle else ""
    current = 0
    for instance, _keys in idle:
        if pool.claimable(instance, key, image):
            current += 1
        else:
            done.append(_ended(client, instance["name"]))
    return current


def _warm(client: incus.Incus, settings: Any, record: sessions.SlotRecord
          ) -> Mapping[str, Any]:
    """One pooled container: its slot reserved, then `coi-shell warm`."""
    placed = allocate.in_a_slot(client, settings, record, None, for_pool=True)
    try:
        [result] = plumbing.call("coi-shell", ["warm"], record=placed.to_record(),
                                 kind="container_action")
    finally:
        slots.release(settings.path("paths.state_dir"), placed.workspace, placed.slot)
    return result


def drain(workspace: str, *, everywhere: bool) -> list[Mapping[str, Any]]:
    """End the idle pooled containers of the workspace (`everywhere`: of every
    workspace of the caller's)."""
    settings = config.load(workspace, lenient=True)
    client = incus.connect(settings)
    idle = pool.idle_of(sessions.coi_containers(client, naming.container_prefix()),
                        None if everywhere else workspace, sessions.invoking_ids()[0])
    return [_ended(client, instance["name"]) for instance, _keys in idle]


def _ended(client: incus.Incus, name: str) -> Mapping[str, Any]:
    end = ending.end_session(client, name, save=False)
    return make_record("container_action", name=name, action="drain", ok=end.deleted,
                       deleted=end.deleted, saved=False, message=end.message)


def _report(results: Sequence[Mapping[str, Any]], as_json: bool) -> int:
    for result in results:
        if as_json:
            write_record(dict(result))
        else:
            print(f"{result['name']}: {_word(result)}", flush=True)
    failed = [r for r in results if not r.get("ok")]
    if failed:
        raise CoiError(f"{failed[0]['name']}: {failed[0].get('message') or 'failed'}")
    return 0


def _word(result: Mapping[str, Any]) -> str:
    return "warm, in the pool" if result.get("action") == "warm" else "removed from the pool"


# -- status --------------------------------------------------------------------------------


def _status(workspace: str, *, everywhere: bool, as_json: bool) -> int:
    settings, record = default_session(workspace)
    client = incus.connect(settings)
    idle = pool.idle_of(sessions.coi_containers(client, naming.container_prefix()),
                        None if everywhere else workspace, sessions.invoking_ids()[0])
    here = any(keys.workspace == workspace for _instance, keys in idle)
    # The workspace walk and the alias only when a container here is to be judged.
    key = pool.fresh_key(record, settings) if here else ""
    image = pool.image_fingerprint(client, record.image) if here else ""
    rows = [_row(instance, keys, pool.claimable(instance, key, image)
                 if keys.workspace == workspace else None) for instance, keys in idle]
    size = settings.get("pool.size")
    if as_json:
        write_record(make_record("pool_status", workspace=workspace, size=size,
                                 containers=rows))
        return 0
    print(f"pool of {workspace}: size {size}, "
          f"{sum(1 for r in rows if r['ready'])} ready", flush=True)
    if rows:
        print(output.table([("NAME", "SLOT", "STATUS", "READY", "CREATED", "WORKSPACE")] +
                           [(r["name"], str(r["slot"]), r["status"].upper(),
                             READY_WORDS[r["ready"]],
                             r["created_at"][:19].replace("T", " "), r["workspace"])
                            for r in rows]), flush=True)
    return 0


READY_WORDS: Final = {True: "yes", False: "no (made for other settings)", None: "-"}
"""Whether `coi run` here would claim it (another workspace's: not asked)."""


def _row(instance: Mapping[str, Any], keys: sessions.SessionContainer, ready: bool | None
         ) -> dict[str, Any]:
    return {"name": instance["name"], "workspace": keys.workspace, "slot": keys.slot,
            "status": str(instance.get("status") or ""), "ready": ready,
            "created_at": str(instance.get("created_at") or "")}
