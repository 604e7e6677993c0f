"""The test image (tests/image/build.py): what its containers offer, its cache, and the
sweep of what crashed runs leave behind."""

import glob
import hashlib
import ipaddress
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coi_common import proc
from coi_common.errors import NotFound

pytestmark = pytest.mark.incus

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tests" / "image" / "build.py"
PROFILE = "coi"
CODE = {"user": 1000, "env": {"HOME": "/home/code"}}


def test_container_gets_an_ipv4_address_on_the_bridge_within_30_s(make_container,
                                                                  bridge_subnet):
    started = time.monotonic()
    container = make_container()
    assert time.monotonic() - started < 30
    assert ipaddress.IPv4Address(container.ipv4) in bridge_subnet


def test_tool_user_code_is_uid_1000_with_bash_and_home(make_container, run_in):
    name = make_container(start=True).name
    assert run_in(name, ["id", "-u", "code"]).stdout.strip() == "1000"
    entry = run_in(name, ["getent", "passwd", "code"]).stdout.strip().split(":")
    assert entry[2:4] == ["1000", "1000"]
    assert entry[5:] == ["/home/code", "/bin/bash"]
    assert run_in(name, ["stat", "-c", "%u:%g", "/home/code"]).stdout.strip() == "1000:1000"


def test_code_may_sudo_without_a_password(make_container, run_in):
    name = make_container().name
    done = run_in(name, ["sudo", "-n", "true"], **CODE)
    assert done.returncode == 0, done.stderr
    assert run_in(name, ["sudo", "-n", "id", "-u"], **CODE).stdout.strip() == "0"


def test_tmux_and_git_are_installed(make_container, run_in):
    name = make_container().name
    assert run_in(name, ["tmux", "-V"], **CODE).stdout.startswith("tmux ")
    assert run_in(name, ["git", "--version"], **CODE).stdout.startswith("git version ")


def test_dummy_tool_is_installed_and_prints_its_version(make_container, run_in):
    name = make_container().name
    done = run_in(name, ["dummy", "--version"], **CODE)
    assert (done.returncode, done.stdout) == (0, "dummy 1.0\n")
    shipped = hashlib.sha256((ROOT / "lib/coi_common/tools/dummy").read_bytes()).hexdigest()
    listing = run_in(name, ["sh", "-c", "stat -c %a /usr/local/bin/dummy; "
                            "sha256sum /usr/local/bin/dummy"]).stdout.split()
    assert listing[:2] == ["755", shipped]


def test_workspace_exists_empty_and_owned_by_code(make_container, run_in):
    name = make_container(start=True).name
    assert run_in(name, ["find", "/workspace", "-mindepth", "1"]).stdout == ""
    assert run_in(name, ["stat", "-c", "%F %u", "/workspace"]).stdout.strip() == "directory 1000"


def test_hostname_is_the_container_name_and_resolves_locally(make_container, run_in):
    name = make_container().name
    assert run_in(name, ["hostname"]).stdout.strip() == name
    assert run_in(name, ["getent", "hosts", name]).stdout.split()[0] == "127.0.1.1"


def test_image_carries_the_hash_of_the_current_recipe(incus_client, test_image, image_build):
    build = image_build
    image = incus_client.image_by_alias(test_image)
    assert image["properties"]["coi.test_image"] == "true"
    assert image["properties"]["coi.recipe_hash"] == build.recipe_hash(build.debian_mirror())


def test_recipe_hash_changes_with_mirror_and_is_stable(image_build):
    build = image_build
    mirror = build.debian_mirror()
    assert build.recipe_hash(mirror) == build.recipe_hash(mirror)
    assert build.recipe_hash(mirror) != build.recipe_hash(mirror + "/other")


def test_second_build_run_says_up_to_date_in_under_2_s(incus_client, test_image, image_build):
    build = image_build
    # A stale image would make build.py rebuild it here, in the middle of a test run.
    if build.image_hash(incus_client) != build.recipe_hash(build.debian_mirror()):
        pytest.fail("the test image is out of date: run `make test-image` first")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(BUILD)], capture_output=True, text=True,
                          timeout=60, check=False)
    elapsed = time.monotonic() - started
    assert (done.returncode, done.stdout) == (0, "test image up to date\n"), done.stderr
    assert elapsed < 2


def test_failed_build_keeps_the_previous_image_and_leaves_nothing(incus_client, test_image):
    before = incus_client.image_by_alias(test_image)["fingerprint"]
    work_dirs = set(glob.glob("/var/tmp/coi-test-image-build-*"))
    done = subprocess.run([sys.executable, str(BUILD), "--force", "--mirror",
                           "file:///nonexistent-coi-test-mirror"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "Failed getting release file" in done.stderr  # the log's tail is shown
    assert "full log: /var/tmp/coi-test-image-build.log" in done.stderr
    assert "Traceback" not in done.stderr
    assert incus_client.image_by_alias(test_image)["fingerprint"] == before
    assert set(glob.glob("/var/tmp/coi-test-image-build-*")) == work_dirs
    tmp_aliases = [a["name"] for image in incus_client.images()
                   for a in image.get("aliases") or [] if a["name"].startswith("coi-test-tmp-")]
    assert tmp_aliases == []


# -- the sweep -----------------------------------------------------------------------------


@pytest.fixture
def scope(incus_client, sweeper):
    """A prefix part of this test alone; whatever carries it is removed at the end."""
    scope = secrets.token_hex(3) + "-"
    yield scope
    sweeper.sweep(incus_client, scope=scope)


def test_sweep_removes_containers_namespaces_and_nft_tables_of_test_runs(
        incus_client, test_image, sweeper, scope):
    name = f"coi-test-{scope}left"
    netns = f"coi-test-{scope}ns"
    table = f"coi_test_{scope.replace('-', '_')}t"
    incus_client.create_instance(name, test_image, profiles=[PROFILE], start=True)
    proc.run(["ip", "netns", "add", netns])
    proc.run(["nft", "add", "table", "inet", table])
    proc.run(["nft", "add", "table", "bridge", table])

    removed = sweeper.sweep(incus_client, scope=scope)

    assert sorted(removed) == sorted([
        f"removed container {name}", f"removed network namespace {netns}",
        f"removed nft table inet {table}", f"removed nft table bridge {table}"])
    assert not incus_client.instance_exists(name)
    assert netns not in proc.run(["ip", "netns", "list"]).stdout
    assert table not in proc.run(["nft", "list", "tables"]).stdout
    assert sweeper.sweep(incus_client, scope=scope) == []


def test_sweep_leaves_names_outside_its_prefix(incus_client, test_image, sweeper, scope,
                                               container_name):
    assert not container_name.startswith(f"coi-test-{scope}")
    incus_client.create_instance(container_name, test_image, profiles=[PROFILE])
    assert sweeper.sweep(incus_client, scope=scope) == []
    assert incus_client.instance_exists(container_name)


def test_sweep_deletes_test_images_but_keeps_the_cached_test_image(incus_client, test_image,
                                                                   sweeper, scope, tmp_path):
    kept = incus_client.image_by_alias(test_image)["fingerprint"]
    tiny_alias = f"coi-test-{scope}tmp-tiny"
    stray_alias = f"coi-test-{scope}stray"
    (tmp_path / "rootfs" / "etc").mkdir(parents=True)
    (tmp_path / "rootfs" / "etc" / "tiny").write_text("tiny\n")
    (tmp_path / "metadata.yaml").write_text(
        f"architecture: {platform.machine()}\ncreation_date: {int(time.time())}\n"
        f"properties:\n  description: coi test {scope}\n")
    proc.run(["tar", "-C", str(tmp_path), "-czf", str(tmp_path / "tiny.tar.gz"),
              "metadata.yaml", "rootfs"])
    incus_client.cli(["image", "import", str(tmp_path / "tiny.tar.gz"), "--alias", tiny_alias])
    tiny = incus_client.image_by_alias(tiny_alias)["fingerprint"]
    incus_client.cli(["image", "alias", "create", stray_alias, kept])

    removed = sweeper.sweep(incus_client, scope=scope)

    assert sorted(removed) == sorted([f"removed image {tiny[:12]} ({tiny_alias})",
                                      f"removed image alias {stray_alias}"])
    with pytest.raises(NotFound):
        incus_client.request("GET", f"/1.0/images/{tiny}")
    assert incus_client.image_by_alias(stray_alias) is None
    assert incus_client.image_by_alias(test_image)["fingerprint"] == kept


def test_sweep_command_refuses_while_a_test_run_holds_the_lock(make_container):
    # This session holds the run lock (shared) since its first incus test.
    name = make_container(start=False).name
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "sweep.py")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, "")
    assert "test run is in progress" in done.stderr
    assert name in proc.run(["incus", "list", "--format", "csv", "-c", "n"]).stdout


def test_mirror_is_the_first_uri_of_the_first_non_security_deb_stanza(image_build, tmp_path):
    sources = tmp_path / "debian.sources"
    sources.write_text(
        "Types: deb-src\nURIs: http://src.test/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\n"
        "  \n"
        "Types: deb\nURIs: http://mirror.test/debian http://other.test/debian\n"
        "Suites: bookworm bookworm-updates\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n"
        " Comment: not: a field\n")
    assert image_build.debian_mirror(sources) == "http://mirror.test/debian"
    assert image_build.debian_mirror(tmp_path / "missing") == "http://deb.debian.org/debian"
