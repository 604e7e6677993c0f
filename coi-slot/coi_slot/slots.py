"""Which slot of a workspace is free: allocation under a lock, with short reservations.

A slot N of workspace W is taken when the container `<prefix><hash(W)>-N`
exists, or when a caller reserved it less than RESERVATION_SECONDS ago and
has not created the container yet. Allocation holds an exclusive lock on
the workspace's slot file for the read-pick-write, so concurrent callers
never get the same slot. The state lives in `<state_dir>/slots/`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def described(settings: Any, workspace: str, *, mounts: Sequence[sessions.Mount] = (),
              storage: str = "") -> sessions.SlotRecord:
    """The session the settings describe for the workspace, its slot not chosen yet
    (0). `settings` is the effective config with command-line flags already applied
    (defaults.persistent, defaults.image, defaults.environment, tool.name, ...)."""
    path = naming.canonical_workspace(workspace)
    # Checked before reserving: a bad image name must not hold a slot for two minutes.
    image = naming.validate_image_name(settings.get("defaults.image"))
    return sessions.SlotRecord(path, 0, "", bool(settings.get("defaults.persistent")), image,
                               settings.get("incus.profile"), settings.get("tool.name"),
                               settings.get("network.mode"),
                               dict(settings.get("defaults.environment")), tuple(mounts),
                               storage)


def workspace_instances(client: incus.Incus, workspace: str) -> list[dict[str, Any]]:
    """The containers of the workspace's slots, in one request."""
    return client.instances(f"{naming.container_prefix()}{naming.workspace_hash(workspace)}-")


def with_slot(settings: Any, record: sessions.SlotRecord,
              instances: Sequence[Mapping[str, Any]], *, wanted: int | None = None
              ) -> sessions.SlotRecord:
    """`record` (described) in a slot reserved for it: `wanted`, or the slot of a
    stopped persistent container it comes back to, or the lowest free one."""
    prefix = naming.container_prefix()
    if wanted is None and record.persistent:
        wanted = reusable_slot(instances, record.workspace, sessions.invoking_ids()[0])
    number = reserve(settings.path("paths.state_dir"), record.workspace, prefix=prefix,
                     existing=[i["name"] for i in instances],
                     max_slots=settings.get("defaults.max_slots"), wanted=wanted)
    return dataclasses.replace(record, slot=number,
                               container=naming.container_name(record.workspace, number, prefix))


def claim(state_dir: str, workspace: str, take: Callable[[], bool]) -> bool:
    """take() under the workspace's slot lock: a pooled container is claimed once, and
    never while a slot is being chosen."""
    with _locked(slot_file(state_dir, workspace)):
        return take()


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
