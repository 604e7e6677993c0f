"""`coi container launch|start|stop|delete|exists|running|mount`.

Verbs take a client and validated names, do one thing through
coi_common.incus and return the line to print; `run()` validates the
command line, prints, and returns the exit status. Every failure is a typed
error (coi_common.errors) the entry wrapper turns into one line.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from typing import Any, Final

from coi_common import config, incus, naming, seccomp, sessions
from coi_common.entry import Args
from coi_common.errors import AlreadyExists, BadInput, CoiError, NotFound
from coi_common.naming import (
    validate_container_name,
    validate_device_name,
    validate_image_name,
)

STOP_TIMEOUT: Final = 20
"""Seconds a clean stop may take; kept under the client's 30 s socket timeout."""
LIST_HINT: Final = "see 'coi list' or 'incus list'"
STOPPED: Final = "Stopped"
RUNNING: Final = "Running"


def run(args: Args) -> int:
    """Run one lifecycle command; return its exit status."""
    if args["exists"] or args["running"]:
        return _run_query(args)
    name = validate_container_name(args["<name>"])
    if args["launch"]:
        image = validate_image_name(args["<image>"])
        settings = config.load(os.getcwd())
        line = launch(client(settings), image, name, profile=settings.get("incus.profile"),
                      ephemeral=args["--ephemeral"],
                      allow_setuid=settings.get("security.allow_setuid"))
    elif args["start"]:
        line = start(client(), name)
    elif args["stop"]:
        line = stop(client(), name, force=args["--force"])
    elif args["delete"]:
        line = delete(client(), name, force=args["--force"])
    else:
        device = validate_device_name(args["<device>"])
        # The same host path policy as a session's mounts: never /, a credentials
        # store, a system path or the home itself (naming.check_host_mount).
        source = naming.check_host_mount(host_directory(args["<source>"]), "mount source",
                                         sessions.invoking_home())
        path = container_path(args["<path>"], what="mount path")
        line = mount(client(), name, device, source, path, shift=args["--shift"])
    print(line, flush=True)
    return 0


def _run_query(args: Args) -> int:
    """exists/running: the answer is the exit status; a name that is not valid never
    exists. Only a daemon that does not answer is an error (exit 4)."""
    try:
        name = validate_container_name(args["<name>"])
    except CoiError:
        return 1
    try:
        found = client().instance(name)
    except NotFound:
        return 1
    return 0 if args["exists"] or found.get("status") == RUNNING else 1


def client(settings: config.Config | None = None) -> incus.Incus:
    """The Incus client of the effective config ([incus] socket and project)."""
    if settings is None:  # lenient: the agent's .coi.toml must not stop shutdown or kill
        settings = config.load(os.getcwd(), lenient=True)
    return incus.connect(settings)


def require(client: incus.Incus, name: str) -> dict[str, Any]:
    """The container `name` (GET /1.0/instances/NAME); NotFound with our wording."""
    try:
        return client.instance(name)
    except NotFound:
        raise NotFound(f"container {name} does not exist", hint=LIST_HINT) from None


# -- verbs -----------------------------------------------------------------------------


def launch(client: incus.Incus, image: str, name: str, *, profile: str,
           ephemeral: bool = False, allow_setuid: bool = False) -> str:
    """Create `name` from the local image alias `image` with `profile`, and start it.

    It gets a session's kernel policy (coi_common.seccomp): nesting, so Docker runs
    inside, and no setuid file unless the user's config allows them."""
    try:
        client.create_instance(name, image, profiles=[profile], ephemeral=ephemeral,
                               config=seccomp.container_config(allow_setuid), start=True)
    except AlreadyExists:
        raise AlreadyExists(f"container {name} already exists",
                            hint=f"pick another name or delete it: coi container delete {name}"
                            ) from None
    except NotFound as exc:
        if client.image_by_alias(image) is None:
            raise NotFound(f"image {image} does not exist",
                           hint="see 'coi image list --all'") from None
        raise NotFound(f"cannot launch {name}: {exc.message}",
                       hint=f"does the profile {profile!r} exist? see 'incus profile list'") \
            from None
    return f"launched {name} from {image}" + (" (ephemeral)" if ephemeral else "")


def start(client: incus.Incus, name: str) -> str:
    """Start a stopped container; one already running is left as it is."""
    if require(client, name).get("status") == RUNNING:
        return f"{name} is already running"
    client.set_state(name, "start")
    return f"started {name}"


def stop(client: incus.Incus, name: str, *, force: bool = False) -> str:
    """Stop a container: cleanly within STOP_TIMEOUT, or at once with force."""
    found = require(client, name)
    if found.get("status") == STOPPED:
        return f"{name} is already stopped"
    try:
        client.set_state(name, "stop", force=force, timeout=-1 if force else STOP_TIMEOUT)
    except NotFound:
        pass  # an ephemeral container may be gone before Incus answers
    except CoiError as exc:
        if force:
            raise
        raise CoiError(f"container {name} did not stop cleanly: {exc.message}",
                       hint=f"stop it at once: coi container stop {name} --force") from None
    if found.get("ephemeral"):
        return f"stopped {name} (ephemeral, so Incus deleted it)"
    return f"stopped {name}"


def delete(client: incus.Incus, name: str, *, force: bool = False) -> str:
    """Delete a stopped container; a running (or frozen) one only with force."""
    status = require(client, name).get("status")
    if status != STOPPED:
        if not force:
            raise CoiError(f"container {name} is {str(status).lower()}; not deleting it",
                           hint=f"stop it first with 'coi container stop {name}', or use "
                                f"'coi container delete {name} --force'")
        try:
            client.set_state(name, "stop", force=True)
        except NotFound:
            return f"deleted {name}"  # ephemeral: stopping deleted it
    # Gone already is fine: ephemeral (the stop deleted it), or deleted meanwhile.
    with contextlib.suppress(NotFound):
        client.delete_instance(name)
    return f"deleted {name}"


def mount(client: incus.Incus, name: str, device: str, source: str, path: str, *,
          shift: bool = False) -> str:
    """Add the disk device `device`: host directory `source` at `path` in the container.

    Refuses a device name the container already has, its own or from a
    profile: a local device of that name would silently replace the profile's
    (`root` or `eth0`, say).
    """
    found = require(client, name)
    taken = {**(found.get("expanded_devices") or {}), **(found.get("devices") or {})}
    if device in taken:
        raise AlreadyExists(f"container {name} already has a device named {device}",
                            hint="pick another device name")
    settings = {"type": "disk", "source": source, "path": path}
    if shift:
        settings["shift"] = "true"
    client.add_device(name, device, settings)
    return f"mounted {source} at {path} in {name} (device {device})"


# -- arguments --------------------------------------------------------------------------


def host_directory(value: str) -> str:
    """An existing host directory as an absolute, symlink-free path."""
    if not value or "\0" in value:
        raise BadInput(f"host path {value!r} is not a usable path")
    real = os.path.realpath(value)
    if not os.path.exists(real):
        raise NotFound(f"host directory {value!r} does not exist")
    if not os.path.isdir(real):
        raise BadInput(f"host path {value!r} is not a directory; only directories "
                       f"can be mounted")
    return real


def container_path(value: str, *, what: str) -> str:
    """An absolute path inside a container, normalised (`/a/./b/` is `/a/b`)."""
    if not value.startswith("/") or "\0" in value:
        raise BadInput(f"{what} {value!r} must be an absolute path in the container, "
                       f"e.g. /workspace")
    return posixpath.normpath(value).replace("//", "/", 1)
