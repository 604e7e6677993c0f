"""The cache key of built images: contents only, so two checkouts (or a moved venv) agree
that an image is up to date, and a change to what goes into the image rebuilds it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coi_common import config, tools
from coi_common.errors import CoiError
from coi_host import config_show
from coi_image import build

ROOT = Path(__file__).resolve().parents[2]
BASE = "coi-test-base@0123456789ab"
CERT = b"-----BEGIN CERTIFICATE-----\nMIIBcoitest\n-----END CERTIFICATE-----\n"


def tools_at(folder: Path) -> list[tools.Tool]:
    """claude and aider, loaded from copies of the shipped definitions in `folder`."""
    folder.mkdir(parents=True)
    for definition in tools.TOOLS_DIR.glob("*.toml"):
        shutil.copy(definition, folder)
    registry = tools.load_registry(shipped_dir=folder)
    return [registry["claude"], registry["aider"]]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_coi_recipe_is_equal_for_the_same_tools_and_certificates_at_two_paths(tmp_path):
    one, two = tools_at(tmp_path / "one"), tools_at(tmp_path / "two")
    assert one[0].source != two[0].source
    cert_one = write(tmp_path / "one" / "proxy.crt", CERT)
    cert_two = write(tmp_path / "two" / "ca" / "other-name.crt", CERT)
    assert build.coi_recipe(BASE, one, [cert_one]) == build.coi_recipe(BASE, two, [cert_two])


def test_coi_recipe_changes_with_each_thing_that_goes_into_the_image(tmp_path):
    selected = tools_at(tmp_path / "tools")
    cert = write(tmp_path / "proxy.crt", CERT)
    other_package = dataclasses.replace(selected[0], install=tools.Install("npm", "other-cli"))
    variants = [
        build.coi_recipe(BASE, selected, [cert]),
        build.coi_recipe("coi-test-base@ba9876543210", selected, [cert]),
        build.coi_recipe(BASE, [other_package, selected[1]], [cert]),
        build.coi_recipe(BASE, selected[:1], [cert]),
        build.coi_recipe(BASE, selected, [write(tmp_path / "changed.crt", CERT + b"\n")]),
        build.coi_recipe(BASE, selected, []),
    ]
    assert len(set(variants)) == len(variants)


def test_coi_recipe_ignores_tool_fields_that_only_matter_at_run_time(tmp_path):
    selected = tools_at(tmp_path / "tools")
    run_time_only = dataclasses.replace(selected[0], description="edited",
                                        autonomous_args=("--edited",), source="elsewhere")
    assert build.coi_recipe(BASE, [run_time_only, selected[1]], []) == \
        build.coi_recipe(BASE, selected, [])


def test_custom_recipe_is_equal_for_one_script_at_two_paths_and_changes_with_its_content(
        tmp_path):
    body = b"#!/bin/sh\necho coi-test > /etc/coi-test\n"
    here = write(tmp_path / "a" / "build.sh", body)
    there = write(tmp_path / "b" / "c" / "other.sh", body)
    edited = write(tmp_path / "edited.sh", body + b"true\n")
    assert build.custom_recipe(here, BASE, []) == build.custom_recipe(there, BASE, [])
    assert build.custom_recipe(edited, BASE, []) != build.custom_recipe(here, BASE, [])
    assert build.custom_recipe(here, "coi-test-other@0123", []) != \
        build.custom_recipe(here, BASE, [])


def test_bumping_the_recipe_version_changes_every_key(tmp_path, monkeypatch):
    script = write(tmp_path / "build.sh", b"true\n")
    before = build.custom_recipe(script, BASE, []), build.coi_recipe(BASE, [], [])
    monkeypatch.setattr(build, "RECIPE_VERSION", build.RECIPE_VERSION + 1)
    after = build.custom_recipe(script, BASE, []), build.coi_recipe(BASE, [], [])
    assert before[0] != after[0]
    assert before[1] != after[1]


RECIPES_OF_A_CHECKOUT = """
import sys
from coi_common import tools
from coi_image import base, build
assert build.__file__.startswith(sys.argv[1]), build.__file__
registry = tools.load_registry()
bootstrap = base.parse("bootstrap:debian/bookworm")
identity = base.identity(None, bootstrap, "http://deb.debian.org/debian")
print(build.coi_recipe(identity, [registry["claude"], registry["dummy"]], []))
print(build.custom_recipe(build.RECIPE, identity, []))
"""


def checkout(folder: Path, comment: str = "") -> Path:
    """A copy of this checkout's coi_common and coi_image, comment added to their Python."""
    for package in ("lib/coi_common", "coi-image/coi_image"):
        shutil.copytree(ROOT / package, folder / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    if comment:
        for module in (folder / "coi-image/coi_image").glob("*.py"):
            module.write_text(module.read_text() + f"# {comment}\n")
    return folder


def recipes_of(folder: Path) -> list[str]:
    # -S: no site-packages, so the copy is imported, not the installed checkout.
    done = subprocess.run(
        [sys.executable, "-S", "-c", RECIPES_OF_A_CHECKOUT, str(folder)], check=False,
        capture_output=True, text=True, env={"PYTHONPATH": f"{folder}/lib:{folder}/coi-image"})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_two_checkouts_that_differ_in_path_and_python_comments_agree_on_the_recipes(
        tmp_path):
    one = recipes_of(checkout(tmp_path / "one"))
    two = recipes_of(checkout(tmp_path / "elsewhere" / "two", comment="only a comment"))
    assert len(one) == 2
    assert one == two


# -- extra CA certificates: never a secret, always a certificate ------------------------------


KEY = (b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE\n"
       b"-----END OPENSSH PRIVATE KEY-----\n")


def settings_with_certificates(coi_env, entries: list[str], *, workspace: Path | None = None
                               ) -> config.Config:
    """The config of a build whose [image] extra_ca_certificates are `entries`: in the
    user config, or (`workspace`) in that workspace's .coi.toml, trusted."""
    text = ("[image]\nhost_ca_certificates = false\n"
            f"extra_ca_certificates = {json.dumps(entries)}\n")
    if workspace is None:
        write(coi_env.config_home / "coi" / "config.toml", text.encode())
        return config.load(None)
    write(workspace / ".coi.toml", text.encode())
    path, sha256 = config.workspace_file(str(workspace))
    config_show.pin(str(coi_env.home / ".coi"), path, sha256)
    return config.load(str(workspace))


def certificate_refusal(settings: config.Config) -> str:
    with pytest.raises(CoiError) as refused:
        build.ca_certificates(settings)
    text = refused.value.one_line()
    assert "\n" not in text
    return text


def test_a_trusted_workspace_file_cannot_bake_an_ssh_key_into_the_image(coi_env, tmp_path):
    write(coi_env.home / ".ssh" / "id_ed25519", KEY)
    workspace = tmp_path / "ws"
    settings = settings_with_certificates(coi_env, ["~/.ssh/id_ed25519"], workspace=workspace)
    text = certificate_refusal(settings)
    assert text.startswith(f"{workspace}/.coi.toml: image.extra_ca_certificates '")
    assert f"lies in {coi_env.home / '.ssh'}, which holds secrets" in text


@pytest.mark.parametrize("secret", [".ssh/id_ed25519", ".aws/credentials", ".netrc"])
def test_not_even_the_users_own_config_names_a_secret_as_a_certificate(coi_env, secret):
    write(coi_env.home / secret, CERT)  # a certificate's content does not make it public
    text = certificate_refusal(settings_with_certificates(coi_env, [f"~/{secret}"]))
    assert "image.extra_ca_certificates" in text
    assert "copy the certificate to a file of its own" in text


def test_a_certificate_linked_to_a_key_is_judged_where_it_points(coi_env):
    write(coi_env.home / ".ssh" / "id_ed25519", KEY)
    (coi_env.home / "proxy.crt").symlink_to(coi_env.home / ".ssh" / "id_ed25519")
    text = certificate_refusal(settings_with_certificates(coi_env, ["~/proxy.crt"]))
    assert f"(it resolves to {coi_env.home / '.ssh' / 'id_ed25519'})" in text


def test_the_environment_of_coi_is_never_read_as_a_certificate(coi_env):
    assert "lies in /proc" in certificate_refusal(
        settings_with_certificates(coi_env, ["/proc/self/environ"]))


def test_a_certificate_file_holding_a_private_key_is_refused(coi_env):
    write(coi_env.home / "certs" / "bundle.pem", CERT + KEY)
    text = certificate_refusal(settings_with_certificates(coi_env, ["~/certs/bundle.pem"]))
    assert "holds a private key" in text


def test_a_file_that_is_no_pem_certificate_is_refused(coi_env):
    write(coi_env.home / "certs" / "notes.txt", b"token=abc\n")
    text = certificate_refusal(settings_with_certificates(coi_env, ["~/certs/notes.txt"]))
    assert "is not a PEM certificate" in text


def test_a_pem_certificate_of_its_own_is_taken_resolved(coi_env):
    cert = write(coi_env.home / "certs" / "proxy.crt", CERT)
    (coi_env.home / "proxy.crt").symlink_to(cert)
    found = build.ca_certificates(settings_with_certificates(coi_env, ["~/proxy.crt"]))
    assert found == (cert,)
