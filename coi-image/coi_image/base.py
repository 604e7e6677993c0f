"""The base a build starts from: an offline debootstrap, a remote image, or a local one.

Specs: `bootstrap:DISTRO/SUITE` (made here with debootstrap from the
configured mirror and cached as `coi-base-DISTRO-SUITE`), `images:DISTRO/RELEASE`
(copied once from the images: remote and cached the same way), or any local
image alias.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from coi_common import plan
from coi_common.apt_sources import host_archive
from coi_common.errors import BadInput, CoiError, NotFound
from coi_common.incus import Incus
from coi_common.naming import validate_image_name
from coi_common.progress import Progress
from coi_image import aliases, rootfs

BOOTSTRAP: Final = "bootstrap:"
REMOTE: Final = "images:"
DEFAULT_REMOTE: Final = "images:ubuntu/24.04"
DEFAULT_BOOTSTRAP: Final = "bootstrap:debian/bookworm"
UBUNTU_MIRROR: Final = "http://archive.ubuntu.com/ubuntu"
_PART: Final = re.compile(r"[a-z0-9][a-z0-9.]{0,31}")
PROBE_SECONDS: Final = 15


@dataclass(frozen=True)
class Base:
    """A parsed base spec and the local alias it is (or becomes) available under."""

    spec: str
    kind: str  # "bootstrap", "remote" or "local"
    alias: str
    distro: str = ""
    release: str = ""


def parse(spec: str) -> Base:
    """Read a base spec; anything malformed is one BadInput line."""
    for prefix, kind in ((BOOTSTRAP, "bootstrap"), (REMOTE, "remote")):
        if spec.startswith(prefix):
            distro, _, release = spec[len(prefix):].partition("/")
            if not (_PART.fullmatch(distro) and _PART.fullmatch(release)):
                raise BadInput(f"base {spec!r}: expected {prefix}DISTRO/RELEASE",
                               hint=f"e.g. {DEFAULT_BOOTSTRAP} or {DEFAULT_REMOTE}")
            return Base(spec, kind, f"coi-base-{distro}-{release}", distro, release)
    return Base(spec, "local", validate_image_name(spec))


def mirror_for(base: Base, configured: str) -> str:
    """[image] mirror, else the host's Debian archive or Ubuntu's."""
    if configured:
        return configured
    return UBUNTU_MIRROR if base.distro == "ubuntu" else host_archive().uri


def bootstrap_recipe(base: Base, mirror: str) -> str:
    """What a bootstrapped base is made of: suite, mirror and rootfs.recipe() (contents
    only, never paths or Python bytes, so every checkout of one version agrees)."""
    return hashlib.sha256(f"{base.spec}\0{mirror}\0{rootfs.recipe()}".encode()).hexdigest()


def identity(client: Incus, base: Base, mirror: str) -> str:
    """A cheap fingerprint of the base for the image's recipe hash (builds nothing)."""
    if base.kind == "bootstrap":
        return f"{base.spec}@{bootstrap_recipe(base, mirror)}"
    if base.kind == "remote":
        return base.spec
    image = client.image_by_alias(base.alias)
    if image is None:
        raise NotFound(f"base image {base.alias!r} does not exist",
                       hint="build it first, or pick another --base")
    return f"{base.alias}@{image['fingerprint']}"


def ensure(client: Incus, base: Base, mirror: str, *, log_path: str, progress: Progress,
           tmp_prefix: str) -> str:
    """Make the base available locally (reusing a cached one); return its alias."""
    if base.kind == "local":
        identity(client, base, mirror)
        return base.alias
    if base.kind == "remote":
        if client.image_by_alias(base.alias) is None:
            client.cli(["image", "copy", base.spec, client.ref(), "--alias", base.alias],
                       timeout=1800)
        return base.alias
    recipe = bootstrap_recipe(base, mirror)
    cached = client.image_by_alias(base.alias)
    if cached and cached.get("properties", {}).get("coi.base_recipe") == recipe:
        progress.say(f"base {base.alias} cached")
        return base.alias
    if plan.step("bootstrap", base.spec, mirror=mirror, alias=base.alias):
        return base.alias
    rootfs.require_root(f"making the base {base.spec}")
    progress.say(f"making base {base.spec} with debootstrap from {mirror} (about a minute)")
    with rootfs.work_dir("coi-base-") as work, \
            aliases.staged(client, base.alias, tmp_prefix) as tmp_alias:
        tree = work / "rootfs"
        rootfs.debootstrap(tree, base.release, mirror, rootfs.BASE_PACKAGES, log_path)
        rootfs.prepare_base(tree, log_path)
        meta, tarball = rootfs.pack(work, tree, {
            "description": f"coi base {base.distro} {base.release} (debootstrap minbase)",
            "os": base.distro, "release": base.release, "coi.base_recipe": recipe,
            aliases.STAGED_AS: tmp_alias})
        aliases.import_tarballs(client, meta, tarball, tmp_alias)
        aliases.swap_alias(client, tmp_alias, base.alias)
    return base.alias


def auto_spec(client: Incus) -> str:
    """images:ubuntu/24.04 when the images: remote answers, else an offline Debian base."""
    try:
        answered = client.cli(["image", "info", DEFAULT_REMOTE], check=False, reads=True,
                              timeout=PROBE_SECONDS).ok
    except CoiError:
        answered = False
    return DEFAULT_REMOTE if answered else DEFAULT_BOOTSTRAP
