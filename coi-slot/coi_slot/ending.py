"""How a session ends: the one lifecycle owner (`coi-slot end`, and kill, shutdown and
clean in here).

Save the session (`coi-session save`, as the container's owner), then delete the
container unless it is persistent, then remove its network rules (`coi-net
remove`) and its view's directory, and release its slot's reservation. All
under the container's ending lock (locks.ending_lock), deciding deletion only
from the container's OWN user.coi.persistent key: never from a command's flags,
never after a failed save.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from coi_common import config, locks, owners, plumbing, sessions, steps
from coi_common.errors import CoiError, NotFound, PermissionDenied
from coi_common.incus import Incus
from coi_slot import slots

ENDED_KEY: Final = f"{sessions.KEY}ended_run"
"""Set when a session was ended and its container kept, stopped: the container's Incus
`last_used_at` (its last start) at that moment. While the two are equal, nothing has run
in it since, so a second end has nothing new to save."""
DOWN: Final = ("Stopped", "Gone")
"""States of a container whose session is over: stopped, or ended and deleted already."""


@dataclass(frozen=True)
class Ending:
    """How a session ended: saved or not, container deleted or kept, and why kept.
    `running`: not ended at all (`end --if-down` of a container still up)."""

    saved: bool
    deleted: bool
    message: str = ""
    running: bool = False


def end_session(client: Incus, name: str, *, save: bool = True, remove: bool = False,
                if_down: bool = False, wait: float = 0.0, early: Early | None = None,
                locked: Callable[[], None] = lambda: None) -> Ending:
    """Save the session, then delete the container unless it is persistent, and with
    it its network rules. Only an explicit removal (`remove`, as `coi kill` asks)
    deletes a persistent one. A failed save keeps the container (Ending.message says
    so); save=False deletes without saving. `if_down`: only when the container is
    stopped or gone (after waiting up to `wait` s for a stop under way): the end of
    an attached shell, which must not end a session it merely detached from.

    Two coi commands ending one container at once (`coi shutdown` while the attached
    shell sees it stop) do the work once: the second waits for the lock, then finds
    it gone, or kept stopped with nothing run in it since (ENDED_KEY), and saves
    nothing again (a removal still deletes it). Ending.saved: the session is in the
    store, saved by this call or, with nothing run since, by the one that ended it.
    `early`: `coi-session save` and `coi-net remove` started before (Early), given the
    slot record when their turn comes. `locked` runs once the ending lock is held
    (actions: --background goes on in a process of its own from there)."""
    early = early or Early()
    try:
        return _end(client, name, save=save, remove=remove, if_down=if_down, wait=wait,
                    early=early, locked=locked)
    finally:
        early.abandon()


@dataclass
class Early:
    """`coi-session save` of the session whose slot record comes on `coi-slot end`'s
    stdin, started before the record is even read (while the session's last command
    still runs), so its start-up is over when it is needed; and `coi-net remove`,
    started once the record says the session has rules (it is needed after the save
    and the stop). Each is given the record when its turn comes."""

    record: sessions.SlotRecord | None = None
    saver: plumbing.Child | None = None
    remover: plumbing.Child | None = None

    @classmethod
    def started(cls, *, save: bool) -> Early:
        return cls(None, plumbing.Child("coi-session", ["save"], kind="session_saved")
                   if save else None)

    def given(self, record: sessions.SlotRecord) -> None:
        """The record arrived: the children are this container's."""
        self.record = record
        if record.network != "open":
            self.remover = plumbing.Child("coi-net", ["remove"], kind="net_removed")

    def stopped(self, name: str) -> None:
        """`name`, an ephemeral container, is stopped and goes next: coi-net remove gets
        the record now and removes its rules while Incus deletes it (no process of it
        is left to send a packet, and should the delete fail, coi never starts an
        ephemeral container again: it ends it)."""
        if self.remover is not None and self._of(name):
            self.remover.give(self.record.to_record())

    def take(self, which: str, name: str) -> plumbing.Child | None:
        """The early child for `name`, once (None: run one now); another container's
        stays, for abandon()."""
        if not self._of(name):
            return None
        child = getattr(self, which)
        setattr(self, which, None)
        return child

    def _of(self, name: str) -> bool:
        return self.record is not None and self.record.container == name

    def abandon(self) -> None:
        for child in (self.saver, self.remover):
            if child is not None:
                child.abandon()


def _end(client: Incus, name: str, *, save: bool, remove: bool, if_down: bool, wait: float,
         early: Early, locked: Callable[[], None]) -> Ending:
    with locks.ending_lock(client, name):
        locked()
        if if_down and not _down(client, name, wait):
            return Ending(saved=False, deleted=False, running=True)
        try:
            instance = client.instance_config(name)
        except NotFound:
            return Ending(saved=False, deleted=True)
        kept_since = _ended_since_start(instance)
        save = save and not sessions.is_idle_in_pool(instance)  # nothing ran in it
        saved, problem = save_session(name, owners.owner_uid(instance), early) \
            if save and not kept_since else (save and kept_since, "")
        if problem:
            return Ending(False, deleted=False,
                          message=f"{problem}; the container is kept (stopped or running) so "
                                  f"nothing is lost: try again with 'coi shutdown {name}', or "
                                  f"discard the session with 'coi kill --no-save {name}'")
        if sessions.is_persistent(instance) and not remove:
            if saved and not kept_since:
                _mark_ended(client, name)
            return Ending(saved, deleted=False)
        status = _status(client, name)
        if status != "Gone":
            if status != "Stopped":
                client.set_state(name, "stop", force=True)
            if not sessions.is_persistent(instance):
                early.stopped(name)
            client.delete_instance(name)
        _after_delete(name, instance, early)
        return Ending(saved, deleted=True)


def _after_delete(name: str, instance: Mapping[str, Any], early: Early) -> None:
    """Its rules, its view's directory and its slot's reservation go with it; none of
    them ever fails the end. (The reservation `coi-slot next` made holds until the
    container exists and then lingers for up to two minutes: without this, a slot
    killed right after its start could not be taken again at once.)"""
    keys = sessions.SessionContainer.from_instance(instance)
    if keys is not None and early.record is None:  # with its record, run_end releases it
        with contextlib.suppress(CoiError, OSError):
            state_dir = config.load(keys.workspace, lenient=True).path("paths.state_dir")
            slots.release(state_dir, keys.workspace, keys.slot)
    mode = (instance.get("config") or {}).get(f"{sessions.KEY}network")
    if mode and mode != "open":
        try:
            _run(early, "remover", name, program="coi-net", args=["remove", name],
                 kind="net_removed")
        except CoiError as exc:
            print(f"coi: could not remove the network rules of {name} ({exc.one_line()}); "
                  "'coi-net gc' will", file=sys.stderr)
    if sessions.has_view(instance):  # its empty directory: harmless if left
        with contextlib.suppress(CoiError):
            sessions.release_view(name, forget=True)


def _down(client: Incus, name: str, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        status = _status(client, name)
        if status in DOWN or time.monotonic() >= deadline:
            return status in DOWN
        time.sleep(0.3)


def _status(client: Incus, name: str) -> str:
    try:
        return client.status(name)
    except NotFound:
        return "Gone"
    except CoiError:
        return "Stopping"  # Incus cannot read the state of a container halfway down


def _run(early: Early, which: str, name: str, *, program: str, args: list[str], kind: str,
         as_user: pwd.struct_passwd | None = None) -> list[dict[str, Any]]:
    """The early child (given the record), or `program args` run now."""
    child = early.take(which, name) if as_user is None else None
    if child is not None and early.record is not None:
        return child.finish(early.record.to_record())
    return plumbing.call(program, args, kind=kind, as_user=as_user)


def save_session(name: str, owner: int | None, early: Early | None = None
                 ) -> tuple[bool, str]:
    """The session-save hook: every path by which coi stops or removes a session
    container comes through here first. Returns (ok, message).

    `coi-session save NAME` copies the tool's state out of the container (a stopped
    one is started briefly without a network), bounded by its own timeout, into the
    store of the container's OWNER (`owner`, its user.coi.host_uid), whoever ends it:
    root runs it as that user. It never raises: this runs in cleanup paths; a
    failure is reported and the caller keeps the container."""
    steps.saving(name)
    try:
        found = _run(early or Early(), "saver", name, program="coi-session",
                     args=["save", name], kind="session_saved", as_user=_save_user(name, owner))
    except (Exception, KeyboardInterrupt) as exc:  # cleanup must go on, whatever failed
        if isinstance(exc, NotFound) and exc.message.startswith(f"container {name}"):
            return True, ""  # gone already: nothing left to save
        reason = exc.one_line() if isinstance(exc, CoiError) else f"{type(exc).__name__}: {exc}"
        return False, f"could not save the session of {name}: {reason}"
    if found and isinstance(found[0].get("message"), str):
        steps.say(found[0]["message"])
    return True, ""


def _save_user(name: str, owner: int | None) -> pwd.struct_passwd | None:
    """Whom the save runs as: None for the caller itself; the owner's account when root
    ends another user's session, so what it writes lands in their store with their
    ownership and root never writes into a directory the user controls."""
    caller = os.geteuid()
    if owner is None or owner == caller:
        return None
    if caller != 0:
        raise PermissionDenied(f"{name} belongs to uid {owner}; only that user or root can "
                               "save its session")
    return pwd.getpwuid(owner)


def _ended_since_start(instance: Mapping[str, Any]) -> bool:
    used = str(instance.get("last_used_at") or "")
    return bool(used) and instance.get("status") == "Stopped" \
        and (instance.get("config") or {}).get(ENDED_KEY) == used


def _mark_ended(client: Incus, name: str) -> None:
    """ENDED_KEY on a kept container that is stopped now (the save may have started it
    for the copy, so its last start is read again). Only a running container is left
    unmarked: whatever it still does must be saved by the next end."""
    with contextlib.suppress(CoiError):  # unmarked, the next end saves once more: no loss
        instance = client.instance_config(name)
        if instance.get("status") == "Stopped" and instance.get("last_used_at"):
            client.set_config(name, {ENDED_KEY: str(instance["last_used_at"])})
