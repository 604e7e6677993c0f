"""Which slot of a workspace is free: allocation under a lock, with short reservations.

A slot N of workspace W is taken when the container `<prefix><hash(W)>-N`
exists, or when a caller reserved it less than RESERVATION_SECONDS ago and
has not created the container yet. Allocation holds an exclusive lock on
the workspace's slot file for the read-pick-write, so concurrent callers
never get the same slot. The state lives in `<state_dir>/slots/`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from coi_common import incus, locks, naming, plan, protocol, sessions
from coi_common.errors import CoiError
from coi_common.naming import container_name, workspace_hash

RESERVATION_SECONDS: Final = 120.0
LOCK_SECONDS: Final = 30.0
"""The longest wait for another coi command choosing a slot of the same workspace."""


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with locks.private(str(path.parent), path.with_suffix(".lock").name,
                       timeout=LOCK_SECONDS, what="the slots of this workspace", mode=0o755):
        yield


def _read(path: Path) -> dict[str, float]:
    """The reservations (slot -> expiry); a damaged file or entry counts as none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def slot_file(state_dir: str, workspace: str) -> Path:
    return Path(state_dir) / "slots" / f"{workspace_hash(workspace)}.json"


def lowest_free(taken: Iterable[int], max_slots: int) -> int | None:
    """The lowest slot in 1..max_slots not in `taken`."""
    used = set(taken)
    return next((n for n in range(1, max_slots + 1) if n not in used), None)


def reserve(state_dir: str, workspace: str, *, prefix: str, existing: Iterable[str],
            max_slots: int, wanted: int | None = None) -> int:
    """Pick (or confirm `wanted`) a slot and reserve it; `existing` = container names now.

    A wanted slot is granted when it is free, and also when its container
    exists (the caller attaches to or reuses it). A live reservation of it
    without a container means another caller is creating that container right
    now: that refuses it.
    """
    path = slot_file(state_dir, workspace)
    with _locked(path):
        now = time.time()
        reservations = {k: v for k, v in _read(path).items() if v > now}
        names = set(existing)
        in_use = {n for n in range(1, max_slots + 1)
                  if container_name(workspace, n, prefix) in names or str(n) in reservations}
        if wanted is None:
            slot = lowest_free(in_use, max_slots)
            if slot is None:
                raise CoiError(f"all {max_slots} slots of {workspace} are in use",
                               hint="coi list shows them; coi kill or raise defaults.max_slots")
        elif str(wanted) in reservations and \
                container_name(workspace, wanted, prefix) not in names:
            raise CoiError(f"slot {wanted} of {workspace} is being set up by another coi "
                           "command right now",
                           hint=f"it was reserved less than {RESERVATION_SECONDS:g} s ago; "
                                "pick another slot, or leave out --slot to get a free one")
        else:
            slot = wanted
        reservations[str(slot)] = now + RESERVATION_SECONDS
        if not plan.step("reserve", (f"slot {slot} of", workspace), file=str(path)):
            protocol.write_json_atomic(str(path), reservations)
        return slot


def release(state_dir: str, workspace: str, slot: int) -> None:
    """Drop a reservation (its container ended, or the attempt failed); nothing to do,
    and nothing made, when the workspace has no reservations."""
    path = slot_file(state_dir, workspace)
    if not path.exists():
        return
    with _locked(path):
        reservations = _read(path)
        if reservations.pop(str(slot), None) is not None and \
                not plan.step("release", (f"slot {slot} of", workspace), file=str(path)):
            protocol.write_json_atomic(str(path), reservations)


def new_slot_record(client: incus.Incus, settings: Any, workspace: str, *,
                    slot: int | None = None, mounts: Sequence[sessions.Mount] = (),
                    storage: str = "") -> sessions.SlotRecord:
    """Allocate (or take `slot`) for the workspace and describe its container.

    `settings` is the effective config with command-line flags already applied
    (defaults.persistent, defaults.image, defaults.environment, tool.name, ...).
    """
    prefix = naming.container_prefix()
    path = naming.canonical_workspace(workspace)
    max_slots = settings.get("defaults.max_slots")
    wanted = naming.validate_slot(slot, max_slots) if slot else None
    # Checked before reserving: a bad image name must not hold a slot for two minutes.
    image = naming.validate_image_name(settings.get("defaults.image"))
    instances = client.instances(f"{prefix}{naming.workspace_hash(path)}-")
    existing = [i["name"] for i in instances]
    if wanted is None and settings.get("defaults.persistent"):
        wanted = reusable_slot(instances, path, sessions.invoking_ids()[0])
    number = reserve(settings.path("paths.state_dir"), path, prefix=prefix,
                           existing=existing, max_slots=max_slots, wanted=wanted)
    return sessions.SlotRecord(path, number, naming.container_name(path, number, prefix),
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
        keys = sessions.SessionContainer.from_instance(instance)
        if (keys is not None and keys.persistent and instance.get("status") == "Stopped"
                and keys.workspace == workspace and keys.host_uid == uid):
            found.append(keys.slot)
    return min(found, default=None)
