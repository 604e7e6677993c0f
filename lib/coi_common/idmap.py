"""Whether Incus (running as root) may map a host uid/gid into containers.

A session of a user whose uid is not 1000 maps that uid to the container's
`code` with `raw.idmap`; newuidmap then requires `root:UID:1` (or a range
holding UID) in /etc/subuid, and the same for the gid in /etc/subgid.
Without it the container fails to start with an opaque "Invalid PID"
(HOST-FACTS). Both files are world-readable, so every user can check
before anything is created. `coi setup` and coi's host service add the
lines (coi_host); no daemon restart is needed after adding them. Every line
added is also written to ADDED_RECORD, so `coi setup --uninstall` removes the
lines coi added and never one that was there before.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Final

SUBUID: Final = "/etc/subuid"
SUBGID: Final = "/etc/subgid"
MAX_FILE_BYTES: Final = 1 << 20
ADDED_RECORD: Final = "/var/lib/coi/added-subids"
"""`PATH LINE` for each line coi appended to /etc/subuid or /etc/subgid."""
_ADDED: Final = re.compile(r"root:[0-9]{1,10}:1")
"""A subid file larger than this is not read (it is root's file, but bounded anyway)."""


def root_ranges(path: str) -> list[tuple[int, int]]:
    """(start, count) of every `root:START:COUNT` line (also `0:`); bad lines skipped."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_FILE_BYTES).decode("utf-8", "replace")
    except OSError:
        return []
    ranges = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].strip().split(":")
        if len(parts) == 3 and parts[0] in ("root", "0") and \
                parts[1].isdigit() and parts[2].isdigit():
            ranges.append((int(parts[1]), int(parts[2])))
    return ranges


def covered(ident: int, ranges: Iterable[tuple[int, int]]) -> bool:
    return any(start <= ident < start + count for start, count in ranges)


def delegated(uid: int, gid: int, *, subuid: str = SUBUID, subgid: str = SUBGID) -> bool:
    """True when root may map host `uid` and `gid` (raw.idmap will start)."""
    return covered(uid, root_ranges(subuid)) and covered(gid, root_ranges(subgid))


def missing_lines(uids: Iterable[int], gids: Iterable[int], *, subuid: str = SUBUID,
                  subgid: str = SUBGID) -> dict[str, list[str]]:
    """path -> the `root:ID:1` lines that would delegate the ids not covered yet."""
    result: dict[str, list[str]] = {}
    for path, ids in ((subuid, uids), (subgid, gids)):
        ranges = root_ranges(path)
        lines = [f"root:{i}:1" for i in sorted(set(ids)) if not covered(i, ranges)]
        if lines:
            result[path] = lines
    return result


def add_lines(missing: dict[str, list[str]], *, record: str = ADDED_RECORD) -> list[str]:
    """Append the lines (root only), and note each in `record`; return 'PATH LINE' for
    each line added."""
    added = []
    for path, lines in missing.items():
        file = Path(path)
        current = file.read_bytes() if file.exists() else b""
        prefix = b"" if not current or current.endswith(b"\n") else b"\n"
        _note(record, [f"{path} {line}" for line in lines])
        with open(path, "ab") as handle:
            handle.write(prefix + "".join(f"{line}\n" for line in lines).encode())
            handle.flush()
        added += [f"{path} {line}" for line in lines]
    return added


def _note(record: str, entries: list[str]) -> None:
    """Noted before the file changes: a line coi added is never taken for the admin's."""
    os.makedirs(os.path.dirname(record), mode=0o755, exist_ok=True)
    with open(record, "a", encoding="utf-8") as handle:
        handle.write("".join(f"{entry}\n" for entry in entries))
        handle.flush()
        os.fsync(handle.fileno())


def remove_added(*, record: str = ADDED_RECORD, files: Iterable[str] = (SUBUID, SUBGID)
                 ) -> list[str]:
    """Remove from `files` the lines `record` says coi added (one occurrence each, the
    rest of each file untouched), then the record; return 'PATH LINE' of each removed."""
    try:
        noted = Path(record).read_bytes()[:MAX_FILE_BYTES].decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    wanted: dict[str, list[str]] = {path: [] for path in files}
    for entry in noted.splitlines():
        path, _, line = entry.partition(" ")
        if path in wanted and _ADDED.fullmatch(line):
            wanted[path].append(line)
    removed = []
    for path, lines in wanted.items():
        removed += [f"{path} {line}" for line in _drop_lines(path, lines)]
    os.unlink(record)
    return removed


def _drop_lines(path: str, lines: list[str]) -> list[str]:
    """Rewrite `path` without one occurrence of each of `lines` (atomically, its mode
    kept); return the lines found and removed."""
    try:
        current = Path(path).read_bytes()[:MAX_FILE_BYTES].decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    kept, dropped, todo = [], [], list(lines)
    for line in current.splitlines():
        if line in todo:
            todo.remove(line)
            dropped.append(line)
        else:
            kept.append(line)
    if dropped:
        temp = f"{path}.coi-{os.getpid()}"
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{line}\n" for line in kept))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, os.stat(path).st_mode & 0o7777)
        os.replace(temp, path)
    return dropped
