"""Host facts setup decides on: distribution, install plan, subnet, pool driver."""

import ipaddress

import pytest

from coi_host import hostinfo, setup

DEBIAN_12 = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n' \
            "VERSION_CODENAME=bookworm\n"
UBUNTU_2404 = 'ID=ubuntu\nID_LIKE=debian\nVERSION_ID="24.04"\nVERSION_CODENAME=noble\n'


def test_os_release_values_are_unquoted():
    distro = hostinfo.parse_os_release(DEBIAN_12)
    assert (distro.id, distro.version_id, distro.codename) == ("debian", "12", "bookworm")
    assert distro.pretty == "Debian GNU/Linux 12 (bookworm)"


def test_debian_12_installs_incus_from_backports():
    plan = hostinfo.install_plan(hostinfo.parse_os_release(DEBIAN_12))
    assert plan.apt
    assert plan.backports_suite == "bookworm-backports"


@pytest.mark.parametrize("text", [
    UBUNTU_2404,
    "ID=debian\nVERSION_ID=13\nVERSION_CODENAME=trixie\n",
])
def test_newer_debian_and_ubuntu_install_from_the_main_archive(text):
    plan = hostinfo.install_plan(hostinfo.parse_os_release(text))
    assert plan.apt
    assert plan.backports_suite == ""


@pytest.mark.parametrize(("text", "hint"), [
    ("ID=arch\n", "pacman -S incus"),
    ("ID=fedora\nVERSION_ID=40\n", "dnf install incus"),
    ('ID=ubuntu\nVERSION_ID="22.04"\n', "before 24.04"),
    ("ID=gentoo\n", "documentation"),
])
def test_other_distributions_get_instructions_instead_of_apt(text, hint):
    plan = hostinfo.install_plan(hostinfo.parse_os_release(text))
    assert not plan.apt
    assert hint in plan.message


def test_backports_stanza_reuses_the_main_archive_uri_and_key():
    sources = ("Types: deb\nURIs: http://mirror.test/debian\nSuites: bookworm\n"
               "Signed-By: /usr/share/keyrings/k.gpg\n\n"
               "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\n")
    stanza = hostinfo.backports_stanza(sources, "bookworm-backports")
    assert "URIs: http://mirror.test/debian\n" in stanza
    assert "Suites: bookworm-backports\n" in stanza
    assert "Signed-By: /usr/share/keyrings/k.gpg" in stanza


@pytest.mark.parametrize(("zfs", "btrfs", "driver"), [
    (True, True, "zfs"), (False, True, "btrfs"), (False, False, "dir"),
])
def test_pool_driver_prefers_copy_on_write(zfs, btrfs, driver):
    assert hostinfo.choose_pool_driver(zfs, btrfs) == driver


def test_subnet_skips_candidates_that_overlap_networks_in_use():
    used = [ipaddress.IPv4Network("10.151.0.0/16"), ipaddress.IPv4Network("10.152.44.128/25")]
    chosen = setup.pick_subnet(used, ["10.151.43.0/24", "10.152.44.0/24", "10.153.45.0/24"])
    assert chosen == ipaddress.IPv4Network("10.153.45.0/24")


def test_no_free_subnet_is_an_error_with_a_manual_hint():
    used = [ipaddress.IPv4Network("10.0.0.0/8")]
    with pytest.raises(setup.CoiError) as err:
        setup.pick_subnet(used, ["10.1.1.0/24"])
    assert "incus network create" in (err.value.hint or "")


def test_profile_devices_put_root_on_the_pool_and_eth0_on_the_bridge():
    devices = setup.profile_devices("coi", "coibr0")
    assert devices["root"] == {"type": "disk", "path": "/", "pool": "coi"}
    assert devices["eth0"]["network"] == "coibr0"


def _program(folder, name="nft", mode=0o755):
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def test_a_program_off_path_is_found_in_the_sbin_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    sbin = _program(tmp_path / "sbin")
    assert hostinfo.find_program("nft", [str(tmp_path / "none"), str(sbin.parent)]) == str(sbin)


def test_a_program_on_path_wins_over_the_sbin_directories(tmp_path, monkeypatch):
    on_path = _program(tmp_path / "bin")
    sbin = _program(tmp_path / "sbin")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert hostinfo.find_program("nft", [str(sbin.parent)]) == str(on_path)


def test_a_file_that_is_not_executable_is_no_program(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    sbin = _program(tmp_path / "sbin", mode=0o644)
    assert hostinfo.find_program("nft", [str(sbin.parent)]) is None
