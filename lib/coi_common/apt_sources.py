"""Reading apt's deb822 sources: which mirror serves the main Debian archive here.

coi uses the host's own mirror wherever it fetches Debian packages itself
(backports for Incus, debootstrap for offline base images), so a machine
that reaches only its configured mirror still works.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

DEBIAN_SOURCES: Final = Path("/etc/apt/sources.list.d/debian.sources")
FALLBACK_MIRROR: Final = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Archive:
    """The main archive's first URI and the keyring that signs it."""

    uri: str = FALLBACK_MIRROR
    signed_by: str = ""


def stanzas(text: str) -> Iterator[dict[str, str]]:
    """Each deb822 stanza as lower-cased field names to values (comments skipped)."""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            # Comments, and continuation lines of multi-line fields.
            if line.startswith(("#", " ", "\t")) or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields:
            yield fields


def main_archive(text: str) -> Archive:
    """The first enabled `deb` stanza that is not for security updates."""
    for fields in stanzas(text):
        uris = fields.get("uris", "").split()
        if ("deb" in fields.get("types", "").split() and uris
                and "security" not in fields.get("suites", "") and "security" not in uris[0]
                and fields.get("enabled", "yes").lower() != "no"):
            return Archive(uris[0], fields.get("signed-by", ""))
    return Archive()


def host_archive(path: Path = DEBIAN_SOURCES) -> Archive:
    """The main archive of this host's apt configuration (the fallback when unreadable)."""
    try:
        return main_archive(path.read_text(encoding="utf-8"))
    except OSError:
        return Archive()
