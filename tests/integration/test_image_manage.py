"""`coi image list|exists|publish|delete|cleanup` against the real daemon.

Only one test publishes a container (that takes seconds: Incus packs the
rootfs with zstd). The others work on tiny images imported from a tarball
made here (a metadata.yaml and a one-file rootfs, well under a second each),
which also lets a test choose each image's creation time. Every image is
aliased `coi-test-<random>-...` and deleted when the test ends, whatever
happened; the test image `coi-test-image` is only ever read.
"""

import contextlib
import io
import json
import re
import secrets
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coi_common.errors import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, CoiError, NotFound
from coi_common.incus import Incus
from coi_common.protocol import parse_record, validate
from coi_image import aliases, main, manage

pytestmark = pytest.mark.incus

COI = str(Path(__file__).resolve().parents[2] / "bin" / "coi")
TEST_IMAGE = "coi-test-image"
BASE_TIME = 1_700_000_000  # 2023-11-14 22:13:20 UTC: imported images get fixed, known ages


def coi(*args, env):
    """`bin/coi ARGS` as a user runs it: (exit status, stdout, stderr)."""
    done = subprocess.run([COI, *args], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    return done.returncode, done.stdout, done.stderr


def records(stdout, kind):
    """The records of `kind` printed: one per line, or (a listing) the elements of the
    one image_list document."""
    if kind == "image" and stdout.startswith('{"coi": 1, "kind": "image_list"'):
        return [validate(r, "image") for r in parse_record(stdout, "image_list")["images"]]
    return [parse_record(line, kind) for line in stdout.splitlines()]


@pytest.fixture
def rand() -> str:
    """The per-test part of every image alias: `coi-test-<rand>-...`."""
    return f"coi-test-{secrets.token_hex(4)}"


@pytest.fixture
def sources() -> list[str]:
    """Containers a test may publish from; whatever was published from them goes at the end
    (`image_aliases`), also an image Incus left without alias."""
    return []


@pytest.fixture
def image_aliases(incus_client: Incus, sources: list[str]) -> Iterator[list[str]]:
    """Aliases a test (may) create; the images behind them are deleted at the end.

    An alias that points at the test image (it must never) loses only the alias.
    """
    aliases: list[str] = []
    yield aliases
    keep = incus_client.image_by_alias(TEST_IMAGE)
    keep_fingerprint = keep["fingerprint"] if keep else None
    doomed: dict[str, str] = {}
    failures = []
    for alias in aliases:
        assert alias.startswith("coi-test-"), alias
        assert alias != TEST_IMAGE
        try:
            image = incus_client.image_by_alias(alias)
            if image is not None and image["fingerprint"] == keep_fingerprint:
                incus_client.delete_alias(alias)
            elif image is not None:
                doomed[image["fingerprint"]] = alias
        except CoiError as exc:
            failures.append(exc.one_line())
    for image in incus_client.images() if sources else []:
        if (image.get("properties") or {}).get("coi.published_from") in sources and \
                image["fingerprint"] != keep_fingerprint:
            doomed[image["fingerprint"]] = "published from a test container"
    for fingerprint in doomed:
        try:
            incus_client.delete_image(fingerprint)
        except NotFound:
            pass
        except CoiError as exc:
            failures.append(exc.one_line())
    if failures:
        pytest.fail("could not delete test images: " + "; ".join(failures), pytrace=False)


ImportImage = Callable[..., str]


@pytest.fixture
def import_image(incus_client: Incus, image_aliases: list[str],
                 tmp_path: Path) -> ImportImage:
    """import_image(ALIAS, age=0, properties=None, more_aliases=()) -> fingerprint.

    A tiny container image, created BASE_TIME + age seconds, with its own
    content (so its own fingerprint), and `coi.test_tiny` set unless
    `properties` says otherwise.
    """

    def factory(alias: str, *, age: int = 0, properties: dict | None = None,
                more_aliases: tuple[str, ...] = ()) -> str:
        image_aliases.extend([alias, *more_aliases])
        work = tmp_path / alias
        (work / "rootfs").mkdir(parents=True)
        (work / "rootfs" / "marker").write_text(f"{alias} {secrets.token_hex(8)}\n")
        metadata = {"architecture": "x86_64", "creation_date": BASE_TIME + age,
                    "properties": {"coi.test_tiny": "true"} if properties is None
                    else properties}
        (work / "metadata.yaml").write_text(json.dumps(metadata))  # JSON is YAML
        tarball = tmp_path / f"{alias}.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            tar.add(work / "metadata.yaml", "metadata.yaml")
            tar.add(work / "rootfs", "rootfs")
        incus_client.cli(["image", "import", str(tarball), "--alias", alias])
        image = incus_client.image_by_alias(alias)
        assert image is not None
        for other in more_aliases:
            incus_client.cli(["image", "alias", "create", other, image["fingerprint"]])
        return image["fingerprint"]

    return factory


@pytest.fixture
def stopped_container(make_container, sources, image_aliases):
    """A stopped container made from the test image; images published from it are deleted."""
    name = make_container(start=False).name
    sources.append(name)
    return name


@pytest.fixture
def unnamed_image(rand, import_image, incus_client) -> Iterator[Callable[..., str]]:
    """unnamed_image(properties=None) -> fingerprint: a tiny image that has lost its only
    alias, as a failed publish leaves one. Each is deleted at the end, whatever happened."""
    made: list[str] = []

    def factory(properties: dict | None = None) -> str:
        alias = f"{rand}-unnamed-{len(made)}"
        fingerprint = import_image(alias, properties=properties)
        made.append(fingerprint)
        incus_client.delete_alias(alias)
        return fingerprint

    yield factory
    for fingerprint in made:
        with contextlib.suppress(NotFound):
            incus_client.delete_image(fingerprint)


def fingerprints(client: Incus) -> set[str]:
    return {image["fingerprint"] for image in client.images()}


# -- publish --------------------------------------------------------------------------------


def test_publish_makes_an_image_that_exists_and_lists_with_its_coi_properties(
        coi_env, rand, image_aliases, stopped_container, incus_client):
    alias = f"{rand}-img"
    image_aliases.append(alias)
    before = datetime.now(UTC).replace(microsecond=0)
    status, out, err = coi("image", "publish", stopped_container, alias, "--description",
                           "made by a test", "--format", "json", env=coi_env.environ())
    assert status == 0, out + err
    assert err == ""
    [published] = records(out, "image")
    assert published["alias"] == alias

    assert coi("image", "exists", alias, env=coi_env.environ()) == (0, "", "")
    status, out, err = coi("image", "list", "--prefix", alias, "--format", "json",
                           env=coi_env.environ())
    assert (status, err) == (0, "")
    [listed] = records(out, "image")
    assert listed == published
    assert listed["aliases"] == [alias]
    assert re.fullmatch(r"[0-9a-f]{64}", listed["fingerprint"])
    assert listed["fingerprint"] == incus_client.image_by_alias(alias)["fingerprint"]
    assert isinstance(listed["size"], int)
    assert listed["size"] > 1_000_000  # a Debian rootfs, even zstd-packed
    assert datetime.fromisoformat(listed["created_at"]) >= before
    assert listed["description"] == "made by a test"
    properties = listed["properties"]
    assert all(key.startswith("coi.") for key in properties)
    assert properties["coi.published_from"] == stopped_container
    published_at = datetime.fromisoformat(properties["coi.published_at"])
    assert before <= published_at <= datetime.now(UTC)


def test_publish_in_text_prints_the_alias_and_full_fingerprint(
        coi_env, rand, import_image, stopped_container, monkeypatch):
    # The text path up to the publish itself, without paying for a second real publish.
    alias = f"{rand}-text"
    fingerprint = import_image(alias)
    monkeypatch.setattr(Incus, "publish", lambda *_a, **_k: fingerprint)
    monkeypatch.setattr(Incus, "image_by_alias", _after_first_call(Incus.image_by_alias))
    status, out, err = run_in_process("image", "publish", stopped_container, alias)
    assert status == 0, err
    assert out == f"published {alias}, fingerprint {fingerprint}\n"
    assert f"publish {stopped_container} as {alias}" in err  # progress goes to stderr


def _after_first_call(real):
    """image_by_alias that says "no such alias" once (the pre-check), then tells the truth."""
    calls = []

    def lookup(self, alias):
        calls.append(alias)
        return None if len(calls) == 1 else real(self, alias)

    return lookup


def test_publish_refuses_a_running_container_saying_to_stop_it(
        coi_env, rand, image_aliases, sources, make_container, incus_client):
    name = make_container(start=False).name
    sources.append(name)
    incus_client.set_state(name, "start")
    alias = f"{rand}-running"
    image_aliases.append(alias)
    status, out, err = coi("image", "publish", name, alias, env=coi_env.environ())
    assert status == EXIT_FAILED
    assert out == ""
    assert err.count("\n") == 1
    assert f"coi container stop {name}" in err
    assert incus_client.image_by_alias(alias) is None


def test_publish_to_an_existing_alias_is_refused_and_changes_nothing(
        coi_env, rand, import_image, stopped_container, incus_client):
    alias = f"{rand}-taken"
    fingerprint = import_image(alias)
    count = len(incus_client.images())
    status, out, err = coi("image", "publish", stopped_container, alias, "--format", "json",
                           env=coi_env.environ())
    assert status == EXIT_FAILED
    assert parse_record(out, "error")["code"] == "already_exists"
    assert err.count("\n") == 1
    assert "already exists" in err
    assert f"coi image delete {alias}" in err
    assert incus_client.image_by_alias(alias)["fingerprint"] == fingerprint
    assert len(incus_client.images()) == count


def test_an_alias_taken_during_the_publish_is_refused_and_leaves_no_unnamed_image(
        coi_env, rand, import_image, stopped_container, incus_client, monkeypatch):
    alias = f"{rand}-race"
    fingerprint = import_image(alias)
    count = len(incus_client.images())
    real_lookup = Incus.image_by_alias
    # The pre-check misses the alias, as if someone took it right after: Incus's own
    # refusal comes after it has made the image.
    monkeypatch.setattr(Incus, "image_by_alias",
                        lambda self, name: None if name == alias else real_lookup(self, name))
    status, out, err = run_in_process("image", "publish", stopped_container, alias,
                                      "--format", "json")
    monkeypatch.undo()
    assert status == EXIT_FAILED
    assert parse_record(out, "error")["code"] == "already_exists"
    assert f"coi image delete {alias}" in err
    assert incus_client.image_by_alias(alias)["fingerprint"] == fingerprint
    assert len(incus_client.images()) == count
    assert not [i for i in incus_client.images()
                if i["properties"].get("coi.published_from") == stopped_container]


def test_publish_of_a_missing_container_is_not_found_in_one_line(coi_env, rand,
                                                                 image_aliases):
    image_aliases.append(f"{rand}-x")
    status, out, err = coi("image", "publish", f"{rand}-nosuch", f"{rand}-x",
                           env=coi_env.environ())
    assert status == EXIT_NOT_FOUND
    assert out == ""
    assert err == f"coi image: container {rand}-nosuch does not exist " \
                  f"(see 'coi list' or 'incus list')\n"


@pytest.mark.parametrize(("container", "alias"), [("bad_name", "ok"), ("ok", "two..dots")])
def test_publish_refuses_invalid_names_with_usage_status(coi_env, container, alias):
    status, out, err = run_in_process("image", "publish", container, alias)
    assert status == EXIT_USAGE
    assert out == ""
    assert err.count("\n") == 1
    assert "name" in err


# -- exists and delete -------------------------------------------------------------------------


def test_exists_is_silent_and_1_for_a_missing_or_invalid_alias(coi_env, rand):
    assert coi("image", "exists", f"{rand}-nosuch", env=coi_env.environ()) == (1, "", "")
    assert run_in_process("image", "exists", "no/such..alias") == (1, "", "")


def test_exists_with_incus_down_is_exit_4_in_one_line(coi_env, stale_socket):
    status, out, err = coi("image", "exists", "coi-test-anything",
                           env=coi_env.environ(COI_INCUS_SOCKET=str(stale_socket)))
    assert (status, out) == (4, "")
    assert err.count("\n") == 1
    assert str(stale_socket) in err


def test_delete_removes_the_image_and_then_exists_is_1(coi_env, rand, import_image):
    alias = f"{rand}-del"
    fingerprint = import_image(alias)
    status, out, err = coi("image", "delete", alias, env=coi_env.environ())
    assert (status, err) == (0, "")
    assert out == f"deleted {alias} ({fingerprint[:12]})\n"
    assert coi("image", "exists", alias, env=coi_env.environ()) == (1, "", "")


def test_delete_says_which_other_aliases_went_with_the_image(coi_env, rand, import_image,
                                                             incus_client):
    alias, other = f"{rand}-del-a", f"{rand}-del-b"
    fingerprint = import_image(alias, more_aliases=(other,))
    status, out, _ = run_in_process("image", "delete", alias)
    assert status == 0
    assert out == f"deleted {alias} ({fingerprint[:12]}); its other aliases went with it: " \
                  f"{other}\n"
    assert incus_client.image_by_alias(other) is None


@pytest.mark.parametrize("digits", [64, 12])
def test_delete_by_fingerprint_or_its_first_12_digits_removes_an_image_without_alias(
        coi_env, unnamed_image, incus_client, digits):
    fingerprint = unnamed_image()
    status, out, err = coi("image", "delete", fingerprint[:digits], env=coi_env.environ())
    assert (status, err) == (0, "")
    assert out == f"deleted image {fingerprint[:12]}\n"
    assert fingerprint not in fingerprints(incus_client)


def test_delete_by_fingerprint_says_which_aliases_went_with_the_image(coi_env, rand,
                                                                     import_image):
    fingerprint = import_image(f"{rand}-by-fp")
    status, out, _ = run_in_process("image", "delete", fingerprint[:16])
    assert status == 0
    assert out == f"deleted image {fingerprint[:12]}; its aliases went with it: {rand}-by-fp\n"


def test_delete_of_a_missing_alias_is_not_found_in_one_line(coi_env, rand):
    status, out, err = coi("image", "delete", f"{rand}-nosuch", env=coi_env.environ())
    assert (status, out) == (EXIT_NOT_FOUND, "")
    assert err == f"coi image: image {rand}-nosuch does not exist " \
                  f"(see 'coi image list --all')\n"


# -- list ------------------------------------------------------------------------------------


def test_list_shows_coi_images_by_default_and_every_image_with_all(coi_env, rand,
                                                                   import_image):
    import_image(f"{rand}-b-coi", properties={"coi.test_tiny": "true", "os": "debian"})
    import_image(f"{rand}-a-plain", properties={"os": "debian"})
    status, out, _ = coi("image", "list", "--prefix", rand, "--format", "json",
                         env=coi_env.environ())
    assert status == 0
    assert [(r["alias"], r["properties"]) for r in records(out, "image")] == [
        (f"{rand}-b-coi", {"coi.test_tiny": "true"})]
    status, out, _ = coi("image", "list", "--all", "--prefix", rand, "--format", "json",
                         env=coi_env.environ())
    assert status == 0
    assert [r["alias"] for r in records(out, "image")] == [f"{rand}-a-plain", f"{rand}-b-coi"]


def test_list_text_is_a_table_sorted_by_alias_with_aliases_comma_joined(coi_env, rand,
                                                                        import_image):
    second = import_image(f"{rand}-z", properties={"coi.x": "1", "description": "last one"})
    first = import_image(f"{rand}-m", age=60, more_aliases=(f"{rand}-a",),
                         properties={"coi.x": "1", "description": "two  names"})
    status, out, err = coi("image", "list", "--prefix", rand, env=coi_env.environ())
    assert (status, err) == (0, "")
    width = len(f"{rand}-a,{rand}-m")
    assert out.splitlines() == [
        f"{'ALIAS'.ljust(width)}  FINGERPRINT   SIZE     CREATED               DESCRIPTION",
        f"{rand}-a,{rand}-m  {first[:12]}  0.0 MiB  2023-11-14 22:14 UTC  two names",
        f"{f'{rand}-z'.ljust(width)}  {second[:12]}  0.0 MiB  2023-11-14 22:13 UTC  last one",
    ]


def test_list_with_nothing_to_show_says_no_images_in_text_and_nothing_in_json(coi_env,
                                                                            rand):
    assert coi("image", "list", "--prefix", rand, env=coi_env.environ()) == \
        (0, "no images\n", "")
    assert coi("image", "list", "--all", "--prefix", rand, "--format", "json",
               env=coi_env.environ()) == (0, '{"coi": 1, "kind": "image_list", "images": []}\n',
                                          "")


def test_list_table_shows_a_dash_for_an_image_without_alias():
    image = manage.Image(aliases=(), fingerprint="ab" * 32, size=3 * 2**20,
                         created_at=datetime(2024, 5, 6, 7, 8, 59, tzinfo=UTC),
                         description="", properties={"coi.x": "1"})
    assert manage.render_table([image]).splitlines()[1] == \
        f"-      {'ab' * 6}  3.0 MiB  2024-05-06 07:08 UTC"
    assert image.record()["alias"] is None


def test_list_with_an_unknown_format_is_a_usage_error_in_one_line(coi_env):
    status, out, err = coi("image", "list", "--format", "yaml", env=coi_env.environ())
    assert (status, out) == (EXIT_USAGE, "")
    assert err == "coi image: unknown format 'yaml'; use text or json\n"


# -- cleanup ---------------------------------------------------------------------------------


def test_cleanup_keeps_exactly_the_n_newest_by_creation_time(coi_env, rand, import_image,
                                                             incus_client):
    prefix = f"{rand}-clean-"
    # Creation order differs from alias order, so sorting by name would keep the wrong ones.
    ages = {1: 40, 2: 10, 3: 30, 4: 20}
    fingerprints = {n: import_image(f"{prefix}{n}", age=age) for n, age in ages.items()}
    outside = import_image(f"{rand}-other", age=0)
    status, out, err = coi("image", "cleanup", prefix, "--keep", "2", "--format", "json",
                           env=coi_env.environ())
    assert (status, err) == (0, "")
    assert [(r["alias"], r["fingerprint"]) for r in records(out, "image_deleted")] == [
        (f"{prefix}2", fingerprints[2]), (f"{prefix}4", fingerprints[4])]
    remaining = {n for n in ages if incus_client.image_by_alias(f"{prefix}{n}") is not None}
    assert remaining == {1, 3}
    assert incus_client.image_by_alias(f"{rand}-other")["fingerprint"] == outside
    assert coi("image", "cleanup", prefix, "--keep", "2", env=coi_env.environ()) == \
        (0, "nothing to clean up\n", "")


def test_a_dry_run_of_cleanup_deletes_nothing_and_plans_the_deletes_the_real_one_makes(
        coi_env, rand, import_image, incus_client, tmp_path):
    prefix = f"{rand}-dry-"
    fingerprints = [import_image(f"{prefix}{n}", age=n) for n in range(3)]
    status, out, err = coi("image", "cleanup", prefix, "--keep", "1", "--dry-run",
                           "--format", "json", env=coi_env.environ())
    assert (status, err) == (0, "")
    plan = [r["call"] for r in (parse_record(line) for line in out.splitlines())
            if r["kind"] == "plan_step"]
    assert plan == [f"DELETE /1.0/images/{fingerprint}?project=default"
                    for fingerprint in fingerprints[:2]]
    assert all(incus_client.image_by_alias(f"{prefix}{n}") for n in range(3))
    trace = tmp_path / "trace"
    status, _, err = coi("image", "cleanup", prefix, "--keep", "1",
                         env={**coi_env.environ(), "COI_TRACE": str(trace)})
    assert (status, err) == (0, "")
    deletes = [line.split()[2:4] for line in trace.read_text().splitlines()
               if line.split()[2] == "DELETE"]
    assert [" ".join(words) for words in deletes] == plan


def test_cleanup_in_text_prints_one_line_per_deleted_image(coi_env, rand, import_image):
    prefix = f"{rand}-nightly-"
    old = import_image(f"{prefix}1", age=0)
    import_image(f"{prefix}2", age=5)
    status, out, err = run_in_process("image", "cleanup", prefix, "--keep", "1")
    assert (status, err) == (0, "")
    assert out == f"deleted {prefix}1 ({old[:12]})\n"


def test_cleanup_spares_an_old_image_that_also_has_an_alias_outside_the_prefix(
        coi_env, rand, import_image, incus_client):
    prefix = f"{rand}-rel-"
    import_image(f"{prefix}1", age=0, more_aliases=(f"{rand}-stable",))
    import_image(f"{prefix}2", age=5)
    status, out, err = run_in_process("image", "cleanup", prefix, "--keep", "1")
    assert (status, out) == (0, "nothing to clean up\n")
    assert err.count("\n") == 1
    assert f"it is also image {rand}-stable" in err
    assert incus_client.image_by_alias(f"{prefix}1") is not None


@pytest.mark.parametrize(("prefix", "keep", "problem"), [
    ("coi-test-x-", "0", "--keep must be a whole number 1 or more, got '0'"),
    ("coi-test-x-", "-1", "--keep must be a whole number 1 or more, got '-1'"),
    ("coi-test-x-", "x", "--keep must be a whole number 1 or more, got 'x'"),
    ("coi-test-x-", "1.5", "--keep must be a whole number 1 or more, got '1.5'"),
    ("", "1", "cleanup needs a non-empty alias prefix"),
    ("  ", "1", "cleanup needs a non-empty alias prefix"),
])
def test_cleanup_refuses_a_bad_keep_or_empty_prefix_with_exit_2(coi_env, prefix, keep,
                                                                problem):
    status, out, err = coi("image", "cleanup", prefix, "--keep", keep, env=coi_env.environ())
    assert (status, out) == (EXIT_USAGE, "")
    assert err.count("\n") == 1
    assert err.startswith(f"coi image: {problem}")


# -- staging (coi_image.aliases) --------------------------------------------------------------


def test_dropping_a_staged_alias_removes_its_image_and_one_incus_made_without_the_alias(
        rand, import_image, unnamed_image, incus_client):
    tmp = f"{rand}-tmp-1"
    stale = import_image(tmp)  # a retry finds what its first attempt left under the alias
    unnamed = unnamed_image(properties={aliases.STAGED_AS: tmp})
    unrelated = unnamed_image(properties={aliases.STAGED_AS: f"{rand}-tmp-2"})
    aliases.drop_tmp_alias(incus_client, tmp, f"{rand}-real")
    left = fingerprints(incus_client)
    assert stale not in left
    assert unnamed not in left
    assert unrelated in left
    assert incus_client.image_by_alias(tmp) is None


def test_dropping_a_staged_alias_keeps_the_image_the_real_alias_points_at(
        rand, import_image, incus_client):
    real, tmp = f"{rand}-real", f"{rand}-tmp-1"
    fingerprint = import_image(real, properties={aliases.STAGED_AS: tmp}, more_aliases=(tmp,))
    aliases.drop_tmp_alias(incus_client, tmp, real)
    assert incus_client.image_by_alias(real)["fingerprint"] == fingerprint
    assert incus_client.image_by_alias(tmp) is None


# -- helpers -------------------------------------------------------------------------------


def run_in_process(*argv):
    """coi_image.main(ARGV) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with (contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          pytest.raises(SystemExit) as exited):
        main(list(argv))
    return exited.value.code, out.getvalue(), err.getvalue()
