"""Whose session container is it: each user acts on their own by default.

A session container records the host uid of the user who started it in
`user.coi.host_uid` (container.container_config). Members of `incus-admin`
are root-equivalent, so this is no security boundary: it keeps one user
from killing or typing into another user's session by mistake. Root
(uid 0, not through sudo) sees everyone's; `--all-users` does the same for
anyone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from coi_common.errors import PermissionDenied

OWNER_KEY: Final = "user.coi.host_uid"
ROOT_UID: Final = 0
ALL_USERS_FLAG: Final = "--all-users"

Instance = Mapping[str, Any]


def caller_uid() -> int:
    """The user coi acts for: the caller, or the one behind sudo when root runs through it."""
    from coi_common.sessions import invoking_ids  # noqa: PLC0415 - keeps this module light

    return invoking_ids()[0]


def owner_uid(instance: Instance) -> int | None:
    """The owner recorded on the container; None when missing or not plain digits."""
    value = (instance.get("config") or {}).get(OWNER_KEY)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def sees_everyone(uid: int, *, all_users: bool) -> bool:
    return all_users or uid == ROOT_UID


def visible(instances: Iterable[Instance], *, uid: int, all_users: bool) -> list[Instance]:
    """The instances `uid` acts on: its own, or every one for root or with all_users."""
    if sees_everyone(uid, all_users=all_users):
        return list(instances)
    return [i for i in instances if owner_uid(i) == uid]


def refuse_others(instances: Iterable[Instance], *, uid: int, all_users: bool) -> None:
    """Raise PermissionDenied (exit 5) naming the first instance `uid` may not act on
    without --all-users, with its owner's uid."""
    if sees_everyone(uid, all_users=all_users):
        return
    for instance in instances:
        owner = owner_uid(instance)
        if owner != uid:
            whose = "has no recorded owner" if owner is None else f"belongs to uid {owner}"
            raise PermissionDenied(f"{instance['name']} {whose}; you are uid {uid}",
                                   hint=f"add {ALL_USERS_FLAG} to act on it anyway")
