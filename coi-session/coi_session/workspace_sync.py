"""The workspace of a session on a remote (docs/remote.md, section 3): sent into the
container when it starts (push), brought back (pull) on demand (`coi sync pull`) and by
every save, so before coi stops or deletes the container.

A sync point (the base) is the manifest of the last sync: each workspace file's sha256
and, for the host's copy, its size and mtime (a host file that kept both is not read
again). It is kept on the host, `<state_dir>/remote/<remote>/<container>.json`, and
names the host workspace: a pull writes into the workspace its base names, never into
one the server or the container says. Each side's change is judged against the base:

  changed on one side only      taken over to the other side (a deletion too)
  changed alike on both         nothing to do
  changed differently on both   a conflict: nothing is overwritten; a pull writes the
                                container's copy beside the host's, as
                                FILE.coi-remote-CONTAINER, and reports it

What the container sends is hostile input. Its listing is bounded (MANIFEST_MAX
bytes, MAX_FILES files); its tar goes through the untrusted writer of saved sessions
into a staging directory (regular files only, no link, no path out of it, bounded by
SYNC_MAX bytes and the disk reserve); every file must match the hash listed before it
is moved into place, as the invoking user; a target whose host parents are not plain
directories is a conflict, never followed. Protected paths and masked files are never
pulled: what the agent does to them stays in the container.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

from coi_common import config, naming, proc, views
from coi_common.errors import BadInput, CoiError, NotFound
from coi_common.incus import ExecSpec, Incus
from coi_common.protocol import make_record
from coi_common.sessions import WORKSPACE_PATH
from coi_common.tools import TOOL_UID
from coi_session import saved_sessions as saves
from coi_session import sizes

MANIFEST_MAX: Final = 64 * 1024**2
MAX_FILES: Final = saves.MAX_MEMBERS
SYNC_MAX: Final = 8 * 1024**3
SYNC_TIMEOUT: Final = 3600.0
BASE_MAX: Final = 256 * 1024**2
CONFLICT_MARK: Final = ".coi-remote-"
STAGING_PREFIX: Final = ".coi-sync-"
SHOWN_CONFLICTS: Final = 20
LIST_SCRIPT: Final = ("cd /workspace || exit 3; "
                      "find . -xdev -type f -print0 | xargs -0r sha256sum -z --")
FETCH_SCRIPT: Final = ("cd /workspace || exit 3; "
                       "exec tar --null --verbatim-files-from --no-recursion -T - -cf -")
DELETE_SCRIPT: Final = "cd /workspace || exit 3; xargs -0r rm -f --"
RECEIVE_SCRIPT: Final = "cd /workspace || exit 3; exec tar --no-same-owner -xf -"
MAKE_WORKSPACE: Final = ("install", "-d", "-o", str(TOOL_UID), "-g", str(TOOL_UID), "-m",
                         "0755", WORKSPACE_PATH)

Entry = tuple[str, int, int]
"""A host file in a base: (sha256, size, mtime_ns)."""


# -- the base ---------------------------------------------------------------------------


@dataclass
class Base:
    """The last sync point of one container: where its workspace is on this host, the
    rules it was synced by, and the files both sides held then."""

    path: str
    container: str
    remote: str
    workspace: str
    created: str
    """The container's Incus created_at: a base of an earlier container of the same
    name is stale, and ignored."""
    mask: bool = True
    files: dict[str, Entry] = field(default_factory=dict)

    def save(self) -> None:
        """Written whole, then renamed over the old one: a sync killed halfway leaves
        the previous base, and running it again is safe."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        record = make_record("sync_base", container=self.container, remote=self.remote,
                             workspace=self.workspace, created=self.created, mask=self.mask,
                             files={rel: list(entry) for rel, entry in self.files.items()})
        tmp = f"{self.path}.tmp-{secrets.token_hex(4)}"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w",
                  encoding="utf-8") as handle:
            json.dump(record, handle, separators=(",", ":"))
        os.replace(tmp, self.path)


def base_path(state_dir: str, remote: str, name: str) -> str:
    return os.path.join(state_dir, "remote", remote, f"{naming.validate_container_name(name)}.json")


def load_base(path: str) -> Base | None:
    """The base at `path`, checked field by field; None when there is none."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(BASE_MAX + 1)
    except FileNotFoundError:
        return None
    if len(data) > BASE_MAX:
        raise CoiError(f"the sync point {path} is larger than {sizes.human(BASE_MAX)}")
    try:
        record = json.loads(data)
        files = {str(rel): _entry(value) for rel, value in record["files"].items()}
        base = Base(path, str(record["container"]), str(record["remote"]),
                    str(record["workspace"]), str(record["created"]), bool(record["mask"]),
                    files)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CoiError(f"the sync point {path} cannot be read",
                       hint="delete it; the next 'coi sync push' makes a new one") from None
    if record.get("kind") != "sync_base" or not base.workspace.startswith("/") or \
            any(saves.clean_member_name(rel) != rel for rel in files):
        raise CoiError(f"the sync point {path} is not one coi wrote")
    return base


def _entry(value: Any) -> Entry:
    sha, size, mtime = value
    if not (isinstance(sha, str) and len(sha) == 64 and isinstance(size, int)
            and isinstance(mtime, int)):
        raise ValueError("bad entry")
    return sha, size, mtime


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """One sync of a container at a time on this host (a second waits)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# -- what is synced ---------------------------------------------------------------------


@dataclass(frozen=True)
class Rules:
    """Which workspace files take part: masked ones never (names of security.mask);
    protected ones are sent but never pulled back; coi's own conflict copies and
    staging directories stay on the host."""

    protect: tuple[str, ...]
    mask: tuple[str, ...]

    def sent(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return not (views.masks(name, self.mask) or CONFLICT_MARK in name
                    or rel.startswith(STAGING_PREFIX))

    def pulled(self, rel: str) -> bool:
        return self.sent(rel) and not any(rel == p or rel.startswith(p + "/")
                                          for p in self.protect)


def rules_of(settings: Any, mask: bool) -> Rules:
    protect, patterns = views.rules(settings, mask)
    # Protection holds on a remote even where the local view is switched off: what
    # comes back from a server is never trusted with these paths.
    protect = protect or list(settings.get("security.protected_paths"))
    return Rules(tuple(p.strip("/") for p in protect), tuple(patterns))


def host_files(workspace: str, rules: Rules, known: Mapping[str, Entry]
               ) -> dict[str, Entry]:
    """The host workspace's regular files that take part (links and special files are
    not synced); a file whose size and mtime match `known` is not read again."""
    found: dict[str, Entry] = {}
    for folder, dirs, files in os.walk(workspace):
        rel_dir = os.path.relpath(folder, workspace)
        prefix = "" if rel_dir == "." else f"{rel_dir}/"
        dirs[:] = [d for d in dirs if rules.sent(prefix + d)]
        for name in files:
            rel = prefix + name
            if not rules.sent(rel):
                continue
            with contextlib.suppress(FileNotFoundError):
                entry = _host_entry(os.path.join(folder, name), known.get(rel))
                if entry is not None:
                    found[rel] = entry
    return found


def _host_entry(path: str, known: Entry | None) -> Entry | None:
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        return None
    if known is not None and known[1:] == (info.st_size, info.st_mtime_ns):
        return known
    return file_sha(path), info.st_size, info.st_mtime_ns


def file_sha(path: str) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_listing(data: bytes) -> dict[str, str]:
    """`sha256sum -z` output of the container: relative path -> sha256. Anything
    malformed is refused whole: a half-understood listing would look like deletions."""
    found: dict[str, str] = {}
    for item in data.split(b"\0"):
        if not item:
            continue
        sha, sep, name = item[:64].decode("ascii", "replace"), item[64:66], item[66:]
        text = name.decode("utf-8", "surrogateescape")
        rel = saves.clean_member_name(text)
        if sep not in (b"  ", b" *") or len(sha) != 64 or \
                any(c not in "0123456789abcdef" for c in sha) or rel is None:
            raise CoiError("the container's file listing is malformed; nothing synced")
        found[rel] = sha
        if len(found) > MAX_FILES:
            raise CoiError(f"the container's workspace holds more than {MAX_FILES} files; "
                           "not synced")
    return found


# -- deciding ----------------------------------------------------------------------------


@dataclass
class Plan:
    """What one sync does: files to copy over, to delete there, and conflicts
    (path -> why), with the conflicting files whose copy a pull puts beside."""

    copy: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    conflicts: dict[str, str] = field(default_factory=dict)
    beside: list[str] = field(default_factory=list)


def _incoming(kept: Mapping[str, str], coming: Mapping[str, str], base: Mapping[str, str]
              ) -> Iterator[tuple[str, str | None, str | None]]:
    """Three ways, by sha256 (absent: None): each path `coming`'s side changed since the
    base, as (path, its sha there, the sha on `kept`'s side), unless both sides agree."""
    for rel in sorted(set(kept) | set(coming) | set(base)):
        mine, theirs = kept.get(rel), coming.get(rel)
        if theirs not in (base.get(rel), mine):
            yield rel, theirs, mine


def plan_pull(host: Mapping[str, str], remote: Mapping[str, str],
              base: Mapping[str, str]) -> Plan:
    """The container's changes come over where the host's copy is still the base's."""
    plan = Plan()
    for rel, r, h in _incoming(host, remote, base):
        if h == base.get(rel):
            (plan.copy if r is not None else plan.delete).append(rel)
        elif r is None:
            plan.conflicts[rel] = "deleted in the container, changed on the host"
        else:
            plan.conflicts[rel] = "changed on both sides" if h is not None else \
                "changed in the container, deleted on the host"
            plan.beside.append(rel)
    return plan


def plan_push(host: Mapping[str, str], remote: Mapping[str, str],
              base: Mapping[str, str]) -> Plan:
    """The mirror of plan_pull: the host's changes go where the container's copy is
    still the base's; a conflict is left for the next pull, which keeps both."""
    plan = Plan()
    for rel, h, r in _incoming(remote, host, base):
        if r == base.get(rel):
            (plan.copy if h is not None else plan.delete).append(rel)
        else:
            plan.conflicts[rel] = "changed on both sides"
    return plan


# -- the result --------------------------------------------------------------------------


@dataclass
class SyncResult:
    """What one sync did."""

    container: str
    direction: str
    workspace: str
    copied: int = 0
    deleted: int = 0
    bytes: int = 0
    conflicts: dict[str, str] = field(default_factory=dict)
    kept_beside: dict[str, str] = field(default_factory=dict)
    changing: list[str] = field(default_factory=list)
    """Files that changed while they were copied: left as they were, for the next sync."""
    seconds: float = 0.0

    def to_record(self) -> dict[str, Any]:
        return make_record(
            "sync", container=self.container, direction=self.direction,
            workspace=self.workspace, copied=self.copied, deleted=self.deleted,
            bytes=self.bytes, seconds=round(self.seconds, 3),
            conflicts=[{"path": rel, "why": why, "remote_copy": self.kept_beside.get(rel)}
                       for rel, why in self.conflicts.items()],
            changing=self.changing, message=self.line())

    def line(self) -> str:
        where = f"from {self.container} into {self.workspace}" if self.direction == "pull" \
            else f"from {self.workspace} into {self.container}"
        text = (f"{self.direction}ed {self.copied} files ({sizes.human(self.bytes)}) {where}"
                f", deleted {self.deleted}, {self.seconds:.2f} s")
        if self.conflicts:
            text += f"; {len(self.conflicts)} conflict(s), nothing overwritten"
        return text

    def warnings(self) -> list[str]:
        """One line per conflict (the first SHOWN_CONFLICTS) and per changing file."""
        lines = []
        for rel, why in list(self.conflicts.items())[:SHOWN_CONFLICTS]:
            beside = self.kept_beside.get(rel)
            kept = f"; the container's copy is {beside}" if beside else \
                "; the host's copy is kept"
            lines.append(f"conflict: {rel}: {why}{kept}")
        lines += [f"{rel} changed while it was copied; run the sync again"
                  for rel in self.changing[:SHOWN_CONFLICTS]]
        return lines


# -- execs in the container -------------------------------------------------------------


def _as_code(name: str, script: str) -> ExecSpec:
    return ExecSpec(name, ("sh", "-c", script), user=TOOL_UID, cwd="/",
                    env={"HOME": "/home/code", "LC_ALL": "C"}, tty=False)


def remote_files(client: Incus, name: str) -> dict[str, str]:
    """The container's workspace listing (path -> sha256), bounded, run as code."""
    def once() -> dict[str, str]:
        with tempfile.TemporaryFile() as errors:
            child = client.exec_stream(_as_code(name, LIST_SCRIPT), stdout=subprocess.PIPE,
                                       stderr=errors)
            expired = proc.Watchdog(child, SYNC_TIMEOUT)
            try:
                assert child.stdout is not None
                data = child.stdout.read(MANIFEST_MAX + 1)
                if len(data) > MANIFEST_MAX:
                    raise CoiError(f"the file listing of {name} is larger than "
                                   f"{sizes.human(MANIFEST_MAX)}; not synced")
                status = child.wait()
            finally:
                expired.cancel()
                saves._end(child)
            if status != 0:
                if saves._not_started(errors):
                    raise saves._NotStarted(f"incus could not list the workspace of {name}")
                raise CoiError(f"listing the workspace of {name} failed (exit {status}: "
                               f"{saves._reason(None, errors)}); nothing synced")
        return parse_listing(data)

    return saves._again(name, once)


def _run_with_input(client: Incus, spec: ExecSpec, names: Sequence[str], what: str) -> None:
    """`spec` fed the NUL-separated `names` (from a file: never a pipe both ways)."""
    with tempfile.TemporaryFile() as listing, tempfile.TemporaryFile() as errors:
        listing.write(b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names))

        def once() -> None:
            listing.seek(0)
            errors.seek(0)
            errors.truncate()
            child = client.exec_stream(spec, stdin=listing, stdout=subprocess.DEVNULL,
                                       stderr=errors)
            status = child.wait()
            if status != 0 and saves._not_started(errors):
                raise saves._NotStarted(f"incus could not start {what}")
            if status != 0:
                raise CoiError(f"{what} failed (exit {status}: {saves._reason(None, errors)})")

        saves._again(spec.instance, once)


# -- pull --------------------------------------------------------------------------------


class _Staging(saves.StateWriter):
    """The untrusted writer of saves, for the files a pull asked for: only those are
    written; modes as in a checkout (644, 755 when the owner may run it)."""

    dir_mode = 0o755

    def __init__(self, home: str, wanted: Sequence[str]) -> None:
        super().__init__(home, (), (), quotas=(saves.Quota("the sync limit", SYNC_MAX,
                                                           sizes.human(SYNC_MAX)),))
        self.wanted = frozenset(wanted)

    def file_mode(self, mode: int) -> int:
        return 0o755 if mode & 0o100 else 0o644

    def _allowed(self, rel: str, kind: str) -> bool:
        return kind == "dir" or rel in self.wanted


def _fetch(client: Incus, name: str, wanted: Sequence[str], staging: str) -> None:
    """The `wanted` files of the container's workspace into `staging`, one tar stream."""
    with tempfile.TemporaryFile() as listing:
        listing.write(b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in wanted))

        def once() -> None:
            listing.seek(0)
            shutil.rmtree(staging, ignore_errors=True)
            saves.stream_out(client, _as_code(name, FETCH_SCRIPT), _Staging(staging, wanted),
                             stdin=listing, timeout=SYNC_TIMEOUT,
                             broke=f"the workspace stream from {name} broke off; nothing "
                                   "applied",
                             slow=f"the workspace copy from {name} took longer than "
                                  f"{SYNC_TIMEOUT:g} s; nothing applied",
                             after="; nothing applied")

        saves._again(name, once)


def pull(client: Incus, name: str, base: Base, rules: Rules) -> SyncResult:
    """Bring the container's changes since `base` into the host workspace; move the
    base. Conflicts are kept both ways and reported, never overwritten."""
    started = time.monotonic()
    remote = {rel: sha for rel, sha in remote_files(client, name).items() if rules.pulled(rel)}
    host = host_files(base.workspace, rules, base.files)
    plan = plan_pull({rel: e[0] for rel, e in host.items() if rules.pulled(rel)}, remote,
                     {rel: e[0] for rel, e in base.files.items() if rules.pulled(rel)})
    into = _Into(base.workspace, os.path.join(base.workspace,
                                              f"{STAGING_PREFIX}{secrets.token_hex(4)}"),
                 SyncResult(name, "pull", base.workspace), dict(base.files))
    try:
        if plan.copy or plan.beside:
            _fetch(client, name, [*plan.copy, *plan.beside], into.staging)
        for rel in plan.copy:
            into.take(rel, remote[rel], host.get(rel))
        for rel in plan.beside:
            into.beside(rel, remote[rel], f"{rel}{CONFLICT_MARK}{name}")
        for rel in plan.delete:
            into.delete(rel, host[rel][0])
    finally:
        shutil.rmtree(into.staging, ignore_errors=True)
    result, files = into.result, into.files
    for rel, why in plan.conflicts.items():
        result.conflicts.setdefault(rel, why)
        if rel not in remote:
            files.pop(rel, None)  # gone there: the next push sends the host's copy back
    for rel, sha in remote.items():  # alike on both sides: the base catches up
        if rel in host and host[rel][0] == sha:
            files[rel] = host[rel]
    base.files = {rel: e for rel, e in files.items() if rel in remote or rel in host}
    base.save()
    result.seconds = time.monotonic() - started
    return result


@dataclass
class _Into:
    """Staged files of a pull put into the host workspace, the new base's entries and
    the result kept as they are."""

    workspace: str
    staging: str
    result: SyncResult
    files: dict[str, Entry]

    def take(self, rel: str, sha: str, expected: Entry | None) -> None:
        if self._place(rel, rel, sha, expected):
            self.result.copied += 1
            self.files[rel] = _host_entry(os.path.join(self.workspace, rel), None) or \
                (sha, -1, -1)

    def beside(self, rel: str, sha: str, copy: str) -> None:
        if self._place(rel, copy, sha, None):
            self.result.kept_beside[rel] = copy
            self.files[rel] = (sha, -1, -1)  # reported once; the host's copy wins next

    def delete(self, rel: str, expected: str) -> None:
        target = _host_target(self.workspace, rel)
        with contextlib.suppress(FileNotFoundError):
            if target is not None and stat.S_ISREG(os.lstat(target).st_mode) and \
                    file_sha(target) == expected:
                os.unlink(target)
                self.result.deleted += 1
                self.files.pop(rel, None)

    def _place(self, rel: str, target_rel: str, sha: str, expected: Entry | None) -> bool:
        """Move the staged `rel` to `target_rel` in the workspace, once its hash is the
        one listed and the host's file is still `expected` (None: absent, or coi's own
        conflict copy). False, with the reason recorded, otherwise."""
        staged = os.path.join(self.staging, rel)
        try:
            if file_sha(staged) != sha:
                self.result.changing.append(rel)
                return False
            size = os.lstat(staged).st_size
        except OSError:
            self.result.conflicts[rel] = "the container did not send it"
            return False
        target = _host_target(self.workspace, target_rel)
        problem = "a folder above it on the host is not a plain directory" if target is None \
            else _host_state_problem(target, expected, own_copy=target_rel != rel)
        if not problem:
            _own_as_workspace(staged, self.workspace)
            try:
                os.replace(staged, target)
            except OSError as exc:
                problem = f"cannot be put in place on the host: {exc.strerror}"
        if problem:
            self.result.conflicts[rel] = problem
            return False
        self.result.bytes += size
        return True


def _host_target(workspace: str, rel: str) -> str | None:
    """The host path of `rel`, its missing folders made; None when one of them is a
    link or not a directory (never followed out of the workspace)."""
    path = workspace
    for part in rel.split("/")[:-1]:
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o755)
            _own_as_workspace(path, workspace)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
    return os.path.join(workspace, rel)


def _host_state_problem(target: str, expected: Entry | None, *, own_copy: bool) -> str:
    """Why the host's file at `target` may not be replaced now ("" when it may)."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return "" if expected is None or own_copy else "deleted on the host meanwhile"
    if not stat.S_ISREG(info.st_mode):
        return "on the host it is not a regular file"
    if own_copy:
        return ""
    if expected is None:
        return "made on the host meanwhile"
    return "" if file_sha(target) == expected[0] else "changed on the host meanwhile"


def _own_as_workspace(path: str, workspace: str) -> None:
    """Root running coi writes what the workspace's owner would (never root's files)."""
    if os.geteuid() == 0:
        owner = os.stat(workspace)
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


# -- push --------------------------------------------------------------------------------


def push(client: Incus, name: str, base: Base, rules: Rules) -> SyncResult:
    """Send the host's changes since `base` into the container (all of the workspace
    the first time); move the base. A conflict is left for the next pull."""
    started = time.monotonic()
    result = SyncResult(name, "push", base.workspace)
    _checked(client.exec_capture(ExecSpec(name, MAKE_WORKSPACE), timeout=60),
             f"making {WORKSPACE_PATH} in {name}")
    remote = remote_files(client, name)
    host = host_files(base.workspace, rules, base.files)
    known = {rel: entry[0] for rel, entry in base.files.items()}
    plan = plan_push({rel: e[0] for rel, e in host.items()}, remote, known)
    files = dict(base.files)
    if plan.copy:
        sent = _send(client, name, base.workspace, plan.copy)
        for rel, entry in sent.items():
            files[rel] = entry
            result.bytes += entry[1]
        result.copied = len(sent)
        result.changing = [rel for rel in plan.copy if rel not in sent]
    if plan.delete:
        _run_with_input(client, _as_code(name, DELETE_SCRIPT), plan.delete,
                        f"deleting files in {name}")
        result.deleted = len(plan.delete)
        for rel in plan.delete:
            files.pop(rel, None)
    result.conflicts = dict(plan.conflicts)
    for rel, sha in remote.items():
        if rel in host and host[rel][0] == sha:
            files[rel] = host[rel]
    base.files = {rel: e for rel, e in files.items()
                  if rel in host or (rel in remote and rel not in plan.delete)}
    base.save()
    result.seconds = time.monotonic() - started
    return result


def _checked(done: proc.Result, what: str) -> None:
    if not done.ok:
        raise CoiError(f"{what} failed: {proc.last_line(done.stderr) or done.returncode}")


def _send(client: Incus, name: str, workspace: str, rels: Sequence[str]) -> dict[str, Entry]:
    """One tar stream of the host files `rels` into `tar -x` as code in /workspace.
    Returns what was sent, as it was read (a file that changed meanwhile is left out)."""
    def once() -> dict[str, Entry]:
        sent: dict[str, Entry] = {}
        with tempfile.TemporaryFile() as errors:
            child = client.exec_stream(_as_code(name, RECEIVE_SCRIPT), stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=errors)
            expired = proc.Watchdog(child, SYNC_TIMEOUT)
            try:
                assert child.stdin is not None
                try:
                    with tarfile.open(fileobj=child.stdin, mode="w|",
                                      format=tarfile.PAX_FORMAT) as archive:
                        for rel in rels:
                            entry = _add_host_file(archive, workspace, rel)
                            if entry is not None:
                                sent[rel] = entry
                    child.stdin.close()
                except (BrokenPipeError, OSError) as exc:
                    raise saves._broken_stream(child, name, errors, exc,
                                               f"could not send the workspace to {name}",
                                               grace=10) from None
                status = child.wait()
            finally:
                expired.cancel()
                saves._end(child)
            if status != 0:
                if saves._not_started(errors):
                    raise saves._NotStarted(f"incus could not start tar in {name}")
                raise CoiError(f"tar in {name} exited {status}: {saves._reason(None, errors)}")
        return sent

    return saves._again(name, once)


def _add_host_file(archive: tarfile.TarFile, workspace: str, rel: str) -> Entry | None:
    """Add one host file (never through a link); its entry as sent, or None when it is
    gone or no longer a regular file."""
    try:
        fd = os.open(os.path.join(workspace, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return None
        raise
    with open(fd, "rb") as source:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        digest = _HashingReader(source)
        archive.addfile(saves._tar_info(rel, tarfile.REGTYPE,
                                        0o755 if info.st_mode & 0o100 else 0o644,
                                        info.st_size, info.st_mtime), digest)
        return digest.hexdigest(), info.st_size, info.st_mtime_ns


class _HashingReader:
    """A file as tarfile reads it, hashed on the way (one read of each file)."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._digest.update(data)
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


# -- the verbs ---------------------------------------------------------------------------


def sync(client: Incus, name: str, settings: Any, direction: str, *,
         workspace: str | None = None, mask: bool = True,
         instance: Mapping[str, Any] | None = None) -> SyncResult:
    """`direction` (pull or push) for container `name` on the client's remote, under
    its sync lock. `workspace` (a slot record's, at a session's start) makes the
    first base; without one, the base must exist: it names the workspace, whose
    config gives the protected and masked paths. `settings`: where the bases are;
    `instance`: the container as the caller just read it (else it is read here)."""
    if client.remote is None:
        raise BadInput(f"{name} is a container of this machine: its workspace is mounted, "
                       "there is nothing to sync")
    path = base_path(settings.path("paths.state_dir"), client.remote.name, name)
    created = str((instance or client.instance_config(name)).get("created_at") or "")
    with locked(path):
        base = load_base(path)
        if base is not None and base.created != created:
            base = None  # an earlier container's of the same name
        if base is None:
            if workspace is None:
                raise NotFound(f"no sync point for {name} on this host",
                               hint="only the host that started a session syncs it")
            base = Base(path, name, client.remote.name, workspace, created, mask)
        rules = rules_of(config.load(base.workspace if os.path.isdir(base.workspace)
                                     else None, lenient=True), base.mask)
        return (pull if direction == "pull" else push)(client, name, base, rules)


def synced_here(settings: Any, client: Incus, workspace: str) -> list[str]:
    """The containers on the client's remote whose sync point names `workspace`."""
    if client.remote is None:
        return []
    folder = os.path.join(settings.path("paths.state_dir"), "remote", client.remote.name)
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry.removesuffix(".json")
        if entry.endswith(".json") and saves._passes(naming.validate_container_name, name):
            base = load_base(os.path.join(folder, entry))
            if base is not None and base.workspace == workspace:
                found.append(name)
    return found

