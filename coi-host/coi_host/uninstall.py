"""`coi setup --uninstall`: remove what `coi setup` made, and nothing else.

First every object is found and listed; after one confirmation (or --force)
each kind is removed in the order that frees the next: coi's containers (their
rules and views with them), coi's images, the profile, the bridge, the pool,
the host service, coi's nftables tables, the id-map lines coi added, and saved
sessions only with --sessions. An Incus object something else still uses is
left, and the line says who uses it. Incus itself stays: other tools may use
it. A second run finds nothing and changes nothing. docs/uninstall.md.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from coi_common import config, idmap, incus, naming, plan, plumbing, proc
from coi_common.errors import IncusError, PermissionDenied, UsageError
from coi_common.incus import Incus
from coi_common.progress import Progress
from coi_common.protocol import make_record, write_record
from coi_host import hostinfo, install, views
from coi_host.setup import Step

RUN_DIR: Final = Path("/run/coi")
STATE_DIR: Final = Path("/var/lib/coi")
KINDS: Final = {"profiles": "profile", "networks": "bridge", "storage-pools": "storage pool"}
KEEP_INCUS: Final = ("Incus itself stays (other tools may use it); to remove it too: "
                     "apt-get purge incus")


@dataclass(frozen=True)
class Found:
    """What coi's setup and sessions left on this machine, before anything is removed."""

    containers: list[str]
    images: list[tuple[str, str]]  # (fingerprint, shown name)
    profile: str
    network: str
    pool: str
    sessions: list[str]

    def lines(self) -> Iterator[str]:
        if self.containers:
            yield f"containers: {', '.join(self.containers)}"
        if self.images:
            yield f"images: {', '.join(name for _, name in self.images)}"
        for kind, name in (("profile", self.profile), ("bridge", self.network),
                           ("storage pool", self.pool)):
            if name:
                yield f"{kind}: {name}"
        yield "nftables tables: coi (bridge, inet); coi's host service and its files"
        yield "id-map lines coi added to /etc/subuid and /etc/subgid"
        if self.sessions:
            yield f"saved sessions: {len(self.sessions)} store(s): {', '.join(self.sessions)}"


def run_uninstall(*, sessions: bool, keep_images: bool, force: bool, dry_run: bool,
                  as_json: bool) -> int:
    """Find, list, confirm, remove; print each step's outcome."""
    if os.geteuid() != 0:
        raise PermissionDenied("coi setup --uninstall changes the host and needs root",
                               hint="run: sudo coi setup --uninstall")
    settings = config.load(None)
    client = incus.connect(settings)
    found = find(client, settings, sessions=sessions, keep_images=keep_images)
    if not as_json:
        print("coi setup --uninstall " + ("would remove" if dry_run else "removes") + ":")
        print("\n".join(f"  {line}" for line in found.lines()))
        print(f"  ({KEEP_INCUS}" + ("" if sessions else "; saved sessions stay: --sessions "
                                    "removes them") + ")", flush=True)
    if not (force or dry_run):
        confirm()
    # In a dry run every removal below is a step of the plan (coi_common.plan), not done.
    steps = remove_all(client, found)
    changed = any(step.changed for step in steps) and not dry_run
    if as_json:
        write_record(make_record("uninstall", changed=changed, dry_run=dry_run,
                                 found=asdict(found), steps=[asdict(s) for s in steps]))
    elif not dry_run:
        print("coi setup --uninstall: done" + ("" if changed else ", nothing to remove"))
    return 0


def confirm() -> None:
    """One question on a terminal; elsewhere --force is the answer."""
    if not sys.stdin.isatty():
        raise UsageError("--uninstall asks before it removes anything, and there is no "
                         "terminal to ask on", hint="add --force to remove without asking")
    answer = input("Remove all of this? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UsageError("nothing removed (not confirmed)")


# -- finding -------------------------------------------------------------------------------


def find(client: Incus, settings: config.Config, *, sessions: bool,
         keep_images: bool) -> Found:
    prefix = naming.container_prefix()
    profile = settings.get("incus.profile")
    return Found(
        containers=[i["name"] for i in client.instances() if is_cois(i, prefix, profile)],
        images=[] if keep_images else [(i["fingerprint"], _image_name(i))
                                       for i in client.images() if is_cois_image(i)],
        profile=profile if client.get_optional(f"/1.0/profiles/{profile}") else "",
        network=_present(client, "networks", settings.get("incus.network")),
        pool=_present(client, "storage-pools", settings.get("incus.pool")),
        sessions=saved_session_stores() if sessions else [])


def is_cois(instance: dict[str, Any], prefix: str, profile: str) -> bool:
    """A session container (user.coi.* keys), or one made under coi's name with its
    profile (coi container launch, an image builder)."""
    if any(key.startswith("user.coi.") for key in instance.get("config") or {}):
        return True
    return instance["name"].startswith(prefix) and profile in (instance.get("profiles") or [])


def is_cois_image(image: dict[str, Any]) -> bool:
    """An image coi built or published: it carries coi's `coi.*` properties."""
    return any(key.startswith("coi.") for key in image.get("properties") or {})


def _image_name(image: dict[str, Any]) -> str:
    aliases = [a["name"] for a in image.get("aliases") or []]
    return ", ".join(aliases) if aliases else image["fingerprint"][:12]


def _present(client: Incus, collection: str, name: str) -> str:
    return name if client.get_optional(f"/1.0/{collection}/{name}") else ""


def saved_session_stores() -> list[str]:
    """Every user's `~/.coi/sessions-<tool>` folder (a real folder, not a link)."""
    stores = []
    for home in sorted({entry.pw_dir for entry in pwd.getpwall() if entry.pw_dir}):
        for path in sorted(glob.glob(os.path.join(glob.escape(home), ".coi", "sessions-*"))):
            if os.path.isdir(path) and not os.path.islink(path):
                stores.append(path)
    return stores


# -- removing ------------------------------------------------------------------------------


def remove_all(client: Incus, found: Found) -> list[Step]:
    going = {*found.containers, *(fingerprint for fingerprint, _ in found.images)}
    steps: list[tuple[str, Callable[[], Step]]] = [
        ("containers", lambda: remove_containers(client, found.containers)),
        ("images", lambda: remove_images(client, found.images)),
        ("profile", lambda: remove_unused(client, "profiles", found.profile, going)),
        ("bridge", lambda: remove_unused(client, "networks", found.network, going)),
        ("storage pool", lambda: remove_unused(client, "storage-pools", found.pool, going)),
        ("host service", remove_service),  # first: its upkeep must not put rules back
        ("nftables", remove_tables),
        ("id maps", remove_idmap_lines),
        ("saved sessions", lambda: remove_sessions(found.sessions)),
    ]
    progress = Progress("coi setup --uninstall", len(steps))
    progress.silent |= plan.active()  # a dry run prints its plan instead
    done = []
    for label, step_fn in steps:
        with progress.step(label) as outcome:
            step = step_fn()
            outcome.append(f"{step.detail} ({'removed' if step.changed else 'nothing'})")
        done.append(step)
    return done


def remove_containers(client: Incus, names: list[str]) -> Step:
    """Stopped at once and deleted, unsaved: what was saved before stays. Each one's
    workspace view is detached from the host first (never a file of the workspace)."""
    for name in names:
        client.delete_instance_force(name)
        if not plan.step("release", ("view", name)):
            views.release(name, forget=True)
    return Step("containers", bool(names), f"deleted {len(names)}")


def remove_images(client: Incus, images: list[tuple[str, str]]) -> Step:
    for fingerprint, _ in images:
        client.delete_image(fingerprint)
    return Step("images", bool(images), f"deleted {len(images)}")


def remove_unused(client: Incus, collection: str, name: str, going: set[str]) -> Step:
    """Delete a profile, network or pool of coi's unless something other than what this
    run removes (`going`: containers, image fingerprints; profiles go first) uses it."""
    kind = KINDS[collection]
    if not name:
        return Step(kind, False, f"no {kind} of coi's")
    found = client.get_optional(f"/1.0/{collection}/{name}")
    if found is None:
        return Step(kind, False, f"{name!r} gone already")
    users = [user for user in (url.rsplit("/", 1)[-1].split("?")[0]
                               for url in found.get("used_by") or []
                               if not url.startswith("/1.0/profiles/")) if user not in going]
    if users:
        return Step(kind, False, f"{name!r} left: still used by {', '.join(users[:5])}")
    try:
        client.request("DELETE", f"/1.0/{collection}/{name}", what=f"{kind} {name}")
    except IncusError as exc:
        return Step(kind, False, f"{name!r} left: {exc.one_line()}")
    return Step(kind, True, f"deleted {name!r}")


def remove_tables() -> Step:
    """coi-net owns nftables: its teardown deletes coi's tables and rule state."""
    assumed = make_record("net_teardown", tables=[], states=[])
    record = plumbing.call("coi-net", ["teardown"], kind="net_teardown", dry_run=[assumed])[0]
    tables = record.get("tables") or []
    return Step("nftables", bool(tables), f"deleted {', '.join(tables) or 'no table'}")


def remove_service() -> Step:
    """Stop the service (systemd's unit, or the process setup started), then its files;
    /run/coi only when no workspace view is still mounted under it."""
    stopped = _stop_service()
    removed = [str(path) for path in (install.SERVICE_ROOT, install.LOG_FILE.parent)
               if _remove_tree(path)]
    if _mounted_under(RUN_DIR):
        left = f"; {RUN_DIR} left: a view is still mounted there"
    else:
        left = ""
        if _remove_tree(RUN_DIR):
            removed.append(str(RUN_DIR))
    changed = bool(stopped or removed)
    detail = "; ".join(filter(None, [stopped, "removed " + ", ".join(removed) if removed
                                     else ""])) or "not installed"
    return Step("host service", changed, detail + left)


def _stop_service() -> str:
    if plan.step("stop", "coi's host service"):
        return "stopped"
    if not install.UNIT_PATH.exists():
        return "stopped the service" if install.stop_started() else ""
    systemd = hostinfo.has_systemd()
    if systemd:
        proc.run(["systemctl", "disable", "--now", "coi-host.service"], check=False)
    install.UNIT_PATH.unlink()
    if systemd:
        proc.run(["systemctl", "daemon-reload"], check=False)
    return "stopped and removed coi-host.service"


def remove_idmap_lines() -> Step:
    if plan.step("write", (idmap.SUBUID, idmap.SUBGID), remove=idmap.ADDED_RECORD):
        return Step("id maps", True, "the lines noted in " + idmap.ADDED_RECORD)
    removed = idmap.remove_added()
    _remove_tree(STATE_DIR)  # coi-net's state is gone with its teardown; the record too
    if not removed:
        return Step("id maps", False, "no line coi added (lines written before coi "
                    "recorded them, or by hand, stay)")
    return Step("id maps", True, f"removed {', '.join(removed)}")


def remove_sessions(stores: list[str]) -> Step:
    for path in stores:
        if not plan.step("remove", path):
            shutil.rmtree(path)
    if not stores:
        return Step("saved sessions", False, "kept (--sessions removes them)")
    return Step("saved sessions", True, f"removed {len(stores)} store(s)")


def _remove_tree(path: Path) -> bool:
    if not path.exists() or path.is_symlink():
        return False
    if not plan.step("remove", str(path)):
        shutil.rmtree(path)
    return True


def _mounted_under(root: Path) -> bool:
    """True when a mount point lies at or under `root` (mountinfo's 5th field)."""
    prefix = f"{root}/"
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        return any(fields[4] == str(root) or fields[4].startswith(prefix)
                   for fields in (line.split() for line in mounts) if len(fields) > 4)
