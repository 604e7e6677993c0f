"""Publishing images without ever leaving a half-built one under its real name, or
one without any name.

A new image is first imported or published under a temporary alias; only
when that succeeded does the real alias move to it, in one request, and the
image it pointed at before is deleted. A failure or an interruption leaves
the old image as it was and removes the half-way one, also when Incus made
the image but not its temporary alias: every staged image carries the
property STAGED_AS (its temporary alias), which finds it either way.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from coi_common import plan
from coi_common.errors import CoiError, IncusError, NotFound
from coi_common.incus import Incus

STAGED_AS: Final = "coi.staged_as"
PUBLISH_SECONDS: Final = 1800
"""The full coi image (~710 MiB) took 33-65 s to publish here; this is for slow disks."""
SETTLE_SECONDS: Final = 600
"""How long an interrupted build waits for Incus to end a publish it cannot cancel."""
PLANNED_IMAGE: Final = {"fingerprint": "(the new image)", "aliases": []}
"""What a --dry-run takes the image it published (planned only) for."""


@contextlib.contextmanager
def staged(client: Incus, alias: str, prefix: str) -> Iterator[str]:
    """A temporary alias for the new image; dropped (with its image) unless swapped in."""
    tmp_alias = f"{prefix}tmp-{secrets.token_hex(4)}"
    try:
        yield tmp_alias
    finally:
        drop_tmp_alias(client, tmp_alias, alias)


def import_tarballs(client: Incus, meta: Path, rootfs: Path, tmp_alias: str) -> None:
    client.cli(["image", "import", str(meta), str(rootfs), client.ref(), "--alias", tmp_alias],
               timeout=900)


def publish(client: Incus, instance: str, tmp_alias: str,
            properties: Mapping[str, str]) -> None:
    """Publish the stopped `instance` under `tmp_alias`, with STAGED_AS set.

    Incus cannot cancel a publish: when the wait ends early (an error, Ctrl-C,
    SIGTERM), this waits until Incus has finished or failed it before
    re-raising, so that no image appears after the caller cleaned up.
    """
    body = {"source": {"type": "instance", "name": instance},
            "properties": {**properties, STAGED_AS: tmp_alias},
            "aliases": [{"name": tmp_alias}], "compression_algorithm": "zstd"}
    started = client.request("POST", "/1.0/images", body, what=f"container {instance}",
                             wait=False)
    if plan.active():  # planned: there is no operation to wait for
        return
    operation = f"/1.0/operations/{started['id']}"
    try:
        client.wait_operation(operation, what=f"container {instance}",
                              timeout=PUBLISH_SECONDS)
    except BaseException:
        with contextlib.suppress(CoiError):  # the daemon gone, a second SIGTERM: stop waiting
            _settle(client, operation)
        raise


def _settle(client: Incus, operation: str) -> None:
    """Wait (SETTLE_SECONDS at most) until `operation` is over, saying why on stderr."""
    try:
        if _is_over(client.request("GET", operation)):
            return
    except NotFound:
        return  # over, and Incus has forgotten it already
    print("coi: Incus is still publishing (it cannot cancel that); "
          "waiting for it to end, to remove the half-way image", file=sys.stderr, flush=True)
    # A failed publish is over too; one still running after SETTLE_SECONDS is given up.
    with contextlib.suppress(IncusError, NotFound):
        client.wait_operation(operation, timeout=SETTLE_SECONDS)


def _is_over(state: Mapping[str, Any] | None) -> bool:
    # Incus status codes: 1xx while pending or running, 2xx success, 4xx failure.
    return int((state or {}).get("status_code") or 200) >= 200


def swap_alias(client: Incus, tmp_alias: str, alias: str) -> str:
    """Point `alias` at the image under tmp_alias; delete the image it left. Returns the
    new fingerprint. An existing alias is re-pointed in one request, so there is no
    moment without a usable image."""
    new = client.image_by_alias(tmp_alias) or (PLANNED_IMAGE if plan.active() else None)
    if new is None:
        raise CoiError(f"the new image under {tmp_alias} is missing")
    old = client.image_by_alias(alias)
    if old is None:
        client.rename_alias(tmp_alias, alias)
        return str(new["fingerprint"])
    client.point_alias(alias, new["fingerprint"])
    client.delete_alias(tmp_alias)
    if old["fingerprint"] != new["fingerprint"] and not _other_aliases(old, alias):
        client.delete_image(old["fingerprint"])
    return str(new["fingerprint"])


def _other_aliases(image: Mapping[str, Any], alias: str) -> bool:
    return any(a.get("name") != alias for a in image.get("aliases") or [])


def drop_tmp_alias(client: Incus, tmp_alias: str, alias: str) -> None:
    """Remove what staging under tmp_alias left: the temporary alias and every image
    staged under it (with or without that alias), except the one `alias` points at.
    Best effort: the error that brought us here is the one to report."""
    try:
        images = client.images()
    except CoiError:
        return
    for image in images:
        names = {str(a.get("name")) for a in image.get("aliases") or []}
        staged_as = (image.get("properties") or {}).get(STAGED_AS)
        if tmp_alias not in names and staged_as != tmp_alias:
            continue
        with contextlib.suppress(CoiError):
            if alias not in names:
                client.delete_image(str(image["fingerprint"]))
            elif tmp_alias in names:
                client.delete_alias(tmp_alias)
