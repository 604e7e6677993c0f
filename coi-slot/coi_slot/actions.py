"""`coi kill|shutdown|clean|persist`: act on coi's containers, one result per container.

Every path that stops or removes a session container ends in
ending.end_session, which saves the session and then decides, from the
container's own `user.coi.persistent` key, whether it goes (kill asks it to
remove persistent ones too): nothing here deletes a container directly. A
save that fails keeps the container, and that container's result is a
failure saying how to retry or discard it.

Targets are resolved from one listing before anything changes: a name that
is not one of coi's containers under the current prefix refuses the whole
command (exit 3), so foreign containers are never touched; a name of
another user's container refuses it too (exit 5) unless --all-users
(coi_common.owners). --all takes the caller's own containers (everyone's
with --all-users, or for root); shutdown --all skips persistent ones that
are stopped already: they are reported unchanged. Verbs yield an ActionResult per
container as it is done; run() prints each at once (a text line, or a
`container_action` JSON Lines record).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from coi_common import config, forks, incus, locks, naming, owners, plan, plumbing, sessions, steps
from coi_common.entry import Args
from coi_common.errors import EXIT_FAILED, CoiError, NotFound, UsageError
from coi_common.protocol import Record, make_record, read_record, write_record
from coi_slot import ending, listing, slots

PROG: Final = "coi-slot"
FORCE_VARIABLE: Final = "COI_FORCE"
STOPPED: Final = "Stopped"
TIMEOUT_PATTERN: Final = re.compile(r"[0-9]{1,6}")
"""--timeout: plain ASCII digits, at most about eleven days."""

Instance = Mapping[str, Any]
Confirm = Callable[[str], bool]


@dataclass(frozen=True)
class ActionResult:
    """What happened to one container."""

    name: str
    action: str
    ok: bool
    deleted: bool = False
    persistent: bool = False
    forced: bool = False
    changed: bool = True
    saved: bool = False
    message: str = ""
    running: bool = False
    """end --if-down: the container is still up, so its session was not ended."""
    background: bool = False
    """end --background: the ending goes on in a process of its own."""

    def record(self) -> dict[str, Any]:
        """The `container_action` record (docs/protocol.md)."""
        return make_record("container_action", name=self.name, action=self.action, ok=self.ok,
                           deleted=self.deleted, persistent=self.persistent,
                           forced=self.forced, changed=self.changed, saved=self.saved,
                           message=self.message, running=self.running,
                           background=self.background)

    def line(self) -> str:
        """The text line of a success (failures go to stderr, see run())."""
        if self.action == "persist":
            state = "is now persistent" if self.changed else "was persistent already"
            return f"{self.name} {state}"
        if self.action == "end":
            return self._end_line()
        if not self.changed:
            return f"{self.name} was stopped already (persistent, kept)"
        if self.action == "kill":
            return f"killed {self.name}{'' if self.saved else ' (session not saved)'}"
        if self.action == "clean":
            return f"removed {self.name} (stopped, ephemeral)"

        how = f"forced {self.name} to stop ({self.message})" if self.forced \
            else f"shut down {self.name}"
        return f"{how}, {'deleted' if self.deleted else 'kept (persistent)'}"

    def _end_line(self) -> str:
        if self.running:
            return f"{self.name} is still running"
        return steps.ended_line(self.name, deleted=self.deleted, background=self.background)


# -- the command ---------------------------------------------------------------------------


def run(args: Args, *, as_json: bool, confirm: Confirm | None = None) -> int:
    """Run kill, shutdown, clean or persist; 0 when every container succeeded, else 1."""
    action = next(a for a in ("kill", "shutdown", "clean", "persist") if args[a])
    timeout = stop_timeout(args["--timeout"]) if action == "shutdown" else 0
    names = [naming.validate_container_name(n) for n in args["<name>"]]
    every = bool(args["--all"]) or action == "clean"
    save = not args["--no-save"]
    force = bool(args["--force"]) or os.environ.get(FORCE_VARIABLE, "") not in ("", "0")
    if every and not force and not sys.stdin.isatty():
        # Decided before connecting: the same command line always gets the same answer.
        what = "clean" if action == "clean" else f"{action} --all"
        raise UsageError(f"'{what}' asks for confirmation, and there is no terminal to ask "
                         "on", hint=f"add --force, or set {FORCE_VARIABLE}=1, to go ahead")
    client = incus.connect(config.load(None))
    targets = select(client, naming.container_prefix(), action, names, every=every,
                     uid=owners.caller_uid(), all_users=bool(args["--all-users"]))
    # clean --sessions (or --all, as the original spells it): the saved sessions too.
    saved = listing.listed_sessions() if action == "clean" and (
        args["--sessions"] or args["--all"]) else None
    if not targets and not saved:
        _say("nothing to clean" if action == "clean" else "no coi containers", as_json)
        return 0
    if every and not force and not (confirm or ask)(question(action, targets, saved)):
        print(f"{PROG}: cancelled; nothing changed", file=sys.stderr, flush=True)
        return 0
    status = _act_on(client, action, targets, timeout=timeout, save=save, every=every,
                     as_json=as_json)
    if saved:
        _delete_saved_sessions(as_json)
    return status


def _delete_saved_sessions(as_json: bool) -> None:
    for deleted in plumbing.call("coi-session", ["prune", "--keep", "0", "--all"],
                                 kind="session_deleted"):
        if as_json:
            write_record(deleted)
        else:
            print(f"deleted session {deleted['id']} ({deleted['tool']}, "
                  f"{deleted['workspace']})", flush=True)


def _act_on(client: incus.Incus, action: str, targets: Sequence[Instance], *,
            timeout: int, save: bool, every: bool, as_json: bool) -> int:
    status = 0
    for result in act(client, action, targets, timeout=timeout, save=save,
                      skip_stopped=every):
        if as_json:
            write_record(result.record())
        elif result.ok:
            print(result.line(), flush=True)
        if not result.ok:
            status = EXIT_FAILED
            print(f"{PROG}: {action} {result.name} failed: {result.message}", file=sys.stderr,
                  flush=True)
    return status


def run_end(args: Args, *, as_json: bool) -> int:
    """`coi-slot end [NAME]`: the end of one session (the porcelain's last step). Without
    NAME the container is the slot record's on stdin, and that slot's reservation is
    released too (a session that failed before its container existed)."""
    wait = stop_timeout(args["--wait"]) if args["--wait"] is not None else 0
    if args["<name>"]:
        return _ended_now(_end_of(naming.validate_container_name(args["<name>"][0]), args,
                                  wait, None, config.load(None, lenient=True)), as_json)
    # In the background its children start there: a detached process cannot wait
    # for children of its parent.
    background = bool(args["--background"]) and not plan.active()
    early = ending.Early() if background else ending.Early.started(save=not args["--no-save"])
    try:
        record = sessions.SlotRecord.from_record(read_record("slot"))
        if not background:
            early.given(record)
        settings = config.load(record.workspace, lenient=True)
        locked = (lambda: _on_in_background(record.container, settings, as_json)) \
            if background else (lambda: None)
        try:
            result = _end_of(record.container, args, wait, early, settings, locked=locked)
        finally:
            slots.release(settings.path("paths.state_dir"), record.workspace, record.slot)
    finally:
        early.abandon()
    return _ended_now(result, as_json)


def _end_of(name: str, args: Args, wait: float, early: ending.Early | None,
            settings: config.Config, *, locked: Callable[[], None] = lambda: None
            ) -> ActionResult:
    client = incus.connect(settings)
    target = _own_session(client, name)
    if target is None:
        return ActionResult(name, "end", ok=True, deleted=True, changed=False)
    return ended(target, "end", ending.end_session(
        client, name, save=not args["--no-save"], if_down=bool(args["--if-down"]),
        wait=wait, early=early, locked=locked))


def _on_in_background(name: str, settings: config.Config, as_json: bool) -> None:
    """--background, its ending lock held: the caller is told the session ends in the
    background and leaves; a detached copy holding the lock (so a resume waits for
    it: locks.wait_for_endings) saves, deletes and removes the rules, writing to
    logs_dir/end.log."""
    logs = settings.path("paths.logs_dir")
    os.makedirs(logs, mode=0o700, exist_ok=True)
    if forks.detach(os.path.join(logs, "end.log")):
        _ended_now(ActionResult(name, "end", ok=True, background=True), as_json)
        sys.stdout.flush()
        os._exit(0)  # its lock is the detached copy's now: nothing here may let it go
    locks.adopt_ending(name)
    print(f"coi-slot end {name} (in the background, pid {os.getpid()})", flush=True)


def _ended_now(result: ActionResult, as_json: bool) -> int:
    if not result.ok:
        raise CoiError(result.message)
    if as_json:
        write_record(result.record())
    else:
        print(result.line(), flush=True)
    return 0


def _own_session(client: incus.Incus, name: str) -> Instance | None:
    """The container if it is a coi session of the caller's (root: anyone's), None when
    it is gone; anything else is refused."""
    try:
        instance = client.instance_config(name)
    except NotFound:
        return None
    if f"{sessions.KEY}workspace" not in (instance.get("config") or {}):
        raise NotFound(f"{name} is not a coi session container")
    owners.refuse_others([instance], uid=owners.caller_uid(), all_users=False)
    return instance


def stop_timeout(value: str) -> int:
    """--timeout S: whole seconds, 0 or more."""
    if not TIMEOUT_PATTERN.fullmatch(value or ""):
        raise UsageError(f"--timeout must be a whole number of seconds, got {value!r}")
    return int(value)


def select(client: incus.Incus, prefix: str, action: str, names: Sequence[str], *,
           every: bool, uid: int, all_users: bool) -> list[Instance]:
    """The containers to act on, from one listing; refuses a name that is not coi's
    (NotFound) or, without all_users, not the caller's (PermissionDenied).

    clean selects the stopped ephemeral ones; --all every coi container; both only
    the caller's own unless all_users (root: everyone's).
    """
    ours = {i["name"]: i for i in sessions.coi_containers(client, prefix)}
    if every:
        chosen = sorted(owners.visible(ours.values(), uid=uid, all_users=all_users),
                        key=lambda i: i["name"])
        if action == "clean":
            chosen = [i for i in chosen
                      if i.get("status") == STOPPED and not sessions.is_persistent(i)]
        elif action == "persist":  # a warm pool's container has no session to keep
            chosen = [i for i in chosen if not sessions.is_idle_in_pool(i)]
        return chosen
    strangers = [n for n in dict.fromkeys(names) if n not in ours]
    if strangers:
        raise NotFound(f"{', '.join(strangers)}: not a coi container under prefix {prefix}",
                       hint="see 'coi list'; coi acts only on its own containers")
    targets = [ours[n] for n in dict.fromkeys(names)]
    owners.refuse_others(targets, uid=uid, all_users=all_users)
    return targets


def question(action: str, targets: Sequence[Instance],
             saved: Sequence[Record] | None = None) -> str:
    names = ", ".join(t["name"] for t in targets)
    count = f"{len(targets)} container{'s' if len(targets) != 1 else ''}"
    verb = {"kill": "Kill", "shutdown": "Shut down", "clean": "Remove",
            "persist": "Make persistent"}[action]
    listed = f"{count} ({names})" if targets else count
    if saved:
        listed += f" and {len(saved)} saved session{'s' if len(saved) != 1 else ''} " \
                  "(every workspace)"
    return f"{verb} {listed}? [y/N] "


def ask(prompt: str) -> bool:
    """Ask on the terminal (stderr for the question); only y or yes agrees."""
    print(prompt, end="", file=sys.stderr, flush=True)
    reply = sys.stdin.readline()
    return reply.strip().lower() in ("y", "yes")


def _say(line: str, as_json: bool) -> None:
    # In JSON mode an empty stream is the answer: stdout carries records only.
    if not as_json:
        print(line, flush=True)


# -- verbs -----------------------------------------------------------------------------------


def act(client: incus.Incus, action: str, targets: Sequence[Instance], *,
        timeout: int = 0, save: bool = True,
        skip_stopped: bool = False) -> Iterator[ActionResult]:
    """Run `action` on each target in turn; a failure is a result, not an exception.

    skip_stopped (shutdown --all): a persistent container that is stopped already is
    where shutdown would leave it, so it is reported unchanged, not saved again.
    """
    verb: Callable[[Instance], ActionResult] = {
        "kill": lambda t: kill(client, t, save=save),
        "shutdown": lambda t: shutdown(client, t, timeout),
        "clean": lambda t: clean(client, t),
        "persist": lambda t: persist(client, t),
    }[action]
    for target in targets:
        if skip_stopped and action == "shutdown" and _stopped_persistent(target):
            yield ActionResult(target["name"], action, ok=True, persistent=True,
                               changed=False)
            continue
        try:
            yield verb(target)
        except CoiError as exc:
            yield ActionResult(target["name"], action, ok=False,
                               persistent=sessions.is_persistent(target),
                               changed=False, message=exc.one_line())


def kill(client: incus.Incus, target: Instance, *, save: bool = True) -> ActionResult:
    """Stop at once, then end the session: saved (unless save=False), the container
    deleted, persistent or not (kept only when its save failed)."""
    name = target["name"]
    _force_stop(client, name)
    return ended(target, "kill", ending.end_session(client, name, save=save, remove=True))


def shutdown(client: incus.Incus, target: Instance, timeout: int) -> ActionResult:
    """Stop cleanly within `timeout` s (else force it), then end the session."""
    name = target["name"]
    forced = False
    message = ""
    if _status(client, name) != STOPPED:
        forced = not graceful_stop(client, name, timeout)
        if forced:
            message = "stopped at once" if timeout == 0 else \
                f"no clean stop within {timeout} s"
            _force_stop(client, name)
    return ended(target, "shutdown", ending.end_session(client, name), forced=forced,
                 message=message)


def graceful_stop(client: incus.Incus, name: str, timeout: int) -> bool:
    """Ask the container's init to shut down; True when it stopped within `timeout` s."""
    if timeout == 0:
        return False
    try:
        client.set_state(name, "stop", timeout=timeout)
    except CoiError:
        # Whatever the stop request said (its timeout, a lost operation), the state
        # decides; a container that is gone raises NotFound here.
        return _status(client, name) == STOPPED
    return True


def clean(client: incus.Incus, target: Instance) -> ActionResult:
    """Save what is left of the session of a stopped ephemeral container, delete it."""
    return ended(target, "clean", ending.end_session(client, target["name"]))


def ended(target: Instance, action: str, end: ending.Ending, *, forced: bool = False,
          message: str = "") -> ActionResult:
    """The result of a verb that ended a session. A failure: a container kept that was
    to go (kill, or an ephemeral one), or kept with a reason (its save failed)."""
    persistent = sessions.is_persistent(target)
    to_go = action == "kill" or not persistent
    failed = not end.deleted and not end.running and (to_go or bool(end.message))
    if failed:
        message = end.message or "the container was kept"
    return ActionResult(target["name"], action, ok=not failed, deleted=end.deleted,
                        persistent=persistent, forced=forced, saved=end.saved,
                        message=message, changed=not end.running, running=end.running)


def persist(client: incus.Incus, target: Instance) -> ActionResult:
    """Mark the container persistent (user.coi.persistent=true)."""
    name = target["name"]
    if sessions.is_persistent(target):
        return ActionResult(name, "persist", ok=True, persistent=True, changed=False)
    if sessions.is_idle_in_pool(target):
        return ActionResult(name, "persist", ok=False, message=f"{name} waits in the warm "
                            "pool, with no session to keep: start one with 'coi shell'")
    client.set_config(name, {f"{sessions.KEY}persistent": "true"})
    return ActionResult(name, "persist", ok=True, persistent=True)


def _stopped_persistent(target: Instance) -> bool:
    return target.get("status") == STOPPED and sessions.is_persistent(target)


def _status(client: incus.Incus, name: str) -> str:
    return client.status(name)


def _force_stop(client: incus.Incus, name: str) -> None:
    if _status(client, name) != STOPPED:
        client.set_state(name, "stop", force=True)
