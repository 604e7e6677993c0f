"""The warm pool (docs/pool.md): containers of a workspace made, started, booted and
under their network rules before a session asks, so `coi run` and `coi shell` claim
one and skip all of that.

A pooled container is the container the next ephemeral session of the workspace
would have made, made early: same name scheme, devices, id map and rules, plus the
key user.coi.pool = SHAPE.COVERAGE. SHAPE fingerprints every setting baked into a
container at its creation (pool_shape); COVERAGE is what its workspace view covered,
taken before the view was built (views.coverage). A session claims one only when
both are what a container made now would have, and the image alias still points at
the image it was made from; the claim removes the key, under the workspace's slot
lock, so it is claimed once. A container is never shared between workspaces or
users, and never serves a second session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from coi_common import __version__, incus, sessions, tools, views
from coi_common.errors import CoiError, NotFound
from coi_slot import slots

POOL_KEY: Final = f"{sessions.KEY}pool"
SHAPED_FIELDS: Final = ("image", "profile", "tool", "network", "environment", "mounts",
                        "storage", "limits", "mask", "allow_home", "force", "config_profile")
"""The slot record's fields baked into a container at its creation. Not the slot and
name (the pooled container has its own), nor resume (restored at the claim), nor
persistent (only ephemeral sessions claim)."""
SHAPED_KEYS: Final = ("security.protect", "security.protected_paths", "security.mask",
                      "security.allow_setuid")
"""The config values that shape the container and its view beyond the record."""


def pool_shape(record: sessions.SlotRecord, settings: Any) -> str:
    """The session shape of a record: 16 hex digits of the SHA-256 of what a container
    made for it would be made from (SHAPED_FIELDS, SHAPED_KEYS, the tool's own
    environment and coi's version, whose next release may make containers otherwise)."""
    fields = {key: value for key, value in record.to_record().items()
              if key in SHAPED_FIELDS}
    fields["config"] = {key: settings.get(key) for key in SHAPED_KEYS}
    fields["tool_env"] = dict(tools.get_tool(record.tool,
                                             tools.registry_from_config(settings)).env)
    fields["coi"] = __version__
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def idle_of(instances: Sequence[Mapping[str, Any]], workspace: str | None, uid: int, *,
            slot: int | None = None
            ) -> list[tuple[Mapping[str, Any], sessions.SessionContainer]]:
    """The pooled containers of user `uid` not claimed yet, of `workspace` (None: of
    every workspace; in `slot` only, when given), by workspace and slot."""
    found = []
    for instance in instances:
        keys = sessions.SessionContainer.from_instance(instance)
        if keys is not None and keys.idle_in_pool and workspace in (None, keys.workspace) \
                and keys.host_uid == uid and slot in (None, keys.slot):
            found.append((instance, keys))
    return sorted(found, key=lambda pair: (pair[1].workspace, pair[1].slot))


def fresh_key(record: sessions.SlotRecord, settings: Any, shape: str = "") -> str:
    """The user.coi.pool value a container made now for `record` would carry (`shape`:
    its pool_shape, when known already)."""
    protect, patterns = views.rules(settings, record.mask)
    coverage = views.coverage(record.workspace, protect, patterns)
    return f"{shape or pool_shape(record, settings)}.{coverage}"


def claimable(instance: Mapping[str, Any], key: str, image: str) -> bool:
    """Running, of the shape and coverage asked (`key`), made from the image the
    alias names now (`image`: its fingerprint)."""
    config = instance.get("config") or {}
    return instance.get("status") == "Running" and config.get(POOL_KEY) == key \
        and config.get("volatile.base_image") == image


def image_fingerprint(client: incus.Incus, alias: str) -> str:
    """The fingerprint the image alias points at; "" when there is no such alias."""
    found = client.get_optional(f"/1.0/images/aliases/{alias}")
    return str((found or {}).get("target") or "")


def claim(client: incus.Incus, settings: Any, record: sessions.SlotRecord,
          instances: Sequence[Mapping[str, Any]], uid: int, *, wanted: int | None = None
          ) -> sessions.SlotRecord | None:
    """`record` (an ephemeral session's, before its slot is chosen) in an idle pooled
    container of its workspace that can serve it, claimed; None when none can (or
    the one in slot `wanted` cannot: the caller then goes on as without a pool)."""
    if record.persistent or record.pool:
        return None
    shape = pool_shape(record, settings)
    idle = [(i, k) for i, k in idle_of(instances, record.workspace, uid, slot=wanted)
            if k.pool.startswith(f"{shape}.")]
    if not idle:  # the workspace walk and the alias only when one is of this shape
        return None
    key, image = fresh_key(record, settings, shape), image_fingerprint(client, record.image)
    state_dir = settings.path("paths.state_dir")
    for instance, keys in idle:
        if claimable(instance, key, image) and slots.claim(
                state_dir, record.workspace, lambda name=instance["name"]: _take(
                    client, name, key, image)):
            return dataclasses.replace(record, slot=keys.slot, container=instance["name"],
                                       pooled=True)
    return None


def _take(client: incus.Incus, name: str, key: str, image: str) -> bool:
    """Under the slot lock: still idle and claimable? Then no longer idle (the key
    emptied: PATCH cannot remove a key, and an empty one reads as none)."""
    try:
        if not claimable(client.instance_config(name), key, image):
            return False
        client.set_config(name, {POOL_KEY: ""})
    except NotFound:
        return False
    except CoiError:
        return False  # Incus refused: the session makes a container of its own
    return True
