"""Session containers: the slot record, how a container is set up, how a session ends.

The slot record (kind `slot`, docs/protocol.md) is what `coi-slot next`
prints and `coi-shell` reads. Everything coi needs to know about a
container later is kept on the container itself as `user.coi.*` config
keys, so `coi list` needs one request and no local state.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from coi_common import locks, naming, owners, proc
from coi_common.errors import BadInput, CoiError, NotFound, PermissionDenied
from coi_common.incus import Incus
from coi_common.netpolicy import MODES
from coi_common.protocol import make_record, validate

KEY: Final = "user.coi."
WORKSPACE_PATH: Final = "/workspace"
STORAGE_PATH: Final = "/storage"
TMUX_SESSION: Final = "coi"


@dataclass(frozen=True)
class Mount:
    """An extra host directory in the container (`--mount SRC:DST[:ro]`)."""

    source: str
    path: str
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> Mount:
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "ro"):
            raise BadInput(f"--mount {text!r}: expected SRC:DST or SRC:DST:ro")
        return cls.checked(parts[0], parts[1], len(parts) == 3, spec=text)

    @classmethod
    def checked(cls, source: str, path: str, readonly: bool, *, spec: str) -> Mount:
        """SRC an existing directory (resolved), DST absolute without '..'."""
        real = naming.canonical_workspace(os.path.expanduser(source))
        if not path.startswith("/") or ".." in path.split("/"):
            raise BadInput(f"--mount {spec!r}: DST must be an absolute path without '..'")
        return cls(real, path.rstrip("/") or "/", readonly)


@dataclass(frozen=True)
class SlotRecord:
    """One workspace slot and the container that serves it."""

    workspace: str
    slot: int
    container: str
    persistent: bool
    image: str
    profile: str
    tool: str = "claude"
    network: str = "restricted"
    environment: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    storage: str = ""

    def to_record(self) -> dict[str, Any]:
        data = asdict(self)
        data["mounts"] = [asdict(m) for m in self.mounts]
        data["environment"] = dict(self.environment)
        return make_record("slot", **data)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SlotRecord:
        """A validated record from stdin; every field is checked, nothing trusted: each
        has its JSON type, names pass their validators, mounts and environment are
        what --mount and --env would take."""
        data = validate(dict(record), "slot")
        slot = naming.validate_slot(data["slot"], naming.SLOT_CEILING)
        workspace = naming.canonical_workspace(_record_field(data, "workspace", str))
        container = naming.validate_container_name(data["container"])
        if container != naming.container_name(workspace, slot):
            raise BadInput(f"slot record: container {container!r} is not slot {slot} of "
                           f"{workspace} (expected {naming.container_name(workspace, slot)})")
        network = _record_field(data, "network", str, "restricted")
        if network not in MODES:
            raise BadInput(f"slot record: network {network!r} is not one of {', '.join(MODES)}")
        environment = _record_field(data, "environment", dict, {})
        if not all(isinstance(value, str) for value in environment.values()):
            raise BadInput("slot record: environment values must be strings")
        parse_env([f"{key}={value}" for key, value in environment.items()])
        storage = _record_field(data, "storage", str, "")
        if storage and not os.path.isabs(storage):
            raise BadInput(f"slot record: storage {storage!r} is not an absolute path")
        return cls(workspace, slot, container, _record_field(data, "persistent", bool),
                   naming.validate_image_name(data["image"]),
                   _record_field(data, "profile", str),
                   naming.validate_tool_name(_record_field(data, "tool", str, "claude")),
                   network, environment,
                   tuple(_record_mount(m) for m in _record_field(data, "mounts", list, [])),
                   storage)


def _record_field(data: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """data[key] when it is a `kind` (bool is not an int here); missing: `default`, or
    refused when there is none."""
    value = data.get(key, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadInput(f"slot record: {key} must be a JSON {_JSON_NAMES[kind]}, "
                       f"got {type(value).__name__}")
    return value


_JSON_NAMES: Final = {str: "string", bool: "boolean", dict: "object", list: "array"}


def _record_mount(item: object) -> Mount:
    """One mount of a slot record, checked as `--mount` is (host paths: when mounted)."""
    if not isinstance(item, dict):
        raise BadInput("slot record: each mount must be a JSON object")
    source, path = _record_field(item, "source", str), _record_field(item, "path", str)
    return Mount.checked(source, path, _record_field(item, "readonly", bool, False),
                         spec=f"{source}:{path}")


def invoking_home() -> str:
    """The home directory of the user coi acts for (invoking_ids)."""
    import pwd  # noqa: PLC0415

    try:
        return pwd.getpwuid(invoking_ids()[0]).pw_dir
    except KeyError:
        return os.path.expanduser("~")


def invoking_ids() -> tuple[int, int]:
    """The user coi acts for: the one behind sudo when there is one."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0 and os.environ.get("SUDO_UID", "").isdigit():
        return int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", "0") or 0)
    return uid, gid


def coi_containers(client: Incus, prefix: str) -> list[dict[str, Any]]:
    """coi's session containers under `prefix`, with state, in one request."""
    return [i for i in client.instances(prefix)
            if f"{KEY}workspace" in (i.get("config") or {})
            and naming.parse_container_name(i["name"], prefix) is not None]


def is_persistent(instance: Mapping[str, Any]) -> bool:
    return (instance.get("config") or {}).get(f"{KEY}persistent") == "true"


@dataclass(frozen=True)
class Ending:
    """How a session ended: saved or not, container deleted or kept, and why kept."""

    saved: bool
    deleted: bool
    message: str = ""


def save_session(client: Incus, name: str, owner: int | None) -> tuple[bool, str]:
    """The session-save hook: every path by which coi stops or removes a session
    container comes through here first. Returns (ok, message).

    Copies the tool's state out of the container (coi_common.saved_sessions;
    a stopped one is started briefly without a network), bounded by
    saved_sessions.SAVE_TIMEOUT, into the store of the container's OWNER
    (`owner`, its user.coi.host_uid), whoever ends it. It never raises: this runs in
    cleanup paths; a failure is reported and the caller keeps the container.
    """
    try:
        result_line = _save_for(client, name, owner)
    except (Exception, KeyboardInterrupt) as exc:  # cleanup must go on, whatever failed
        if isinstance(exc, NotFound) and exc.message.startswith(f"container {name}"):
            return True, ""  # gone already: nothing left to save
        reason = exc.one_line() if isinstance(exc, CoiError) else f"{type(exc).__name__}: {exc}"
        return False, f"could not save the session of {name}: {reason}"
    if result_line:
        print(f"coi: {result_line}", file=sys.stderr, flush=True)
    return True, ""


def _save_for(client: Incus, name: str, owner: int | None) -> str:
    caller = os.geteuid()
    if owner is None or owner == caller:
        return _save_line(client, name)
    if caller != 0:
        raise PermissionDenied(f"{name} belongs to uid {owner}; only that user or root can "
                               "save its session")
    return owners_process(owner, lambda: _save_line(client, name))


def _save_line(client: Incus, name: str) -> str:
    from coi_common import saved_sessions  # noqa: PLC0415 - tarfile & co. only when saving

    result = saved_sessions.save_container(client, name)
    return result.line() if result.session is not None else ""


def owners_process(owner: int, work: Callable[[], str]) -> str:
    """Run `work` in a child process as host user `owner` (root only), with that user's
    home and groups, so what it writes lands in their store with their ownership and
    root never writes into a directory the user controls. Returns work's text."""
    import pwd  # noqa: PLC0415

    account = pwd.getpwuid(owner)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(read_end)
            os.initgroups(account.pw_name, account.pw_gid)
            os.setgid(account.pw_gid)
            os.setuid(owner)
            # The owner's own settings apply, never the caller's overrides.
            for variable in [v for v in os.environ if v.startswith("COI_")] + [
                    "XDG_CONFIG_HOME", "SUDO_UID", "SUDO_GID"]:
                os.environ.pop(variable, None)
            os.environ.update(HOME=account.pw_dir, USER=account.pw_name)
            text, code = work(), 0
        except BaseException as exc:  # everything goes back to the parent
            text = exc.one_line() if isinstance(exc, CoiError) else f"{type(exc).__name__}: {exc}"
        os.write(write_end, text.encode()[:65536])
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read(65536).decode("utf-8", "replace")
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise CoiError(f"as uid {owner}: {text or 'failed'}")
    return text


ENDING_LOCK_SECONDS: Final = 240.0
"""How long ending a session waits for another coi command ending the same container: an
attached shell's wait for the stop (30 s), a save (saved_sessions.SAVE_TIMEOUT, 60 s, plus
a start and a stop), the removal of its rules (60 s), and a margin."""
SHARED_LOCKS: Final = "/run/coi/locks"
SHARED_LOCKS_MODE: Final = 0o1770
ENDED_KEY: Final = f"{KEY}ended_run"
"""Set when a session was ended and its container kept, stopped: the container's Incus
`last_used_at` (its last start) at that moment. While the two are equal, nothing has run
in it since, so a second end has nothing new to save."""
_ending: set[str] = set()
"""The containers whose ending lock this process holds (ending_lock is reentrant)."""


@contextlib.contextmanager
def ending_lock(client: Incus, name: str) -> Iterator[None]:
    """Hold the lock of ending `name`'s session: end_session takes it, and so does a
    caller deciding whether to end it (an attached shell). Reentrant in a process;
    locks.LockTimeout after ENDING_LOCK_SECONDS.

    Where the lock files are, and why there: everyone who may end a session (root,
    and members of the Incus socket's group, as the member who runs the shell or
    root running `coi shutdown`) must meet on one file per container, and nobody
    else may make, hold, remove or redirect it. /run/coi is root's, so root makes
    /run/coi/locks in it: owned by root, group of the Incus socket, mode 1770, so
    members make and lock files there, the sticky bit keeps them from removing (and
    so splitting) another's lock, and other users cannot even look in. Files are
    opened relative to the checked folder, never through a link (locks.py), and
    every wait is bounded. A member who finds no /run/coi/locks (no root coi
    command or host service since boot) locks in their own ~/.coi/locks, which
    still orders that user's own commands. With no usable folder at all the
    session ends unlocked, with a warning: a lock never keeps a session from ending.
    Lock files stay (one empty file per container name, and names come back with
    their slot): removing one that another process waits on would let a third lock
    a new file of that name beside it.
    """
    if name in _ending:
        yield
        return
    fd, problem = _ending_lock_file(client, name)
    if fd is None:
        print(f"coi: ending {name} without its lock ({problem}); another coi command "
              "ending it at the same time may save it twice", file=sys.stderr)
        yield
        return
    try:
        with locks.held(fd, timeout=ENDING_LOCK_SECONDS,
                        what=f"waiting for another coi command to finish ending {name}"):
            _ending.add(name)
            try:
                yield
            finally:
                _ending.discard(name)
    finally:
        os.close(fd)


def prepare_ending_locks(client: Incus) -> None:
    """As root: make /run/coi/locks now (at boot: coi setup, coi-host serve), so that
    members lock there from their first session on, not in their own folders."""
    shared = next(_lock_folders(client))
    if os.geteuid() != 0:
        raise PermissionDenied(f"only root makes {shared[0]}", hint="run this as root")
    os.close(_open_lock_folder(*shared))


def _ending_lock_file(client: Incus, name: str) -> tuple[int | None, str]:
    """The open lock file of ending `name` (see ending_lock): in the first folder of
    _lock_folders that is usable; None, and why, when none is."""
    problems = []
    for place in _lock_folders(client):
        try:
            folder = _open_lock_folder(*place)
            try:
                return locks.open_file(folder, f"{naming.validate_container_name(name)}.lock"), ""
            finally:
                os.close(folder)
        except (OSError, CoiError) as exc:
            problems.append(exc.one_line() if isinstance(exc, CoiError)
                            else f"{place[0]}: {exc.strerror}")
    return None, "; ".join(problems)


def _open_lock_folder(path: str, owner: int, mode: int, group: int) -> int:
    if os.geteuid() == owner:  # its parent first: /run/coi (root's) or ~/.coi (the user's)
        os.makedirs(os.path.dirname(path), mode=0o755 if owner == 0 else 0o700, exist_ok=True)
    return locks.open_folder(path, owner=owner, mode=mode, group=group)


def _lock_folders(client: Incus) -> Iterator[tuple[str, int, int, int]]:
    """(path, owner, mode, group) of each folder ending locks may be in, in order: the
    shared one (group: the Incus socket's), then, for a member, their own."""
    try:
        group = os.stat(client.socket).st_gid
    except OSError:
        group = 0  # no local socket: only root uses Incus here
    yield SHARED_LOCKS, 0, SHARED_LOCKS_MODE, group
    uid = os.geteuid()
    if uid != 0:
        import pwd  # noqa: PLC0415

        try:  # pwd, not $HOME: every process of the user must find the same folder
            home = pwd.getpwuid(uid).pw_dir
        except KeyError:  # a uid without an account has none
            return
        yield os.path.join(home, ".coi", "locks"), uid, 0o700, -1


def end_session(client: Incus, name: str, *, save: bool = True,
                remove: bool = False) -> Ending:
    """Save the session, then delete the container unless it is persistent, and with
    it its network rules. The one place that decides deletion: from the container's
    OWN user.coi.persistent key, never from a session command's flags; only an
    explicit removal (`remove`, as `coi kill` asks) deletes a persistent one. A
    failed save keeps the container (Ending.message says so); save=False deletes
    without saving.

    All under the container's ending_lock, so two coi commands ending it at once
    (`coi shutdown` while the attached shell sees it stop) do the work once: the
    second waits, then finds it gone, or kept stopped with nothing run in it since
    the first ended it (ENDED_KEY), and saves nothing again (a removal still
    deletes it). Ending.saved: the session is in the store, saved by this call or,
    with nothing run since, by the one that ended it before."""
    with ending_lock(client, name):
        try:
            instance = client.instance_config(name)
        except NotFound:
            return Ending(saved=False, deleted=True)
        kept_since = _ended_since_start(instance)
        saved, problem = save_session(client, name, owners.owner_uid(instance)) \
            if save and not kept_since else (save and kept_since, "")
        if problem:
            return Ending(False, deleted=False,
                          message=f"{problem}; the container is kept (stopped or running) so "
                                  f"nothing is lost: try again with 'coi shutdown {name}', or "
                                  f"discard the session with 'coi kill --no-save {name}'")
        if is_persistent(instance) and not remove:
            if saved and not kept_since:
                _mark_ended(client, name)
            return Ending(saved, deleted=False)
        client.delete_instance_force(name)
        mode = (instance.get("config") or {}).get(f"{KEY}network")
        if mode and mode != "open":
            remove_network(name)
        if has_view(instance):  # its empty directory: harmless if left, so never an error
            with contextlib.suppress(CoiError):
                release_view(name, forget=True)
        return Ending(saved, deleted=True)


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


# -- the view and the rules of an ended session -------------------------------------------


def has_view(instance: Mapping[str, Any]) -> bool:
    """Whether a container's /workspace comes from a view (made since views exist)."""
    from coi_common import views  # noqa: PLC0415

    device = (instance.get("devices") or {}).get("workspace") or {}
    return views.is_view_source(device.get("source"))


def release_view(name: str, *, forget: bool = False) -> None:
    from coi_common import hostservice, views  # noqa: PLC0415

    if os.geteuid() == 0:
        views.release(name, forget=forget)
    else:
        hostservice.call("view_release", timeout=30, container=name, forget=forget)


def coi_net_program() -> str:
    """coi-net's path (beside this coi, else on PATH)."""
    from coi_common.dispatch import find_executable  # noqa: PLC0415

    return find_executable("coi-net") or "coi-net"


def remove_network(name: str) -> None:
    """Drop a deleted container's rules; a failure is reported, never raised."""
    problem = ""
    if os.geteuid() != 0:
        from coi_common import hostservice  # noqa: PLC0415

        try:
            hostservice.call("net_remove", container=name, timeout=60)
        except CoiError as exc:
            problem = exc.one_line()
    else:
        from coi_common import netpolicy  # noqa: PLC0415

        done = proc.run(netpolicy.remove_argv(name, program=coi_net_program()), check=False,
                        timeout=60)
        problem = "" if done.ok else proc.last_line(done.stderr)
    if problem:
        print(f"coi: could not remove the network rules of {name} ({problem}); "
              "'coi-net gc' will", file=sys.stderr)


def new_slot_record(client: Incus, settings: Any, workspace: str, *, slot: int | None = None,
                    mounts: Sequence[Mount] = (), storage: str = "") -> SlotRecord:
    """Allocate (or take `slot`) for the workspace and describe its container.

    `settings` is the effective config with command-line flags already applied
    (defaults.persistent, defaults.image, defaults.environment, tool.name, ...).
    """
    from coi_common import slots  # noqa: PLC0415

    prefix = naming.container_prefix()
    path = naming.canonical_workspace(workspace)
    max_slots = settings.get("defaults.max_slots")
    wanted = naming.validate_slot(slot, max_slots) if slot else None
    # Checked before reserving: a bad image name must not hold a slot for two minutes.
    image = naming.validate_image_name(settings.get("defaults.image"))
    instances = client.instances(f"{prefix}{naming.workspace_hash(path)}-")
    existing = [i["name"] for i in instances]
    if wanted is None and settings.get("defaults.persistent"):
        wanted = reusable_slot(instances, path, invoking_ids()[0])
    number = slots.reserve(settings.path("paths.state_dir"), path, prefix=prefix,
                           existing=existing, max_slots=max_slots, wanted=wanted)
    return SlotRecord(path, number, naming.container_name(path, number, prefix),
                      bool(settings.get("defaults.persistent")), image,
                      settings.get("incus.profile"), settings.get("tool.name"),
                      settings.get("network.mode"), dict(settings.get("defaults.environment")),
                      tuple(mounts), storage)


def reusable_slot(instances: Sequence[Mapping[str, Any]], workspace: str,
                  uid: int) -> int | None:
    """The lowest slot of `workspace` whose container is persistent, stopped and
    `uid`'s: `coi shell --persistent` comes back to it, with what was installed."""
    found = []
    for instance in instances:
        keys = instance.get("config") or {}
        slot = str(keys.get(f"{KEY}slot", ""))
        if (is_persistent(instance) and instance.get("status") == "Stopped"
                and keys.get(f"{KEY}workspace") == workspace and owners.owner_uid(instance) == uid
                and slot.isascii() and slot.isdigit()):
            found.append(int(slot))
    return min(found, default=None)


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """`--env KEY=VALUE` flags; a malformed one is a one-line error."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise BadInput(f"--env {pair!r}: expected KEY=VALUE with KEY made of letters, "
                           "digits and _")
        env[key] = value
    return env
