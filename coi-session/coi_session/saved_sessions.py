"""Saved sessions: an AI tool's conversation state, kept on the host between containers.

Layout (docs/sessions.md): `<paths.state_dir>/sessions-<tool>/<id>/` holds
`metadata.json` (a `session` record, docs/protocol.md) and `home/`, the
tool's state directories and files as they were under /home/code.

- Saving copies the registry's `state_dirs`/`state_files` out of a container
  (running, or stopped: then it is started for the copy without a network)
  as ONE tar stream. The stream is untrusted: only regular files and
  directories under those paths are written, by this module itself, into a
  fresh directory it made (no link is ever created, so none can be
  followed); everything else is dropped and counted. The copy is built in a
  temp directory beside the session and swapped in atomically under the
  store's lock, so an interrupted save leaves the previous one intact.
- Sparse files stay sparse both ways (`tar --sparse` out, holes written as
  holes here, PAX 1.0 sparse members back in), and a save is bounded while
  it writes: `limits.session_size`, `limits.sessions_total` and a reserve of
  free disk. After a save, the oldest sessions go until the store fits
  `limits.sessions_total`.
- Restoring streams the saved tree back as one tar stream into `tar -x`
  running as `code` (so uid 1000 owns it), then fresh credentials and the
  merged settings file go in the same way.
- A container remembers its session in `user.coi.session_id` and the
  `updated_at` its state started from in `user.coi.session_base`; a save
  updates that session only when nobody saved it since (else it forks a new
  one), so two slots resuming one session never overwrite each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import IO, Any, Final

from coi_common import __version__, locks, naming, proc, protocol, steps
from coi_common.errors import BadInput, CoiError, CommandFailed, NotFound
from coi_common.incus import ExecSpec, Incus, exec_not_started, retry_exec
from coi_common.protocol import CONTRACT_VERSION, make_record
from coi_common.protocol import loads as protocol_loads
from coi_common.tools import HOME, TOOL_UID, Tool, get_tool, json_copy, registry_from_config
from coi_session import sizes

KEY: Final = "user.coi."
SESSION_ID_KEY: Final = f"{KEY}session_id"
SESSION_BASE_KEY: Final = f"{KEY}session_base"
MASKED_KEY: Final = f"{KEY}save_masked_nics"
"""Set while a stopped container runs without its NICs for a save; holds what to put back."""

SESSION_ID_PATTERN: Final = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{12}")
"""What new_session_id() produces: UTC `YYYYmmdd-HHMMSS-` plus 12 random hex digits."""
METADATA: Final = "metadata.json"
HOME_DIR: Final = "home"
LOCK_FILE: Final = ".lock"
TMP_PREFIX: Final = ".tmp-"
OLD_PREFIX: Final = ".old-"
STORE_PREFIX: Final = "sessions-"
ORIGINAL: Final = "original"

SAVE_TIMEOUT: Final = 60.0
"""A save (start if stopped, stream, stop) that takes longer is abandoned; the old copy stays."""
DISK_RESERVE: Final = 1024**3
"""A save stops before the disk of the store has less free than this (or 5% of it, if
less): whatever the quotas say, a save never fills the disk."""
HEADER_MAX: Final = 8 * 1024**2
"""Most bytes the headers of one member (pax records, long names, sparse maps) may take:
tarfile holds them in memory."""
MAX_MEMBERS: Final = 500_000
SMALL_FILE_MAX: Final = 1024**2
METADATA_MAX: Final = 1024**2
"""metadata.json is read up to this many characters (a longer one is not valid JSON)."""
"""Credential and settings files larger than this are not copied (they are not real ones)."""
LEFTOVER_AGE: Final = 24 * 3600
SHOWN_DROPS: Final = 20
SHOWN_EVICTED: Final = 5
TRAILING_MAX: Final = 1024**2

_DURATION: Final = re.compile(r"([1-9][0-9]{0,5})([smhdw])")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_LONGEST: Final = timedelta(days=366_000)
"""Longer ages are refused: now minus the age must still be a date (999999w is not)."""
_COPY_CHUNK: Final = 1024 * 1024
LOCK_SECONDS: Final = 30.0
"""The longest wait for another save or delete of the same tool's sessions (each holds
the lock only to swap a finished copy in, or to rename one out)."""


def warn(line: str) -> None:
    """One line on stderr; progress and warnings never go to stdout."""
    print(f"coi: {line}", file=sys.stderr, flush=True)


def now_text() -> str:
    """UTC now with microseconds, so two saves in one second still order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """A timestamp as written by now_text() (or any ISO 8601 with a zone)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `12h`, `30d` or `2w`; anything else is a one-line error."""
    match = _DURATION.fullmatch(text or "")
    if match is None:
        raise BadInput(f"duration {text!r} is not a number followed by s, m, h, d or w",
                       hint="for example 30d or 12h")
    age = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if age > _LONGEST:
        raise BadInput(f"duration {text!r} is longer than 1000 years", hint="for example 30d")
    return age


# -- the session record ------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """One saved session, as its metadata.json describes it."""

    id: str
    tool: str
    workspace: str
    updated_at: str
    created_at: str = ""
    workspace_hash: str = ""
    slot: int | None = None
    container: str = ""
    image: str = ""
    persistent: bool = False
    coi_version: str = ""
    resumed_from: str = ""
    files: int = 0
    bytes: int = 0
    path: str = ""
    layout: str = "coi"
    """"original": saved by the original coi (its metadata.json, the state beside it)."""

    @property
    def home(self) -> str:
        """Where the saved state lies: `home/`, or the session directory itself in the
        original's layout."""
        return self.path if self.layout == ORIGINAL else os.path.join(self.path, HOME_DIR)

    def metadata(self) -> dict[str, Any]:
        """The metadata.json content: a `session` record plus the keys older readers
        use (`session_id`, `saved_at`; `ID`, `SavedAt`, `Workspace` as in the
        original tool's `coi list --all`)."""
        return make_record(
            "session", id=self.id, tool=self.tool, workspace=self.workspace,
            workspace_hash=self.workspace_hash, slot=self.slot, container=self.container,
            image=self.image, persistent=self.persistent, created_at=self.created_at,
            updated_at=self.updated_at, coi_version=self.coi_version,
            resumed_from=self.resumed_from, files=self.files, bytes=self.bytes,
            session_id=self.id, saved_at=self.updated_at, ID=self.id,
            SavedAt=self.updated_at, Workspace=self.workspace)

    def to_record(self) -> dict[str, Any]:
        """What `coi-session list/show --format json` prints: the metadata, the path and
        the layout."""
        return {**self.metadata(), "path": self.path, "layout": self.layout}

    @classmethod
    def from_original(cls, data: dict[str, Any], path: str, tool: str) -> Session:
        """A session the original coi saved: its metadata.json holds `session_id`,
        `workspace`, `saved_at` and maybe `container_name` and `persistent` (no
        contract version, no tool: the directory it lies in names the tool)."""
        for key in ("session_id", "workspace", "saved_at"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise BadInput(f"has no {key} (the original coi's layout)")
        if data["session_id"] != os.path.basename(path):
            raise BadInput(f"names session {data['session_id']!r}, not its directory")
        if not os.path.isabs(data["workspace"]):
            raise BadInput(f"has a workspace that is not an absolute path: {data['workspace']!r}")
        try:
            saved_at = parse_time(data["saved_at"])
        except ValueError:
            raise BadInput(f"has a malformed saved_at {data['saved_at']!r}") from None
        container = data.get("container_name")
        stamp = saved_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        workspace = os.path.normpath(data["workspace"])
        return cls(id=data["session_id"], tool=tool, workspace=workspace, updated_at=stamp,
                   created_at=stamp, workspace_hash=_hash(workspace),
                   container=container if isinstance(container, str) else "",
                   persistent=data.get("persistent") is True, path=path, layout=ORIGINAL)

    @classmethod
    def from_metadata(cls, data: Any, path: str) -> Session:
        """Checked metadata of the directory `path`; BadInput says what is wrong."""
        if not isinstance(data, dict):
            raise BadInput("is not a JSON object")
        version = data.get("coi")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BadInput("has no integer 'coi' contract version")
        if version > CONTRACT_VERSION:
            raise BadInput(f"was written by a newer coi (contract {version})")
        if data.get("kind") != "session":
            raise BadInput(f"is of kind {data.get('kind')!r}, not session")
        texts = {}
        for key in ("id", "tool", "workspace", "updated_at"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise BadInput(f"has no {key}")
            texts[key] = data[key]
        if texts["id"] != os.path.basename(path):
            raise BadInput(f"names session {texts['id']!r}, not its directory")
        try:
            parse_time(texts["updated_at"])
        except ValueError:
            raise BadInput(f"has a malformed updated_at {texts['updated_at']!r}") from None
        slot = data.get("slot")
        return cls(
            id=texts["id"], tool=texts["tool"], workspace=texts["workspace"],
            updated_at=texts["updated_at"], created_at=str(data.get("created_at") or ""),
            workspace_hash=str(data.get("workspace_hash") or ""),
            slot=slot if isinstance(slot, int) and not isinstance(slot, bool) else None,
            container=str(data.get("container") or ""), image=str(data.get("image") or ""),
            persistent=data.get("persistent") is True,
            coi_version=str(data.get("coi_version") or ""),
            resumed_from=str(data.get("resumed_from") or ""),
            files=_count(data.get("files")), bytes=_count(data.get("bytes")), path=path)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _newest_first(found: list[Session]) -> list[Session]:
    return sorted(found, key=lambda s: (parse_time(s.updated_at), s.id), reverse=True)


# -- the store ---------------------------------------------------------------------------


class Store:
    """The saved sessions under one state directory."""

    def __init__(self, state_dir: str, *, on_warning: Callable[[str], None] = warn) -> None:
        self.root = state_dir
        self.warn = on_warning

    def tool_dir(self, tool: str) -> str:
        return os.path.join(self.root, STORE_PREFIX + naming.validate_tool_name(tool))

    def tools(self) -> list[str]:
        """Tool names that have a store directory."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        found = []
        for name in sorted(names):
            tool = name[len(STORE_PREFIX):]
            if name.startswith(STORE_PREFIX) and _valid_tool(tool) and \
                    os.path.isdir(os.path.join(self.root, name)):
                found.append(tool)
        return found

    # -- reading --

    def sessions(self, *, tool: str | None = None,
                 workspace: str | None = None) -> list[Session]:
        """Saved sessions, newest first (by updated_at), optionally of one tool and one
        canonical workspace. Unreadable metadata is skipped with a warning naming it."""
        found = []
        for name in [tool] if tool else self.tools():
            folder = self.tool_dir(name)
            try:
                entries = sorted(os.listdir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.startswith("."):
                    continue
                session = self.read(os.path.join(folder, entry), name)
                if session and (workspace is None or session.workspace == workspace):
                    found.append(session)
        return _newest_first(found)

    def read(self, path: str, tool: str) -> Session | None:
        """The checked session in `path` (a session directory of `tool`); None, with a
        warning naming the file, when its metadata is missing, unreadable or odd."""
        meta = os.path.join(path, METADATA)
        if not os.path.isdir(path):
            return None
        try:
            with open(meta, encoding="utf-8") as handle:
                data = json.loads(handle.read(METADATA_MAX))
            if isinstance(data, dict) and "coi" not in data and "session_id" in data:
                return Session.from_original(data, path, tool)
            session = Session.from_metadata(data, path)
            if session.tool != tool:
                raise BadInput(f"names tool {session.tool!r} but lies under sessions-{tool}")
        except FileNotFoundError:
            self.warn(f"skipping {path}: it has no {METADATA}")
        except (OSError, UnicodeDecodeError) as exc:
            self.warn(f"skipping {meta}: cannot read it ({exc})")
        except json.JSONDecodeError as exc:
            self.warn(f"skipping {meta}: not valid JSON ({exc.msg} at line {exc.lineno})")
        except BadInput as exc:
            self.warn(f"skipping {meta}: it {exc.message}")
        else:
            return session
        return None

    def locate(self, session_id: str) -> tuple[str, str]:
        """(tool, directory) of the session with this id, readable or not; NotFound."""
        naming.validate_session_id(session_id)
        for tool in self.tools():
            path = os.path.join(self.tool_dir(tool), session_id)
            if os.path.isdir(path):
                return tool, path
        raise NotFound(f"no saved session {session_id}", hint="coi session list --all")

    def find(self, session_id: str) -> Session:
        """The session with this id, whatever its tool; NotFound when there is none."""
        tool, path = self.locate(session_id)
        session = self.read(path, tool)
        if session is None:
            raise CoiError(f"saved session {session_id} is unreadable (see the warning "
                           "above)", hint=f"coi session delete {session_id} removes it")
        return session

    def latest(self, workspace: str, tool: str | None = None) -> Session | None:
        found = self.sessions(tool=tool, workspace=workspace)
        return found[0] if found else None

    def for_resume(self, workspace: str, tool: str, session_id: str | None = None
                   ) -> Session | None:
        """What `--resume[=ID]` restores: the given session, refused unless it is of this
        workspace and tool, or the latest of this workspace and tool (None: none)."""
        if not session_id:
            return self.latest(workspace, tool)
        session = self.find(session_id)
        if session.workspace != workspace:
            raise CoiError(f"session {session_id} belongs to another workspace; coi resumes "
                           f"only sessions of {workspace}",
                           hint="coi session list shows this workspace's sessions")
        if session.tool != tool:
            raise BadInput(f"session {session_id} is a {session.tool} session, not {tool}",
                           hint=f"resume it with --tool {session.tool}")
        return session

    # -- changing --

    @contextlib.contextmanager
    def locked(self, tool: str) -> Iterator[str]:
        """The tool's store directory, held under its lock (locks.private, released on exit)."""
        folder = self.tool_dir(tool)
        with locks.private(folder, LOCK_FILE, timeout=LOCK_SECONDS,
                           what=f"the saved sessions of {tool}"):
            yield folder

    def new_tmp(self, tool: str) -> str:
        """A fresh private directory beside the sessions, named for its maker's pid."""
        folder = self.tool_dir(tool)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=folder)
        except (FileExistsError, NotADirectoryError):
            raise CoiError(f"the session store {folder} is not a directory",
                           hint="move that file away") from None

    def commit(self, tmp: str, fields: Session, *, current_id: str = "",
               base: str = "") -> tuple[Session, str]:
        """Make the copy in `tmp` (with its `home/`) the saved session and return it with
        how: "created", "updated" or "forked".

        `current_id`/`base` are the container's session and the updated_at its state
        started from: the session is updated only when nobody saved it since;
        otherwise the copy becomes a new session that records where it came from.
        """
        with self.locked(fields.tool) as folder:
            self._tidy(folder)
            existing = None
            if current_id and _valid_id(current_id):
                path = os.path.join(folder, current_id)
                existing = self.read(path, fields.tool) if os.path.isdir(path) else None
            resumed_from, stamp = fields.resumed_from, now_text()
            if current_id and _valid_id(current_id) and existing is None:
                session_id, how, created_at = current_id, "created", stamp
            elif existing is not None and existing.updated_at == base and \
                    existing.layout != ORIGINAL:  # the original's copy is left as it is
                session_id, how, created_at = current_id, "updated", existing.created_at
                resumed_from = existing.resumed_from
            else:
                session_id, how, created_at = self._unused_id(), "created", stamp
                if existing is not None:
                    how, resumed_from = "forked", existing.id
            target = os.path.join(folder, session_id)
            session = replace(fields, id=session_id, created_at=created_at,
                              updated_at=stamp, resumed_from=resumed_from,
                              coi_version=__version__, path=target)
            protocol.write_json_atomic(os.path.join(tmp, METADATA), session.metadata())
            _swap_in(tmp, target)
        return session, how

    def _unused_id(self) -> str:
        while True:
            session_id = new_session_id()
            if not any(os.path.exists(os.path.join(self.tool_dir(t), session_id))
                       for t in self.tools()):
                return session_id

    def _tidy(self, folder: str) -> None:
        """Under the lock: put back a session whose swap was cut short, and remove the
        temp directories of saves whose process is gone (kill -9, power loss)."""
        for entry in os.listdir(folder):
            path = os.path.join(folder, entry)
            if entry.startswith(OLD_PREFIX):
                original = os.path.join(folder, entry[len(OLD_PREFIX):].rsplit(".", 1)[0])
                if _valid_id(os.path.basename(original)) and not os.path.exists(original):
                    os.rename(path, original)
                else:
                    shutil.rmtree(path, ignore_errors=True)
            elif entry.startswith(TMP_PREFIX) and _abandoned(path, entry):
                shutil.rmtree(path, ignore_errors=True)

    def delete(self, session: Session) -> None:
        """Remove a saved session (under the lock; renamed aside first, so a reader
        never sees half of it). Its metadata need not be readable."""
        with self.locked(session.tool) as folder:
            path = os.path.join(folder, session.id)
            if not os.path.isdir(path):
                raise NotFound(f"no saved session {session.id}")
            aside = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-del-{secrets.token_hex(4)}")
            os.rename(path, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def prune(self, *, keep: int | None = None, older_than: timedelta | None = None,
              tool: str | None = None, workspace: str | None = None) -> list[Session]:
        """Delete sessions beyond the newest `keep` of each workspace and tool, or those
        not updated within `older_than`; return what was deleted, oldest first."""
        victims: list[Session] = []
        groups: dict[tuple[str, str], list[Session]] = {}
        for session in self.sessions(tool=tool, workspace=workspace):
            groups.setdefault((session.tool, session.workspace), []).append(session)
        cutoff = datetime.now(UTC) - older_than if older_than is not None else None
        for group in groups.values():
            if keep is not None:
                victims += group[keep:]
            if cutoff is not None:
                victims += [s for s in group if parse_time(s.updated_at) < cutoff
                            and s not in victims]
        deleted = []
        for session in reversed(_newest_first(victims)):
            with contextlib.suppress(NotFound):
                self.delete(session)
                deleted.append(session)
        return deleted

    def evict(self, limit: int, keep: str) -> list[Session]:
        """Delete the oldest sessions of every tool, never `keep`, until the sessions
        together hold at most `limit` bytes of data (their recorded `bytes`; 0: no
        limit); return what was deleted, oldest first."""
        found = self.sessions()
        total = sum(s.bytes for s in found)
        deleted = []
        for session in reversed(found):
            if not limit or total <= limit:
                break
            if session.id == keep:
                continue
            with contextlib.suppress(NotFound):
                self.delete(session)
                deleted.append(session)
            total -= session.bytes
        return deleted


def _valid_id(text: str) -> bool:
    return _passes(naming.validate_session_id, text)


def _valid_tool(text: str) -> bool:
    return _passes(naming.validate_tool_name, text)


def _passes(validator: Callable[[str], str], text: str) -> bool:
    try:
        validator(text)
    except BadInput:
        return False
    return True


def _abandoned(path: str, entry: str) -> bool:
    """A temp dir `.tmp-<pid>-...` whose process has ended, or one older than a day."""
    pid_text = entry[len(TMP_PREFIX):].split("-", 1)[0]
    try:
        if time.time() - os.lstat(path).st_mtime > LEFTOVER_AGE:
            return True
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except (ValueError, OSError):
        return False
    return False


_RENAME_EXCHANGE: Final = 2
_AT_FDCWD: Final = -100


def _exchange(first: str, second: str) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two paths in one step. False where the kernel,
    libc or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                       _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), second)


def _swap_in(tmp: str, target: str) -> None:
    """Make `tmp` the directory `target` in one atomic step (the old one ends up at
    `tmp` and is removed). Without renameat2, two renames; a crash between them
    leaves `.old-<id>.*`, which the next save under the lock puts back."""
    if not os.path.exists(target):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = os.path.join(os.path.dirname(target),
                       f"{OLD_PREFIX}{os.path.basename(target)}.{secrets.token_hex(4)}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# -- quotas ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quota:
    """A size-valued config key that bounds saved sessions: its bytes (0: no limit)."""

    key: str
    limit: int
    text: str

    @classmethod
    def of(cls, settings: Any, key: str) -> Quota:
        return cls(key, sizes.config_size(settings, key), str(settings.get(key)))

    def exceeded(self, count: int) -> bool:
        return self.limit > 0 and count > self.limit

    def __str__(self) -> str:
        return f"{self.key} ({self.text})"


def save_quotas(settings: Any) -> tuple[Quota, Quota]:
    """limits.session_size and limits.sessions_total: a save may hold neither more than
    the first nor, as the store can never fit it, more than the second."""
    return Quota.of(settings, "limits.session_size"), Quota.of(settings, "limits.sessions_total")


def _disk_room(path: str) -> tuple[int, int]:
    """(free bytes, the reserve a save leaves) of the file system holding `path`."""
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize, min(DISK_RESERVE, info.f_blocks * info.f_frsize // 20)


# -- tar streams out of a container -----------------------------------------------------


@dataclass
class Pulled:
    """What one save stream brought: written files and dirs, bytes, what was dropped."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    dropped: list[str] = field(default_factory=list)
    excluded: int = 0
    first_files: list[str] = field(default_factory=list)
    """The first two files written: enough to tell "only coi's settings file"."""

    def drop(self, name: str, why: str) -> None:
        self.dropped.append(f"{name!r} ({why})")


class _Metered:
    """The container's tar stream as tarfile reads it: while one member's headers are
    parsed (`headers()`), at most HEADER_MAX bytes may be read, so a hostile pax
    record, long name or sparse map cannot fill the host's memory."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._depth = 0
        self._left = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if self._depth:
            self._left -= len(data)
            if self._left < 0:
                raise CoiError(f"a tar header in the state stream is larger than "
                               f"{sizes.human(HEADER_MAX)}; not saved")
        return data

    @contextlib.contextmanager
    def headers(self) -> Iterator[None]:
        if not self._depth:  # a pax header parses the header it describes inside it
            self._left = HEADER_MAX
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1


def _member_class(meter: _Metered) -> type[tarfile.TarInfo]:
    """TarInfo whose headers are read under the meter's bound, and whose malformed
    headers (numbers tarfile does not check) are a tarfile.ReadError, not a crash."""

    class Member(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
            with meter.headers():
                try:
                    return super().fromtarfile(tarfile_)
                except (ValueError, IndexError, OverflowError) as exc:
                    raise tarfile.ReadError(f"malformed tar header ({exc})") from None

    return Member


class StateWriter:
    """Writes the members of an untrusted tar stream into `home`, a fresh directory.

    Only directories and regular files whose normalised relative path is one of
    `state_dirs` (or below one) or one of `state_files` are written; they are
    created here with O_NOFOLLOW in directories created here, and this class
    never creates a link, so no write can leave `home`. Links, devices, FIFOs,
    absolute or `..` paths, and paths outside the state are dropped and counted.
    Members named in `exclude` (injected credentials) are skipped and counted apart.

    Holes of sparse members stay holes: only their data is written (and counted
    in `bytes`). Before a file's data is written, the data so far plus its data
    is checked against every quota and the free disk (DISK_RESERVE): the save
    stops there, so it can never write past a limit.
    """

    def __init__(self, home: str, state_dirs: Sequence[str], state_files: Sequence[str],
                 exclude: Sequence[str] = (), quotas: Sequence[Quota] = ()) -> None:
        self.home = home
        self.state_dirs = tuple(state_dirs)
        self.state_files = tuple(state_files)
        self.exclude = frozenset(exclude)
        self.quotas = sorted(quotas, key=lambda q: q.limit)
        self.result = Pulled()
        self.members = 0
        os.makedirs(home, mode=0o700, exist_ok=True)

    def consume(self, stream: IO[bytes]) -> Pulled:
        """Write what the untrusted tar `stream` holds (read once, in order; each member's
        headers bounded by HEADER_MAX) and return the result."""
        meter = _Metered(stream)
        with tarfile.open(fileobj=meter, mode="r|", tarinfo=_member_class(meter)) as archive:
            for member in archive:
                self.add(member, archive)
        return self.result

    def add(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise CoiError(f"the saved state has more than {MAX_MEMBERS} entries; not saved")
        rel = clean_member_name(member.name)
        kind = _kind(member)
        if rel is None:
            self.result.drop(member.name, "unsafe path")
            return
        if kind not in ("file", "dir"):
            self.result.drop(rel, kind)
            return
        if rel in self.exclude:
            self.result.excluded += 1
            return
        if not self._allowed(rel, kind):
            self.result.drop(rel, "outside the tool's state")
            return
        if kind == "dir":
            if self._make_dirs(rel.split("/")):
                self.result.dirs += 1
            else:
                self.result.drop(rel, "type conflict")
            return
        self._write_file(rel, member, archive)

    def _allowed(self, rel: str, kind: str) -> bool:
        if rel in self.state_files:
            return kind == "file"
        return any(rel == d or rel.startswith(d + "/") for d in self.state_dirs) and \
            not (kind == "file" and rel in self.state_dirs)

    dir_mode = 0o700

    def file_mode(self, mode: int) -> int:
        """The mode a written file gets from its member's: owner-only; the owner's
        execute bit survives (hook scripts stay runnable)."""
        return 0o600 | (mode & 0o100)

    def _make_dirs(self, parts: Sequence[str]) -> bool:
        """Create home/parts... as directories; False when a part exists as a non-dir."""
        path = self.home
        for part in parts:
            path = os.path.join(path, part)
            try:
                os.mkdir(path, self.dir_mode)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    return False
        return True

    def _check_room(self, data: int) -> None:
        """Refuse (CoiError) a file whose `data` bytes would pass a quota or the disk reserve."""
        total = self.result.bytes + data
        for quota in self.quotas:
            if quota.exceeded(total):
                raise CoiError(f"the tool state holds more than {quota} of data; not saved, "
                               "the previous save is kept",
                               hint=f"raise {quota.key} in your config; 0 is no limit")
        free, reserve = _disk_room(self.home)
        if free - data < reserve:
            raise CoiError(f"saving would leave less than {sizes.human(reserve)} free on the "
                           f"disk of {self.home}; not saved, the previous save is kept",
                           hint="free disk space, e.g. coi session prune --keep 1 --all")

    def _write_file(self, rel: str, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        parts = rel.split("/")
        segments = _segments(member, archive)
        if segments is None:
            self.result.drop(rel, "bad sparse map")
            return
        data = sum(length for _, length in segments)
        self._check_room(data)
        if not self._make_dirs(parts[:-1]):
            self.result.drop(rel, "type conflict")
            return
        path = os.path.join(self.home, *parts)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600)
        except (IsADirectoryError, OSError) as exc:
            if isinstance(exc, IsADirectoryError) or exc.errno in (errno.ELOOP, errno.EISDIR):
                self.result.drop(rel, "type conflict")
                return
            raise
        try:
            _copy_segments(archive.fileobj, member.offset_data, fd, segments)
            # The size last: what no segment covered, up to it, stays a hole.
            os.ftruncate(fd, member.size)
            os.fchmod(fd, self.file_mode(member.mode))
        except (OSError, OverflowError) as exc:
            os.unlink(path)
            if isinstance(exc, OSError) and exc.errno not in (errno.EFBIG, errno.EINVAL):
                raise
            self.result.drop(rel, f"size {member.size} cannot be stored")  # nor off_t
            return
        finally:
            os.close(fd)
        with contextlib.suppress(OSError, OverflowError, ValueError):
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        self.result.files += 1
        self.result.bytes += data
        if len(self.result.first_files) < 2:
            self.result.first_files.append(rel)


def _segments(member: tarfile.TarInfo, archive: tarfile.TarFile) -> list[tuple[int, int]] | None:
    """Where the member's stored data goes in the file: (offset, length), in stream order
    (one segment, or a sparse member's map without its empty entries). None for a map
    out of order, overlapping, past the file's size or claiming more than is stored."""
    if member.size < 0:
        return None
    if member.sparse is None:
        return [(0, member.size)] if member.size else []
    found: list[tuple[int, int]] = []
    end = 0
    for offset, length in member.sparse:
        if length == 0:
            continue
        if offset < end or length < 0 or offset + length > member.size:
            return None
        found.append((offset, length))
        end = offset + length
    stored = archive.offset - member.offset_data
    return found if sum(length for _, length in found) <= stored else None


def _copy_segments(stream: IO[bytes], start: int, fd: int,
                   segments: Sequence[tuple[int, int]]) -> None:
    """Write a member's data, stored back to back in `stream` from `start`, to `fd` at the
    file offsets of `segments`; what lies between stays a hole."""
    stream.seek(start)
    for offset, length in segments:
        at, end = offset, offset + length
        while at < end:
            chunk = memoryview(stream.read(min(end - at, _COPY_CHUNK)))
            if not chunk:
                raise tarfile.ReadError("unexpected end of data")
            while chunk:
                done = os.pwrite(fd, chunk, at)
                chunk, at = chunk[done:], at + done


def clean_member_name(name: str) -> str | None:
    """A tar member name as a relative path without `.`, `..` or empty parts; None
    for an absolute path, a `..` anywhere, a NUL, or nothing at all."""
    if not isinstance(name, str) or not name or "\0" in name or name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _kind(member: tarfile.TarInfo) -> str:
    """file, dir, or the kind of entry that is dropped."""
    checks = (("file", member.isreg), ("dir", member.isdir), ("symlink", member.issym),
              ("hard link", member.islnk), ("fifo", member.isfifo),
              ("device", lambda: member.ischr() or member.isblk()))
    return next((kind for kind, check in checks if check()), "special file")


class _NotStarted(CoiError):
    """The exec failed before the command ran (incus.exec_not_started): safe to try again."""


def _as_code(name: str, command: Sequence[str], env: Mapping[str, str]) -> ExecSpec:
    """A command of the state copy, run as code from /, without a terminal."""
    return ExecSpec(name, tuple(command), user=TOOL_UID, cwd="/", env=env, tty=False)


def _again(name: str, action: Callable[[], Any]) -> Any:
    """Run `action` under incus.retry_exec, again while its exec did not start."""
    def attempt() -> Any:
        try:
            return action()
        except _NotStarted as exc:
            return exc

    outcome = retry_exec(ExecSpec(name, ("tar",)), attempt,
                         lambda result: isinstance(result, _NotStarted))
    if isinstance(outcome, _NotStarted):
        raise CoiError(outcome.message)
    return outcome


def _not_started(errors: IO[bytes] | bytes) -> bool:
    if not isinstance(errors, bytes):
        errors.seek(0)
        errors = errors.read()
    return exec_not_started(errors)


def pull_state(client: Incus, name: str, tool: Tool, home: str, *,
               exclude: Sequence[str] = (), quotas: Sequence[Quota] = (),
               timeout: float = SAVE_TIMEOUT) -> Pulled:
    """Stream the tool's state out of the RUNNING container `name` into `home`.

    One `tar --sparse -c` runs in the container as code (holes are not sent);
    its output is parsed here as a stream (tarfile "r|") by a StateWriter bound
    by `quotas`. The whole stream is abandoned (the process group killed) after
    `timeout` seconds. An exec that Incus failed to start is tried again.
    """
    deadline = time.monotonic() + timeout
    return _again(name, lambda: _pull_once(client, name, tool, home, exclude=exclude,
                                     quotas=quotas,
                                     timeout=max(1.0, deadline - time.monotonic())))


def _pull_once(client: Incus, name: str, tool: Tool, home: str, *, exclude: Sequence[str],
               quotas: Sequence[Quota], timeout: float) -> Pulled:
    paths = [*tool.state_dirs, *tool.state_files]
    writer = StateWriter(home, tool.state_dirs, tool.state_files, exclude, quotas)
    stream_out(client, _as_code(name, ["tar", "--ignore-failed-read", "--sparse", "-C", HOME,
                                       "-cf", "-", "--", *paths],
                                {"HOME": HOME, "LC_ALL": "C"}),
               writer, timeout=timeout, broke=f"the state stream from {name} broke off",
               slow=f"saving {name} took longer than {timeout:g} s; the previous save is kept")
    return writer.result


def stream_out(client: Incus, spec: ExecSpec, writer: StateWriter, *, timeout: float,
               broke: str, slow: str, stdin: IO[bytes] | None = None, after: str = "") -> None:
    """Run `spec` (a `tar -c` in the container) and let `writer` consume its output as a
    stream, the whole of it abandoned (the process group killed) after `timeout` s.
    `broke` and `slow` say what failed when the stream breaks or the time runs out;
    `after` follows the reason of a tar that failed. GNU tar's exit 1 (a file changed
    while it was read) is a success. A tar Incus never started raises _NotStarted
    (for _again)."""
    with tempfile.TemporaryFile() as errors:
        child = client.exec_stream(spec, stdin=stdin, stdout=subprocess.PIPE, stderr=errors)
        expired = proc.Watchdog(child, timeout)
        try:
            assert child.stdout is not None
            try:
                writer.consume(child.stdout)
                _drain(child.stdout)
            except (tarfile.TarError, EOFError, OSError) as exc:
                if expired.fired:
                    raise CoiError(slow) from None
                # An exec that never started has ended already: a short wait will do.
                raise _broken_stream(child, spec.instance, errors, exc, broke, grace=2,
                                     unread=writer.members == 0) from None
            status = child.wait()
        finally:
            expired.cancel()
            _end(child)
        if expired.fired:
            raise CoiError(slow)
        if status not in (0, 1):
            raise CommandFailed(f"tar in {spec.instance} exited {status}: "
                                f"{_reason(None, errors)}{after}")


def _end(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        proc.stop_group(child, grace=0)
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _drain(stream: IO[bytes]) -> None:
    """Read what follows the end of the archive (tar's record padding), bounded."""
    left = TRAILING_MAX
    while left > 0:
        chunk = stream.read(min(left, 65536))
        if not chunk:
            return
        left -= len(chunk)
    raise CoiError("the state stream goes on after the end of the archive")


def _broken_stream(child: subprocess.Popen[bytes], name: str, errors: IO[bytes],
                   exc: BaseException, what: str, *, grace: float,
                   unread: bool = True) -> CoiError:
    """The failure of a tar stream that broke halfway, once its exec ended (within
    `grace` s): _NotStarted (tried again) when incus never started tar, and nothing
    was read yet (`unread`); else `what` with the reason."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=grace)
    if unread and (_not_started(errors) or _ended_silently(child, errors)):
        return _NotStarted(f"incus could not start tar in {name}: {_reason(None, errors)}")
    return CoiError(f"{what}: {_reason(exc, errors)}")


def _ended_silently(child: subprocess.Popen[bytes], errors: IO[bytes]) -> bool:
    """An exec that ended without a byte of tar's output and without a word on stderr:
    tar never ran (it always writes an archive's end, or says why not), as seen once
    right after a stopped container was started for a save."""
    errors.seek(0)
    return child.returncode is not None and not errors.read(1)


def _reason(exc: BaseException | None, errors: IO[bytes]) -> str:
    errors.seek(0)
    text = errors.read()[-4000:].decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = lines[-1] if lines else ""
    if exc is not None and detail:
        return f"{exc} ({detail})"
    return str(exc) if exc is not None else (detail or "no output")


# -- tar streams into a container --------------------------------------------------------


@dataclass(frozen=True)
class Extra:
    """A small file put into the container home next to the restored state."""

    rel: str
    data: bytes
    mode: int = 0o600


def _tar_info(rel: str, kind: bytes, mode: int, size: int = 0,
              mtime: float = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = int(mtime or time.time())
    info.uid = info.gid = TOOL_UID
    info.uname = info.gname = "code"
    return info


def _data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data of the open file `fd` of `size` bytes, holes left
    out; one segment where the file system cannot tell (no SEEK_DATA)."""
    segments: list[tuple[int, int]] = []
    at = 0
    try:
        while at < size:
            start = os.lseek(fd, at, os.SEEK_DATA)
            at = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            segments.append((start, at - start))
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no data after `at`, the rest is a hole
            return [(0, size)] if size else []
    return segments


class _SparseSource:
    """The stored data of a PAX 1.0 sparse member (GNU tar's format, which `tar -x`
    restores with holes): the map as decimal lines padded to a block, then the data
    segments read from `fd`. Reads return exactly what tarfile asks for."""

    def __init__(self, fd: int, segments: Sequence[tuple[int, int]], size: int) -> None:
        entries = [*segments, (size, 0)]  # the final empty entry marks the file's end
        text = f"{len(entries)}\n" + "".join(f"{o}\n{n}\n" for o, n in entries)
        self.head = text.encode() + b"\0" * (-len(text) % tarfile.BLOCKSIZE)
        self.size = len(self.head) + sum(n for _, n in segments)
        self._fd = fd
        self._left = list(segments)

    def read(self, size: int) -> bytes:
        parts = [self.head[:size]]
        self.head = self.head[size:]
        size -= len(parts[0])
        while size and self._left:
            offset, length = self._left[0]
            data = os.pread(self._fd, min(size, length), offset)
            if not data:
                break
            parts.append(data)
            size -= len(data)
            self._left[0] = (offset + len(data), length - len(data))
            if self._left[0][1] == 0:
                self._left.pop(0)
        return b"".join(parts)


def _add_file(archive: tarfile.TarFile, rel: str, source: IO[bytes]) -> int:
    """Add the open regular file `source` as `rel`, a sparse member when it has holes;
    return its data bytes."""
    opened = os.fstat(source.fileno())
    info = _tar_info(rel, tarfile.REGTYPE, 0o600 | (opened.st_mode & 0o100), opened.st_size,
                     opened.st_mtime)
    segments = _data_segments(source.fileno(), opened.st_size)
    source.seek(0)  # SEEK_DATA/SEEK_HOLE moved the file offset
    data = sum(n for _, n in segments)
    if data == opened.st_size:
        archive.addfile(info, source)
        return data
    sparse = _SparseSource(source.fileno(), segments, opened.st_size)
    folder, _, base = rel.rpartition("/")
    info.name = f"{folder}/GNUSparseFile.0/{base}" if folder else f"GNUSparseFile.0/{base}"
    info.size = sparse.size
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": rel, "GNU.sparse.realsize": str(opened.st_size)}
    archive.addfile(info, sparse)  # type: ignore[arg-type]  # read() is all addfile uses
    return data


def _write_saved_tree(archive: tarfile.TarFile, home: str, tops: Collection[str]
                     ) -> tuple[int, int]:
    """Add every directory and regular file under the entries `tops` of `home` (never
    following a link); return (files, data bytes)."""
    files = size = 0
    for folder, dirs, files_here in os.walk(home, followlinks=False):
        rel_folder = os.path.relpath(folder, home)
        if rel_folder == ".":
            dirs[:] = [d for d in dirs if d in tops]
        names = [n for n in files_here if rel_folder != "." or n in tops]
        dirs.sort()
        for name in [*sorted(dirs), *sorted(names)]:
            path = os.path.join(folder, name)
            rel = name if rel_folder == "." else f"{rel_folder}/{name}"
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):
                archive.addfile(_tar_info(rel, tarfile.DIRTYPE, 0o700, mtime=info.st_mtime))
            elif stat.S_ISREG(info.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as source:
                    size += _add_file(archive, rel, source)
                files += 1
    return files, size


def push_state(client: Incus, name: str, *, home: str | None, extras: Sequence[Extra],
               replace_paths: Sequence[str] = (),
               timeout: float = SAVE_TIMEOUT) -> tuple[int, int]:
    """One tar stream into `tar -x` as code in /home/code of the RUNNING container: the
    saved tree `home` (when given; only what lies under `replace_paths`), then
    `extras`. `replace_paths` are removed first, so the restored state replaces the
    container's instead of mixing with it.
    Returns (files, bytes) of the saved tree. An exec that Incus failed to start
    (nothing ran, nothing changed) is tried again."""
    return _again(name, lambda: _push_once(client, name, home=home, extras=extras,
                                     replace_paths=replace_paths, timeout=timeout))


def _push_once(client: Incus, name: str, *, home: str | None, extras: Sequence[Extra],
               replace_paths: Sequence[str], timeout: float) -> tuple[int, int]:
    script = 'cd "$HOME" || exit 1\n'
    if replace_paths:
        script += 'rm -rf -- "$@" || exit 1\n'
    script += "exec tar --no-same-owner -xf -"
    with tempfile.TemporaryFile() as errors:
        child = client.exec_stream(
            _as_code(name, ["sh", "-c", script, "coi-restore", *replace_paths],
                     {"HOME": HOME, "LC_ALL": "C"}),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
        expired = proc.Watchdog(child, timeout)
        counted = (0, 0)
        try:
            assert child.stdin is not None
            try:
                with tarfile.open(fileobj=child.stdin, mode="w|", format=tarfile.PAX_FORMAT) \
                        as archive:
                    if home is not None:
                        tops = {path.split("/")[0] for path in replace_paths}
                        counted = _write_saved_tree(archive, home, tops)
                    for extra in extras:
                        archive.addfile(_tar_info(extra.rel, tarfile.REGTYPE, extra.mode,
                                                  len(extra.data)), io.BytesIO(extra.data))
                child.stdin.close()
            except (BrokenPipeError, OSError) as exc:
                raise _broken_stream(child, name, errors, exc,
                                     f"could not put the session into {name}",
                                     grace=10) from None
            status = child.wait()
        finally:
            expired.cancel()
            _end(child)
        if expired.fired:
            raise CoiError(f"restoring into {name} took longer than {timeout:g} s")
        if status != 0:
            if _not_started(errors):
                raise _NotStarted(f"incus could not start tar in {name}: {_reason(None, errors)}")
            raise CommandFailed(f"tar in {name} exited {status}: {_reason(None, errors)}")
    return counted


# -- credentials and settings ------------------------------------------------------------


def injects_credentials(tool: Tool, settings: Any) -> bool:
    """Whether the tool's credential files are copied in: `[tools.NAME]
    inject_credentials` when the user set it, for claude else
    `defaults.mount_claude_config`, else the registry's default."""
    user_table = settings.tools.get(tool.name) or {}
    if "inject_credentials" in user_table or tool.name != "claude":
        return tool.inject_credentials
    return tool.inject_credentials and bool(settings.get("defaults.mount_claude_config"))


def host_home() -> str:
    return os.path.expanduser("~")


def _host_file(rel: str) -> bytes | None:
    """A small regular file of the host user's home, or None (missing, odd, too big)."""
    path = os.path.join(host_home(), rel)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            warn(f"{path} is not a regular file; not copied")
            return None
        if info.st_size > SMALL_FILE_MAX:
            warn(f"{path} is larger than {SMALL_FILE_MAX // 1024} KiB; not copied")
            return None
        with open(path, "rb") as handle:
            return handle.read(SMALL_FILE_MAX + 1)[:SMALL_FILE_MAX]
    except FileNotFoundError:
        return None
    except OSError as exc:
        warn(f"cannot read {path}: {exc.strerror}; not copied")
        return None


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overlay` laid over it: objects present in both are merged key by
    key (recursively); any other value from `overlay` replaces the one in `base`."""
    merged = json_copy(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = json_copy(value)
    return merged


def _json_object(data: bytes | None, where: str) -> dict[str, Any] | None:
    """The JSON object in `data` ({} for none); None, with a warning, when it is not one."""
    if data is None or not data.strip():
        return {}
    try:
        value = protocol_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, BadInput) as exc:
        warn(f"{where} is not usable JSON ({exc}); coi leaves it as it is")
        return None
    if not isinstance(value, dict):
        warn(f"{where} is not a JSON object; coi leaves it as it is")
        return None
    return value


def merged_settings(tool: Tool, current: bytes | None, *, with_host: bool) -> bytes | None:
    """The new content of the tool's settings file: `current` (what the container has,
    or the saved copy), then the host user's file (when injecting), then coi's keys,
    deep-merged. None when there is nothing to write or `current` cannot be merged."""
    if not tool.settings_file:
        return None
    base = _json_object(current, f"the container's ~/{tool.settings_file}")
    if base is None:
        return None
    merged = base
    if with_host:
        host = _json_object(_host_file(tool.settings_file), f"~/{tool.settings_file} on the host")
        merged = deep_merge(merged, host or {})
    merged = deep_merge(merged, tool.settings)
    if merged == base and (current is not None or not merged):
        return None
    return (json.dumps(merged, indent=2) + "\n").encode("utf-8")


def credential_extras(tool: Tool) -> list[Extra]:
    """The tool's credential files found in the host user's home."""
    extras = []
    for rel in tool.credential_files:
        data = _host_file(rel)
        if data is not None:
            extras.append(Extra(rel, data))
    return extras


def _container_file(client: Incus, name: str, rel: str) -> bytes | None:
    """A small file of the container home as code sees it; None when it is not there."""
    return _again(name, lambda: _read_once(client, name, rel))


def _read_once(client: Incus, name: str, rel: str) -> bytes | None:
    child = client.exec_stream(
        _as_code(name, ["sh", "-c", f'test -f "$1" || exit 3; head -c {SMALL_FILE_MAX + 1} '
                        '-- "$1"', "coi", f"{HOME}/{rel}"], {"HOME": HOME}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        data, errors = child.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        _end(child)
        raise CoiError(f"reading ~/{rel} in {name} took longer than 30 s") from None
    if child.returncode == 3:
        return None
    if child.returncode != 0:
        if _not_started(errors):
            raise _NotStarted(f"incus could not read ~/{rel} in {name}: "
                              f"{errors.decode('utf-8', 'replace').strip()}")
        detail = errors.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise CommandFailed(f"cannot read ~/{rel} in {name}: {detail[0]}")
    if len(data) > SMALL_FILE_MAX:
        raise CoiError(f"~/{rel} in {name} is larger than {SMALL_FILE_MAX // 1024} KiB")
    return data


def _in_state(tool: Tool, rel: str) -> bool:
    return rel in tool.state_files or any(rel.startswith(d + "/") for d in tool.state_dirs)


# -- containers: running one briefly without a network --------------------------------------


@contextlib.contextmanager
def running(client: Incus, name: str, instance: Mapping[str, Any] | None = None
            ) -> Iterator[bool]:
    """Yield with `name` running; True when it had to be started for this. `instance`:
    the container as the caller just read it (else it is read here).

    A stopped container is started with every NIC masked (an instance device of
    type `none` over each), so nothing in it reaches a network during the copy;
    it is stopped again and its devices are put back afterwards. What to put
    back is stored on the container first, so a save killed halfway is healed
    by the next one (heal_masked).
    """
    instance = instance or client.instance_config(name)
    heal_masked(client, name, instance)
    status = instance.get("status")
    if status == "Running":
        yield False
        return
    if status != "Stopped":
        raise CoiError(f"{name} is {str(status).lower()}; cannot copy its session now")
    _mask_nics(client, name)
    try:
        client.set_state(name, "start")
        yield True
    finally:
        with contextlib.suppress(CoiError):
            client.set_state(name, "stop", force=True)
        heal_masked(client, name)


def _mask_nics(client: Incus, name: str) -> None:
    instance = client.instance_config(name)
    nics = sorted(k for k, v in (instance.get("expanded_devices") or {}).items()
                  if v.get("type") == "nic")
    if not nics:
        return
    own = instance.get("devices") or {}
    saved = json.dumps({nic: own.get(nic) for nic in nics}, sort_keys=True)
    client.set_config(name, {MASKED_KEY: saved})
    client.edit_instance(name, devices={nic: {"type": "none"} for nic in nics})


def heal_masked(client: Incus, name: str, instance: Mapping[str, Any] | None = None) -> None:
    """Put back the NICs a save masked (normally at once; after a crash, later).
    `instance`: the container as just read (else it is read here)."""
    config = (instance or client.instance_config(name)).get("config") or {}
    if MASKED_KEY not in config:
        return
    try:
        saved = json.loads(config[MASKED_KEY])
        if not isinstance(saved, dict):
            raise TypeError
    except (TypeError, json.JSONDecodeError):
        saved = {}
    restore = {k: v for k, v in saved.items() if isinstance(v, dict)}
    remove = [k for k, v in saved.items() if v is None]
    client.edit_instance(name, devices=restore, remove_devices=remove, unset=[MASKED_KEY])


# -- the verbs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveResult:
    """What a save did. `session` is None when the container held no tool state."""

    container: str
    session: Session | None
    how: str = ""
    files: int = 0
    bytes: int = 0
    dropped: tuple[str, ...] = ()
    excluded: int = 0
    started: bool = False
    seconds: float = 0.0
    evicted: tuple[str, ...] = ()
    """Ids of the oldest sessions deleted afterwards to fit the total quota, oldest first."""
    total_quota: str = ""
    synced: Any = None
    """On a remote: the workspace pull that came first (workspace_sync.SyncResult)."""

    def to_record(self) -> dict[str, Any]:
        session = self.session
        return make_record(
            "session_saved", saved=session is not None, container=self.container,
            id=session.id if session else None, tool=session.tool if session else None,
            workspace=session.workspace if session else None, how=self.how,
            files=self.files, bytes=self.bytes, dropped=len(self.dropped),
            dropped_paths=list(self.dropped[:SHOWN_DROPS]),
            credentials_excluded=self.excluded, started=self.started,
            seconds=round(self.seconds, 3), path=session.path if session else None,
            evicted=list(self.evicted), message=self.line(),
            workspace_sync=self.synced.to_record() if self.synced is not None else None)

    def line(self) -> str:
        if self.session is None:
            return steps.nothing_saved_line(self.container)
        dropped = f", {len(self.dropped)} unsafe entries dropped" if self.dropped else ""
        evicted = ""
        if self.evicted:
            shown = ", ".join(self.evicted[:SHOWN_EVICTED])
            more = f" and {len(self.evicted) - SHOWN_EVICTED} more" \
                if len(self.evicted) > SHOWN_EVICTED else ""
            evicted = (f"; removed the {len(self.evicted)} oldest saved session(s) to stay "
                       f"within {self.total_quota}: {shown}{more}")
        return steps.saved_line(self.session.id, self.container,
                                f"{self.how}, {self.files} files, {sizes.human(self.bytes)}"
                                f"{dropped}, {self.seconds:.2f} s") + evicted


@dataclass(frozen=True)
class RestoreResult:
    """What a restore (or a fresh start's credential injection) put in."""

    container: str
    session: Session | None
    files: int = 0
    bytes: int = 0
    credentials: tuple[str, ...] = ()
    settings_file: str | None = None
    seconds: float = 0.0

    def to_record(self) -> dict[str, Any]:
        session = self.session
        return make_record(
            "session_restored", id=session.id if session else None, container=self.container,
            tool=session.tool if session else None, files=self.files, bytes=self.bytes,
            credentials=list(self.credentials), settings_file=self.settings_file,
            seconds=round(self.seconds, 3), message=self.line())

    def line(self) -> str:
        creds = f", credentials {', '.join(self.credentials)}" if self.credentials else ""
        what = f"session {self.session.id}" if self.session else "credentials"
        return (f"restored {what} into {self.container} ({self.files} files, "
                f"{sizes.human(self.bytes)}{creds}, {self.seconds:.2f} s)")


def _coi_keys(instance: Mapping[str, Any]) -> dict[str, str]:
    config = instance.get("config") or {}
    if f"{KEY}workspace" not in config or f"{KEY}tool" not in config:
        raise BadInput(f"{instance.get('name')} is not a coi session container "
                       "(it has no user.coi.workspace and user.coi.tool)")
    return {k[len(KEY):]: str(v) for k, v in config.items() if k.startswith(KEY)}


def _settings_for(workspace: str, settings: Any) -> Any:
    if settings is not None:
        return settings
    from coi_common import config  # noqa: PLC0415

    return config.load(workspace if os.path.isdir(workspace) else None, lenient=True)


def save_container(client: Incus, name: str, *, settings: Any = None,
                   timeout: float = SAVE_TIMEOUT) -> SaveResult:
    """Save the tool state of the coi container `name` (running or stopped).

    The tool is the container's `user.coi.tool`, the store `paths.state_dir` of
    the config of its workspace (or `settings`). Raises on failure (also when the
    state holds more than limits.session_size or limits.sessions_total); the
    previous save of the session is then untouched. After the save, the oldest
    other sessions are deleted until the store fits limits.sessions_total.
    """
    started_at = time.monotonic()
    naming.validate_container_name(name)
    instance = client.instance_config(name)
    keys = _coi_keys(instance)
    settings = _settings_for(keys["workspace"], settings)
    tool = get_tool(keys["tool"], registry_from_config(settings))
    stateless = not tool.state_dirs and not tool.state_files
    remote = client.remote is not None  # its workspace comes back first, whatever the tool
    if stateless and not remote:
        return SaveResult(name, None)
    per_session, total = save_quotas(settings)
    store = Store(settings.path("paths.state_dir"))
    exclude = tool.credential_files if injects_credentials(tool, settings) else ()
    tmp = store.new_tmp(tool.name)
    try:
        with running(client, name, instance) as started:  # started once for both
            synced = _pull_workspace(client, name, settings, instance) if remote else None
            if stateless:
                return SaveResult(name, None, started=started, synced=synced)
            # The workspace's copy has its own bound (workspace_sync): not the state's.
            spent = time.monotonic() - started_at - (synced.seconds if synced else 0.0)
            left = max(1.0, timeout - spent)
            pulled = pull_state(client, name, tool, os.path.join(tmp, HOME_DIR),
                                exclude=exclude, quotas=(per_session, total),
                                timeout=left)
        if pulled.files == 0 or pulled.first_files == [tool.settings_file]:
            # Nothing, or only the settings file coi itself wrote at the start.
            return SaveResult(name, None, dropped=tuple(pulled.dropped),
                              excluded=pulled.excluded, started=started,
                              seconds=time.monotonic() - started_at, synced=synced)
        slot = keys.get("slot", "")
        fields = Session(
            id="", tool=tool.name, workspace=keys["workspace"], updated_at="",
            workspace_hash=_hash(keys["workspace"]),
            slot=int(slot) if slot.isascii() and slot.isdigit() else None, container=name,
            image=keys.get("image", ""), persistent=keys.get("persistent") == "true",
            files=pulled.files, bytes=pulled.bytes)
        session, how = store.commit(tmp, fields, current_id=keys.get("session_id", ""),
                                    base=keys.get("session_base", ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(NotFound):
        client.set_config(name, {SESSION_ID_KEY: session.id,
                                 SESSION_BASE_KEY: session.updated_at})
    evicted = tuple(s.id for s in store.evict(total.limit, keep=session.id))
    return SaveResult(name, session, how, pulled.files, pulled.bytes, tuple(pulled.dropped),
                      pulled.excluded, started, time.monotonic() - started_at, evicted,
                      str(total), synced)


def _pull_workspace(client: Incus, name: str, settings: Any,
                    instance: Mapping[str, Any]) -> Any:
    """A remote container's workspace changes, pulled into the host's before its
    session is saved (a failure fails the save: the container is kept). A container
    this host never synced (another host's, or made by hand) has nothing of ours."""
    from coi_session import workspace_sync  # noqa: PLC0415

    try:
        return workspace_sync.sync(client, name, settings, "pull", instance=instance)
    except NotFound as exc:
        if exc.message.startswith("no sync point"):
            return None
        raise


def _hash(workspace: str) -> str:
    """workspace_hash of the recorded path, also when the directory is gone by now."""
    import hashlib  # noqa: PLC0415

    return hashlib.sha256(workspace.encode("utf-8", "surrogateescape")).hexdigest()[
        :naming.HASH_LEN]


def restore_into(client: Incus, name: str, session: Session | None, *, settings: Any = None,
                 timeout: float = SAVE_TIMEOUT) -> RestoreResult:
    """Put `session` (None: nothing saved, credentials only) into the coi container
    `name`, then the tool's fresh credentials and merged settings file.

    The session must be of the container's workspace and tool. The container
    then carries the session's id, so its next save updates that session.
    """
    started_at = time.monotonic()
    instance = client.instance_config(name)
    keys = _coi_keys(instance)
    settings = _settings_for(keys["workspace"], settings)
    tool = get_tool(keys["tool"], registry_from_config(settings))
    if session is not None:
        if session.workspace != keys["workspace"]:
            raise CoiError(f"session {session.id} belongs to another workspace than {name} "
                           f"({keys['workspace']})", hint="resume it from its own workspace")
        if session.tool != tool.name:
            raise BadInput(f"session {session.id} is a {session.tool} session; {name} runs "
                           f"{tool.name}")
        if not os.path.isdir(session.home):
            raise CoiError(f"saved session {session.id} has no {HOME_DIR}/ directory")
    with_host = injects_credentials(tool, settings)
    extras = credential_extras(tool) if with_host else []
    with running(client, name, instance):
        settings_text = _settings_base(client, name, tool, session)
        merged = merged_settings(tool, settings_text, with_host=with_host)
        if merged is not None:
            extras.append(Extra(tool.settings_file or "", merged))
        replace_paths = [*tool.state_dirs, *tool.state_files] if session else []
        if session is None and not extras:
            files, size = 0, 0
        else:
            files, size = push_state(client, name, home=session.home if session else None,
                                     extras=extras, replace_paths=replace_paths,
                                     timeout=timeout)
    if session is not None:
        client.set_config(name, {SESSION_ID_KEY: session.id,
                                 SESSION_BASE_KEY: session.updated_at})
    creds = tuple(e.rel for e in extras if e.rel in tool.credential_files)
    return RestoreResult(name, session, files, size, creds,
                         tool.settings_file if merged is not None else None,
                         time.monotonic() - started_at)


def _settings_base(client: Incus, name: str, tool: Tool, session: Session | None
                   ) -> bytes | None:
    """The settings file the merge starts from: the saved copy when the session carries
    it, else the container's own."""
    rel = tool.settings_file
    if not rel:
        return None
    if session is not None and _in_state(tool, rel):
        path = os.path.join(session.home, *rel.split("/"))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as handle:
            return handle.read(SMALL_FILE_MAX)
    return _container_file(client, name, rel)


def new_session_id(now: datetime | None = None) -> str:
    """A fresh session id: UTC time to the second, then 48 random bits.

    Ids sort by creation time; the random part makes two ids made in the
    same second (even by different processes) differ in practice.
    """
    moment = now or datetime.now(UTC)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return f"{moment:%Y%m%d-%H%M%S}-{secrets.token_hex(6)}"
