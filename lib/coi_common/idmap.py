"""Whether Incus (running as root) may map a host uid/gid into containers.

A session of a user whose uid is not 1000 maps that uid to the container's
`code` with `raw.idmap`; newuidmap then requires `root:UID:1` (or a range
holding UID) in /etc/subuid, and the same for the gid in /etc/subgid.
Without it the container fails to start with an opaque "Invalid PID"
(HOST-FACTS). Both files are world-readable, so every user can check
before anything is created. `coi setup` and coi's host service add the
lines (coi_host); no daemon restart is needed after adding them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

SUBUID: Final = "/etc/subuid"
SUBGID: Final = "/etc/subgid"
MAX_FILE_BYTES: Final = 1 << 20
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


def add_lines(missing: dict[str, list[str]]) -> list[str]:
    """Append the lines (root only); return 'PATH LINE' for each line added."""
    added = []
    for path, lines in missing.items():
        file = Path(path)
        current = file.read_bytes() if file.exists() else b""
        prefix = b"" if not current or current.endswith(b"\n") else b"\n"
        with open(path, "ab") as handle:
            handle.write(prefix + "".join(f"{line}\n" for line in lines).encode())
            handle.flush()
        added += [f"{path} {line}" for line in lines]
    return added
