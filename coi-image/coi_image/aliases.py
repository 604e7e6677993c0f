"""Publishing images without ever leaving a half-built one under its real name.

A new image is first imported or published under a temporary alias; only
when that succeeded does the real alias move to it, in one request, and the
image it pointed at before is deleted. A failure leaves the old image as it
was and removes the half-way one.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

from coi_common.errors import CoiError
from coi_common.incus import Incus


@contextlib.contextmanager
def staged(client: Incus, alias: str, prefix: str) -> Iterator[str]:
    """A temporary alias for the new image; dropped (with its image) unless swapped in."""
    tmp_alias = f"{prefix}tmp-{secrets.token_hex(4)}"
    try:
        yield tmp_alias
    finally:
        drop_tmp_alias(client, tmp_alias, alias)


def import_tarballs(client: Incus, meta: Path, rootfs: Path, tmp_alias: str) -> None:
    client.cli(["image", "import", str(meta), str(rootfs), "--alias", tmp_alias], timeout=900)


def swap_alias(client: Incus, tmp_alias: str, alias: str) -> str:
    """Point `alias` at the image under tmp_alias; delete the image it left. Returns the
    new fingerprint. An existing alias is re-pointed in one request, so there is no
    moment without a usable image."""
    new = client.image_by_alias(tmp_alias)
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


def _other_aliases(image: dict, alias: str) -> bool:
    return any(a.get("name") != alias for a in image.get("aliases") or [])


def drop_tmp_alias(client: Incus, tmp_alias: str, alias: str) -> None:
    """After a failed build: delete the half-way image, if it got that far."""
    with contextlib.suppress(CoiError):
        image = client.image_by_alias(tmp_alias)
        if image is None:
            return
        current = client.image_by_alias(alias)
        if current is not None and current["fingerprint"] == image["fingerprint"]:
            client.delete_alias(tmp_alias)
        else:
            client.delete_image(image["fingerprint"])
