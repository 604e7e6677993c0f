"""`coi image delete NAME`: which image NAME means (an alias, else a fingerprint prefix)."""

from __future__ import annotations

import pytest

from coi_common.errors import EXIT_USAGE, BadInput, NotFound
from coi_image import manage

FIRST = "0123456789ab" + "1" * 52
SECOND = "0123456789ab" + "2" * 52


class ImagesOnly:
    """Incus answering image lookups from a fixed list, as GET /1.0/images?recursion=1 does."""

    def __init__(self, *images: dict) -> None:
        self.raw = list(images)

    def images(self) -> list[dict]:
        return self.raw

    def image_by_alias(self, alias: str) -> dict | None:
        return next((i for i in self.raw
                     if alias in {a["name"] for a in i.get("aliases") or []}), None)


def image(fingerprint: str, *aliases: str) -> dict:
    return {"fingerprint": fingerprint, "aliases": [{"name": a} for a in aliases],
            "properties": {}, "size": 1}


@pytest.mark.parametrize("name", [FIRST, FIRST[:12], FIRST[:20].upper()])
def test_a_full_fingerprint_or_a_prefix_of_12_hex_digits_finds_an_image_without_alias(name):
    client = ImagesOnly(image(FIRST), image("f" * 64, "coi-test-other"))
    assert manage.find_image(client, name).fingerprint == FIRST


def test_an_alias_wins_over_a_fingerprint_that_starts_the_same():
    client = ImagesOnly(image(FIRST), image(SECOND, FIRST[:12]))
    assert manage.find_image(client, FIRST[:12]).fingerprint == SECOND


def test_a_prefix_two_images_share_is_refused_in_one_line():
    client = ImagesOnly(image(FIRST), image(SECOND))
    with pytest.raises(BadInput) as refused:
        manage.find_image(client, FIRST[:12])
    assert refused.value.exit_code == EXIT_USAGE
    assert refused.value.one_line() == (
        f"{FIRST[:12]} is the start of 2 image fingerprints (give more of the fingerprint, "
        "see 'coi image list --all')")
    assert manage.find_image(client, FIRST[:13]).fingerprint == FIRST


@pytest.mark.parametrize("name", [FIRST[:11], "coi-test-nosuch", "g" * 12, FIRST + "0"])
def test_a_short_prefix_or_unknown_name_is_not_found(name):
    with pytest.raises(NotFound):
        manage.find_image(ImagesOnly(image(FIRST)), name)
