"""`coi image ...`: list, check, publish, delete and clean up local Incus images.

Verbs return data (image records); rendering to a text table or JSON Lines
happens at the edge, in `run()`. Every Incus call goes through
coi_common.incus; every failure is a typed error the entry wrapper turns
into one line and an exit code.

"coi's images" are the images with at least one `coi.*` property: coi's
builds and publishes set them, and nothing else does.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from coi_common import config, incus, output
from coi_common.entry import Args
from coi_common.errors import AlreadyExists, BadInput, CoiError, NotFound, UsageError
from coi_common.naming import validate_container_name, validate_image_name
from coi_common.progress import Progress
from coi_common.protocol import Record, make_record, write_record

PROG: Final = "coi-image"
COI_PROPERTY_PREFIX: Final = "coi."
PUBLISHED_FROM: Final = "coi.published_from"
PUBLISHED_AT: Final = "coi.published_at"
FINGERPRINT_SHORT: Final = 12
FINGERPRINT_PREFIX: Final = re.compile(rf"[0-9a-fA-F]{{{FINGERPRINT_SHORT},64}}")
NO_ALIAS: Final = "-"
KEEP_PATTERN: Final = re.compile(r"[0-9]{1,9}")
"""--keep: plain ASCII digits; nine at most keeps int() far from its size limit."""

EPOCH: Final = datetime(1, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Image:
    """One local image as coi shows it; aliases sorted by name."""

    aliases: tuple[str, ...]
    fingerprint: str
    size: int
    created_at: datetime
    description: str
    properties: Mapping[str, str]

    @property
    def alias(self) -> str | None:
        return self.aliases[0] if self.aliases else None

    @property
    def is_coi(self) -> bool:
        return any(key.startswith(COI_PROPERTY_PREFIX) for key in self.properties)

    def coi_properties(self) -> dict[str, str]:
        return {k: v for k, v in sorted(self.properties.items())
                if k.startswith(COI_PROPERTY_PREFIX)}

    def has_alias_with(self, prefix: str) -> bool:
        return any(alias.startswith(prefix) for alias in self.aliases)

    def record(self) -> Record:
        """The `image` record (docs/protocol.md)."""
        return make_record("image", alias=self.alias, aliases=list(self.aliases),
                           fingerprint=self.fingerprint, size=self.size,
                           created_at=iso_utc(self.created_at), description=self.description,
                           properties=self.coi_properties())


def run(args: Args, *, as_json: bool) -> int:
    """Run one `image ...` command; return its exit status."""
    if args["exists"]:
        return 0 if image_exists(_client(), args["<name>"]) else 1
    if args["cleanup"]:
        # Checked before connecting: a bad command line is exit 2 whatever the daemon does.
        prefix = cleanup_prefix(args["<prefix>"])
        keep = keep_count(args["--keep"])
        return _run_cleanup(_client(), prefix, keep, as_json=as_json)
    if args["publish"]:
        container = validate_container_name(args["<container>"])
        name = validate_image_name(args["<name>"])
        image = publish(_client(), container, name, args["--description"] or "",
                        progress=None if as_json else Progress(PROG, 1))
        if as_json:
            write_record(image.record())
        else:
            _emit_line(f"published {name}, fingerprint {image.fingerprint}")
        return 0
    if args["delete"]:
        name = validate_image_name(args["<name>"])
        image = delete(_client(), name)
        _emit_line(_deleted_line(name, image))
        return 0
    images = list_images(_client(), everything=args["--all"], prefix=args["--prefix"])
    if as_json:  # one document: the listing
        write_record(make_record("image_list", images=[image.record() for image in images]))
    else:
        _emit_line(render_table(images))
    return 0


def _client() -> incus.Incus:
    return incus.connect(config.load(None))


# -- verbs ------------------------------------------------------------------------------


def all_images(client: incus.Incus) -> list[Image]:
    """Every local image, sorted by first alias (images without one last), then fingerprint."""
    images = [image_from_incus(raw) for raw in client.images()]
    return sorted(images, key=lambda i: (i.alias is None, i.alias or "", i.fingerprint))


def list_images(client: incus.Incus, *, everything: bool = False,
                prefix: str | None = None) -> list[Image]:
    """coi's images (everything: all of them), only those with an alias starting with prefix."""
    return [image for image in all_images(client)
            if (everything or image.is_coi)
            and (prefix is None or image.has_alias_with(prefix))]


def image_exists(client: incus.Incus, name: str) -> bool:
    """Whether the alias exists; a name that is not a valid alias never does."""
    try:
        validate_image_name(name)
    except CoiError:
        return False
    return client.image_by_alias(name) is not None


def publish(client: incus.Incus, container: str, name: str, description: str = "", *,
            progress: Progress | None = None, now: datetime | None = None) -> Image:
    """Publish the stopped `container` as a new image aliased `name`.

    Refuses, before anything changes: a missing container (NotFound), one
    that is not stopped, and an alias that exists already (AlreadyExists).
    """
    try:
        status = client.instance(container).get("status", "")
    except NotFound:
        raise NotFound(f"container {container} does not exist",
                       hint="see 'coi list' or 'incus list'") from None
    if status != "Stopped":
        raise CoiError(f"container {container} is {status.lower() or 'not stopped'}; "
                       f"only a stopped container can be published",
                       hint=f"stop it first: coi container stop {container}")
    if client.image_by_alias(name) is not None:
        raise _alias_taken(name)
    properties = {PUBLISHED_FROM: container, PUBLISHED_AT: iso_utc(now or datetime.now(UTC))}
    try:
        if progress is None:
            client.publish(container, alias=name, properties=properties,
                           description=description)
        else:
            with progress.step(f"publish {container} as {name}") as outcome:
                client.publish(container, alias=name, properties=properties,
                               description=description)
                outcome.append("done")
    except CoiError as exc:
        # Incus makes the image before its alias: when the alias was taken meanwhile, the
        # new image stays behind without a name. Our unique properties find it.
        _remove_unnamed(client, properties)
        if isinstance(exc, AlreadyExists):
            raise _alias_taken(name) from None
        raise
    raw = client.image_by_alias(name)
    if raw is None:
        raise NotFound(f"image {name} vanished right after it was published")
    return image_from_incus(raw)


def _alias_taken(name: str) -> AlreadyExists:
    return AlreadyExists(f"image {name} already exists",
                         hint=f"delete it with 'coi image delete {name}' or pick another name")


def _remove_unnamed(client: incus.Incus, properties: Mapping[str, str]) -> None:
    """Delete images without alias carrying exactly these properties; best effort."""
    try:
        for raw in client.images():
            found = raw.get("properties") or {}
            if not raw.get("aliases") and all(found.get(k) == v for k, v in properties.items()):
                client.delete_image(str(raw["fingerprint"]))
    except CoiError:
        pass  # the publish error is the one to report


def delete(client: incus.Incus, name: str) -> Image:
    """Delete the image `name` names (find_image); its aliases go with it. Returns it."""
    image = find_image(client, name)
    client.delete_image(image.fingerprint)
    return image


def find_image(client: incus.Incus, name: str) -> Image:
    """The image alias `name` points at, else the one whose fingerprint starts with it.

    A fingerprint counts from FINGERPRINT_SHORT hex digits on (what `image list`
    shows), so an image left without any alias can still be named; a prefix
    that more than one image shares is refused (BadInput), never guessed.
    """
    raw = client.image_by_alias(name)
    if raw is not None:
        return image_from_incus(raw)
    if FINGERPRINT_PREFIX.fullmatch(name):
        found = [i for i in all_images(client) if i.fingerprint.startswith(name.lower())]
        if len(found) > 1:
            raise BadInput(f"{name} is the start of {len(found)} image fingerprints",
                           hint="give more of the fingerprint, see 'coi image list --all'")
        if found:
            return found[0]
    raise NotFound(f"image {name} does not exist", hint="see 'coi image list --all'")


@dataclass(frozen=True)
class CleanupPlan:
    """What cleanup does: images to delete, oldest first, and older ones it must spare."""

    delete: tuple[Image, ...]
    spared: tuple[tuple[Image, tuple[str, ...]], ...]
    """(image, its aliases outside the prefix): deleting it would take those names too."""


def plan_cleanup(images: Iterable[Image], prefix: str, keep: int) -> CleanupPlan:
    """Among images with an alias starting with prefix, all but the `keep` newest go.

    Newest is by created_at, then fingerprint so ties have one answer. An
    image that also carries an alias outside the prefix is spared: it is in
    use under another name, which cleanup of `prefix` must not remove.
    """
    matching = [i for i in images if i.has_alias_with(prefix)]
    newest_first = sorted(matching, key=lambda i: (i.created_at, i.fingerprint), reverse=True)
    old = list(reversed(newest_first[keep:]))
    delete, spared = [], []
    for image in old:
        others = tuple(a for a in image.aliases if not a.startswith(prefix))
        if others:
            spared.append((image, others))
        else:
            delete.append(image)
    return CleanupPlan(tuple(delete), tuple(spared))


def _run_cleanup(client: incus.Incus, prefix: str, keep: int, *, as_json: bool) -> int:
    plan = plan_cleanup(all_images(client), prefix, keep)
    for image, others in plan.spared:
        print(f"{PROG}: kept {_label(image)}: it is also image {', '.join(others)}, "
              f"delete it with 'coi image delete {image.alias}' if you mean it",
              file=sys.stderr, flush=True)
    deleted = 0
    for image in plan.delete:
        try:
            client.delete_image(image.fingerprint)
        except NotFound:
            continue  # deleted by someone else meanwhile: the goal is reached
        deleted += 1
        if as_json:
            write_record(make_record("image_deleted", alias=image.alias,
                                     aliases=list(image.aliases), fingerprint=image.fingerprint,
                                     created_at=iso_utc(image.created_at)))
        else:
            _emit_line(f"deleted {_label(image)}")
    if not deleted and not as_json:
        _emit_line("nothing to clean up")
    return 0


# -- arguments --------------------------------------------------------------------------


def cleanup_prefix(value: str) -> str:
    """The alias prefix of cleanup; blank would select every image with an alias."""
    if not value.strip():
        raise UsageError("cleanup needs a non-empty alias prefix, e.g. 'coi image cleanup "
                         "nightly- --keep 3'")
    return value


def keep_count(value: str) -> int:
    """--keep N: a plain whole number, 1 or more (keeping none is `coi image delete`)."""
    if not KEEP_PATTERN.fullmatch(value or "") or int(value) < 1:
        raise UsageError(f"--keep must be a whole number 1 or more, got {value!r}",
                         hint="to delete every image, use 'coi image delete NAME'")
    return int(value)


# -- Incus data and rendering ----------------------------------------------------------------


def image_from_incus(raw: Mapping[str, Any]) -> Image:
    """An Image from Incus's JSON for one image (GET /1.0/images/FP)."""
    properties = {str(k): str(v) for k, v in (raw.get("properties") or {}).items()}
    aliases = sorted(str(a.get("name", "")) for a in raw.get("aliases") or [])
    return Image(aliases=tuple(a for a in aliases if a), fingerprint=str(raw["fingerprint"]),
                 size=int(raw.get("size") or 0), created_at=parse_time(raw.get("created_at")),
                 description=properties.get("description", ""), properties=properties)


def parse_time(value: object) -> datetime:
    """An Incus timestamp (RFC 3339, nanoseconds, `Z`) as an aware UTC datetime."""
    if not isinstance(value, str) or not value:
        return EPOCH
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return EPOCH
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with a `Z`; microseconds only when there are any."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def render_table(images: Sequence[Image]) -> str:
    """The text table of `image list`, or `no images`."""
    if not images:
        return "no images"
    rows = [("ALIAS", "FINGERPRINT", "SIZE", "CREATED", "DESCRIPTION")]
    rows += [(",".join(i.aliases) or NO_ALIAS, i.fingerprint[:FINGERPRINT_SHORT],
              f"{i.size / 2**20:.1f} MiB", f"{i.created_at:%Y-%m-%d %H:%M} UTC",
              " ".join(i.description.split())) for i in images]
    return output.table(rows)


def _label(image: Image) -> str:
    return f"{','.join(image.aliases) or NO_ALIAS} ({image.fingerprint[:FINGERPRINT_SHORT]})"


def _deleted_line(name: str, image: Image) -> str:
    short = image.fingerprint[:FINGERPRINT_SHORT]
    by_alias = name in image.aliases
    line = f"deleted {name} ({short})" if by_alias else f"deleted image {short}"
    others = [a for a in image.aliases if a != name]
    if others:
        line += f"; its {'other ' if by_alias else ''}aliases went with it: {', '.join(others)}"
    return line


def _emit_line(text: str) -> None:
    print(text, flush=True)
