"""The placeholders of a session's workspace view, made in the user's own project
before the view is built (coi_common.views): every protected path that is missing
is made, empty, so that the agent cannot create it later where the view would not
cover it. Made as the user (or, as root, chowned to the user); never through a link.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

from coi_common import plan, views
from coi_common.errors import BadInput

PLACEHOLDER_TEXT: Final = {".json": b"{}\n", "commondir": b".\n"}
"""What a placeholder file holds, by extension or name: `{}` is valid JSON, and a
commondir of "." names the repository itself (git behaves as without one, measured)."""


def placeholders(workspace: str, protect: Sequence[str], owner: tuple[int, int] | None
                 ) -> list[str]:
    """What to protect in this project (views.protected_targets), after making the missing
    ones, so the agent cannot create them later: an empty directory, or for a
    missing file an empty one (`{}` for JSON). Where the directory holding a
    missing file is missing too, that directory is the placeholder (and is what is
    protected), as empty directories stay out of `git status`. Nothing is made
    inside a missing .git except .git itself, and no file at the top (.coi.toml,
    .mcp.json would show in `git status`; their readers gate them: coi trust,
    Claude Code's approval). `owner` (uid, gid) gets what root makes for a user.
    The result goes to build() as is: decided once, before anything was made."""
    with views.opened(workspace, os.O_PATH | os.O_DIRECTORY) as root:
        targets = views.protected_targets(root, protect)
        for target in targets:
            try:
                _make(root, target, owner)
            except OSError as exc:
                raise BadInput(f"cannot make the placeholder {target!r} in {workspace}: "
                               f"{exc.strerror}", hint="make it yourself, or set "
                               "security.protect = false in your own config") from None
    return targets


def _make(root: int, target: str, owner: tuple[int, int] | None) -> None:
    rel = target.rstrip("/")
    if views.path_kind(root, rel) is not None or ("/" not in rel and not target.endswith("/")):
        return  # there, or a top-level file (.coi.toml): its reader gates it (coi trust)
    if plan.step("placeholder", target):
        return
    parent, _, name = rel.rpartition("/")
    with views.walk(root, parent.split("/") if parent else []) as folder:
        try:
            _create(folder, name, directory=target.endswith("/"))
        except FileExistsError:
            return  # a concurrent coi of the same project made it first (build() checks it)
        if owner is not None:
            os.chown(name, *owner, dir_fd=folder, follow_symlinks=False)


def _create(folder: int, name: str, *, directory: bool) -> None:
    if directory:
        os.mkdir(name, 0o755, dir_fd=folder)
        return
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                 dir_fd=folder)
    with os.fdopen(fd, "wb") as handle:
        handle.write(PLACEHOLDER_TEXT.get(name) or
                     PLACEHOLDER_TEXT.get(os.path.splitext(name)[1], b""))
