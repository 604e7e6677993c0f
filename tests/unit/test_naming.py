"""Container naming, workspace identity and the validators for outside names."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from coi_common import naming
from coi_common.errors import BadInput, NotFound

PREFIX = "coi-test-ab12-"

HOSTILE = [
    "../x",
    "-rf",
    "a/b",
    "",
    "a" * 200,
    "x\0y",
    "has space",
    "tab\there",
    "line\nbreak",
    "caf\u00e9",
    "\u0441oi",  # starts with CYRILLIC SMALL LETTER ES, a look-alike of Latin c
]

VALIDATORS = [
    naming.validate_container_name,
    naming.validate_image_name,
    naming.validate_session_id,
    naming.validate_tool_name,
]


@pytest.fixture
def workspace(tmp_path):
    path = tmp_path / "project"
    path.mkdir()
    return path


def short_id(value: object) -> str:
    text = f"int of {value.bit_length()} bits" if isinstance(value, int) and value > 10**9 \
        else repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


def one_line(exc: BadInput) -> str:
    text = exc.one_line()
    assert "\n" not in text
    return text


# --- workspaces -------------------------------------------------------------


def test_canonical_workspace_resolves_symlink_to_the_same_path(workspace, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(workspace)
    assert naming.canonical_workspace(str(link)) == naming.canonical_workspace(str(workspace))
    assert naming.canonical_workspace(str(link)) == os.path.realpath(workspace)


def test_canonical_workspace_resolves_relative_and_dotdot_spellings(workspace, monkeypatch):
    monkeypatch.chdir(workspace.parent)
    assert naming.canonical_workspace("project/../project") == str(workspace.resolve())


def test_missing_workspace_is_not_found_and_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(NotFound) as caught:
        naming.canonical_workspace(str(missing))
    assert str(missing) in one_line(caught.value)


def test_file_as_workspace_is_bad_input_and_named(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(BadInput) as caught:
        naming.canonical_workspace(str(file))
    assert "file.txt" in one_line(caught.value)
    assert "not a directory" in caught.value.message


@pytest.mark.parametrize("path", ["", "a\0b"])
def test_unusable_workspace_path_is_bad_input(path):
    with pytest.raises(BadInput):
        naming.canonical_workspace(path)


def test_workspace_hash_is_sha256_prefix_of_canonical_path(workspace):
    expected = hashlib.sha256(str(workspace.resolve()).encode()).hexdigest()[:8]
    assert naming.workspace_hash(workspace) == expected


# --- container names --------------------------------------------------------


def test_symlinked_workspace_gets_the_same_container_name(workspace, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(workspace)
    assert (naming.container_name(str(link), 1, PREFIX)
            == naming.container_name(str(workspace), 1, PREFIX))


def test_two_workspaces_get_different_container_names(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    assert naming.container_name(first, 1, PREFIX) != naming.container_name(second, 1, PREFIX)


def test_container_name_is_prefix_hash_slot_and_valid(workspace):
    name = naming.container_name(workspace, 3, PREFIX)
    assert name == f"{PREFIX}{naming.workspace_hash(workspace)}-3"
    assert naming.validate_container_name(name) == name


def test_slots_of_one_workspace_get_different_names(workspace):
    first = naming.container_name(workspace, 1, PREFIX)
    assert first != naming.container_name(workspace, 2, PREFIX)


@pytest.mark.parametrize("slot", [0, -1, True, 1.0, None, naming.SLOT_CEILING + 1])
def test_container_name_refuses_a_slot_that_is_not_a_positive_int(workspace, slot):
    with pytest.raises(BadInput):
        naming.container_name(workspace, slot, PREFIX)


def test_container_name_uses_prefix_from_environment(workspace, monkeypatch):
    monkeypatch.setenv("COI_CONTAINER_PREFIX", "coi-env-")
    assert naming.container_name(workspace, 1).startswith("coi-env-")


def test_container_prefix_defaults_to_coi():
    assert naming.container_prefix({}) == "coi-"
    assert naming.container_prefix({"COI_CONTAINER_PREFIX": ""}) == "coi-"


def test_container_prefix_comes_from_the_given_environment():
    assert naming.container_prefix({"COI_CONTAINER_PREFIX": PREFIX}) == PREFIX


@pytest.mark.parametrize("bad", [
    "coi", "Coi-", "1coi-", "-coi-", "coi_", "coi-x/", "c\u00f6i-", "coi -", "a" * 20 + "-",
    "../", "coi-\0-",
])
def test_bad_container_prefix_is_refused_naming_the_variable(bad):
    with pytest.raises(BadInput) as caught:
        naming.container_prefix({"COI_CONTAINER_PREFIX": bad})
    assert "COI_CONTAINER_PREFIX" in one_line(caught.value)


@pytest.mark.parametrize("good", ["c-", "coi-", "coi-test-ab12-", "a" * 19 + "-", "x--"])
def test_good_container_prefix_is_accepted(good):
    assert naming.validate_prefix(good) == good


def test_parse_container_name_round_trips(workspace):
    for slot in (1, 10, 999):
        name = naming.container_name(workspace, slot, PREFIX)
        assert naming.parse_container_name(name, PREFIX) == (naming.workspace_hash(workspace), slot)


@pytest.mark.parametrize("foreign", [
    "coi-abcdef01-1",            # another prefix
    "coi-test-ab12-abcdef0-1",   # hash too short
    "coi-test-ab12-abcdef012-1",  # hash too long
    "coi-test-ab12-ABCDEF01-1",  # uppercase hash
    "coi-test-ab12-abcdef01-0",  # slot 0 is never a container
    "coi-test-ab12-abcdef01-01",  # leading zero
    "coi-test-ab12-abcdef01-1000",
    "coi-test-ab12-abcdef01",
    "coi-test-ab12-abcdef01-1-x",
    "coi-test-ab12-abcdef01-1\n",
    "my-web-server",
    "",
    None,
    42,
])
def test_parse_container_name_rejects_foreign_names(foreign):
    assert naming.parse_container_name(foreign, PREFIX) is None


def test_parse_container_name_does_not_claim_names_of_a_longer_prefix():
    assert naming.parse_container_name("coi-test-ab12-abcdef01-1", "coi-") is None
    assert naming.parse_container_name("coi-abcdef01-1", "coi-") == ("abcdef01", 1)


def test_parse_container_name_reads_prefix_from_environment(monkeypatch):
    monkeypatch.setenv("COI_CONTAINER_PREFIX", PREFIX)
    assert naming.parse_container_name(f"{PREFIX}abcdef01-2") == ("abcdef01", 2)
    assert naming.parse_container_name("coi-abcdef01-2") is None


# --- validators -------------------------------------------------------------


@pytest.mark.parametrize("validator", VALIDATORS, ids=lambda v: v.__name__)
@pytest.mark.parametrize("hostile", HOSTILE, ids=short_id)
def test_every_validator_refuses_hostile_input_in_one_line(validator, hostile):
    with pytest.raises(BadInput) as caught:
        validator(hostile)
    one_line(caught.value)


@pytest.mark.parametrize("validator", VALIDATORS, ids=lambda v: v.__name__)
@pytest.mark.parametrize("value", [None, 1, b"abc", ["a"]], ids=repr)
def test_every_validator_refuses_non_strings(validator, value):
    with pytest.raises(BadInput, match="must be a string"):
        validator(value)


def test_validator_message_names_the_kind_and_the_value():
    with pytest.raises(BadInput) as caught:
        naming.validate_image_name("../x")
    text = one_line(caught.value)
    assert "image name" in text
    assert "'../x'" in text


def test_validator_message_shortens_very_long_values():
    with pytest.raises(BadInput) as caught:
        naming.validate_session_id("a" * 5000)
    assert len(one_line(caught.value)) < 300
    assert "too long" in caught.value.message


@pytest.mark.parametrize("good", ["a", "coi-abcdef01-1", "A1", "a--b", "a" * 63])
def test_validate_container_name_accepts_incus_names(good):
    assert naming.validate_container_name(good) == good


@pytest.mark.parametrize("bad", ["1abc", "abc-", "a_b", "a.b", "a" * 64])
def test_validate_container_name_refuses_what_incus_refuses(bad):
    with pytest.raises(BadInput):
        naming.validate_container_name(bad)


@pytest.mark.parametrize("good", ["coi", "coi-base", "coi_base.v2", "9lives", "a" * 128])
def test_validate_image_name_accepts_aliases(good):
    assert naming.validate_image_name(good) == good


@pytest.mark.parametrize("bad", ["a..b", ".hidden", "_x", "images:debian/12", "a" * 129])
def test_validate_image_name_refuses_paths_and_odd_starts(bad):
    with pytest.raises(BadInput):
        naming.validate_image_name(bad)


@pytest.mark.parametrize("good", ["20250101-120000-abcdef", "s", "A_b-1", "a" * 64])
def test_validate_session_id_accepts_ids(good):
    assert naming.validate_session_id(good) == good


@pytest.mark.parametrize("bad", ["_x", "a.b", "a" * 65])
def test_validate_session_id_refuses_odd_ids(bad):
    with pytest.raises(BadInput):
        naming.validate_session_id(bad)


@pytest.mark.parametrize("good", ["claude", "aider", "gemini-cli", "codex_2", "a" * 32])
def test_validate_tool_name_accepts_tool_names(good):
    assert naming.validate_tool_name(good) == good


@pytest.mark.parametrize("bad", ["Claude", "2fast", "_x", "a.b", "a" * 33])
def test_validate_tool_name_refuses_odd_names(bad):
    with pytest.raises(BadInput):
        naming.validate_tool_name(bad)


# --- slots ------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (10, 10), ("1", 1), ("7", 7)])
def test_validate_slot_accepts_ints_and_decimal_strings_in_range(value, expected):
    assert naming.validate_slot(value) == expected


@pytest.mark.parametrize("bad", [
    0, "0", 11, "11", -1, "-1", 1.5, "1.5", "01x", "01", "", " 1", "1 ", "+1", "1_0",
    "\uff11",  # fullwidth digit one, which int() would accept
    True, False, None, [1], "9" * 5000, 10**5000,
], ids=short_id)
def test_validate_slot_refuses_out_of_range_and_malformed(bad):
    with pytest.raises(BadInput):
        naming.validate_slot(bad)


def test_validate_slot_zero_means_auto_only_when_allowed():
    assert naming.validate_slot(0, allow_auto=True) == naming.AUTO_SLOT
    assert naming.validate_slot("0", allow_auto=True) == 0
    with pytest.raises(BadInput, match=re.escape("out of range 1..10")):
        naming.validate_slot(0)


def test_validate_slot_honours_max_slots():
    assert naming.validate_slot(3, max_slots=3) == 3
    with pytest.raises(BadInput, match=re.escape("out of range 1..3")):
        naming.validate_slot(4, max_slots=3)


@pytest.mark.parametrize("max_slots", [0, -1, True, "10", naming.SLOT_CEILING + 1])
def test_validate_slot_refuses_a_bad_max_slots(max_slots):
    with pytest.raises(BadInput, match="max_slots"):
        naming.validate_slot(1, max_slots=max_slots)


# -- host paths a session may mount --------------------------------------------------------


HOME = "/home/dev"


def mount_refusal(path: str, home: str = HOME, **flags: bool) -> str:
    """The one-line message check_host_mount refuses `path` with."""
    with pytest.raises(BadInput) as refused:
        naming.check_host_mount(path, "--mount", home, **flags)
    return one_line(refused.value)


@pytest.mark.parametrize(("path", "why", "flag"), [
    ("/", "whole host filesystem", None),
    ("/var/lib/incus", "/var/lib/incus, Incus's own state", None),
    ("/var/lib/incus/unix.socket", "/var/lib/incus, Incus's own state", None),
    ("/var/lib", "/var/lib/incus, Incus's own state", None),
    ("/run/incus", "/run/incus, Incus's own state", None),
    ("/run", "/run/incus, Incus's own state", None),
    ("/home/dev/.ssh", "credentials store /home/dev/.ssh", "--force"),
    ("/home/dev/.ssh/keys", "credentials store /home/dev/.ssh", "--force"),
    ("/home/dev/.gnupg", "credentials store /home/dev/.gnupg", "--force"),
    ("/home/dev/.config/gcloud", "credentials store /home/dev/.config/gcloud", "--force"),
    ("/home/dev/.netrc", "credentials store /home/dev/.netrc", "--force"),
    ("/home/dev/.coi", "coi's own config and state /home/dev/.coi", "--force"),
    ("/home/dev/.config/coi", "coi's own config and state /home/dev/.config/coi", "--force"),
    ("/home", "holds your home directory /home/dev", "--force"),
    ("/etc", "lies in /etc", "--force"),
    ("/etc/ssl", "lies in /etc", "--force"),
    ("/root", "lies in /root", "--force"),
    ("/run/docker.sock", "lies in /run/docker.sock", "--force"),
    ("/run/user/1000", "lies in /run/user", "--force"),
    ("/home/dev", "your home directory /home/dev", "--allow-home"),
    ("/home/dev/.config", "holds the credentials store /home/dev/.config/", "--allow-home"),
    ("/home/dev/.local", "holds the credentials store /home/dev/.local/share/", "--allow-home"),
])
def test_mounting_the_filesystem_home_secrets_or_system_paths_is_refused_naming_the_flag(
        path, why, flag):
    text = mount_refusal(path)
    assert repr(path) in text
    assert why in text
    if flag:
        assert f"pass {flag} if you mean it" in text
    else:
        assert "no flag allows this mount" in text
        assert "--force" not in text
        assert "--allow-home" not in text


@pytest.mark.parametrize("path", ["/home/dev/src/app", "/tmp/project", "/srv/data",
                                  "/home/dev/.config/coi-projects/x", "/home/dev/.sshx",
                                  "/home/devx", "/var/lib/incus-projects/x"])
def test_a_project_directory_may_be_mounted(path):
    assert naming.check_host_mount(path, "workspace", HOME) == path


@pytest.mark.parametrize("path", ["/home/dev", "/home/dev/.config", "/home/dev/.local/share"])
def test_allow_home_permits_the_home_and_directories_between_it_and_a_project(path):
    mount_refusal(path)
    assert naming.check_host_mount(path, "--mount", HOME, allow_home=True) == path


@pytest.mark.parametrize("path", ["/", "/home", "/etc", "/root", "/var/lib/incus",
                                  "/home/dev/.ssh", "/home/dev/.ssh/id_ed25519",
                                  "/home/dev/.aws", "/home/dev/.git-credentials"])
def test_allow_home_still_refuses_the_filesystem_system_paths_and_credential_stores(path):
    assert "--allow-home" not in mount_refusal(path, allow_home=True)


@pytest.mark.parametrize("path", ["/home/dev/.ssh", "/home/dev/.aws/credentials", "/etc",
                                  "/root", "/home", "/home/dev", "/run/docker.sock",
                                  "/home/dev/.coi", "/dev"])
def test_force_lifts_every_refusal_but_the_filesystem_and_incus(path):
    mount_refusal(path)
    assert naming.check_host_mount(path, "--mount", HOME, force=True) == path


@pytest.mark.parametrize("path", ["/", "/var", "/var/lib", "/var/lib/incus",
                                  "/var/lib/incus/unix.socket", "/run", "/run/incus"])
def test_force_never_mounts_the_filesystem_or_incus_state_and_sockets(path):
    text = mount_refusal(path, force=True, allow_home=True)
    assert "no flag allows this mount" in text


def test_when_root_runs_coi_a_project_under_root_is_a_project_and_root_a_home():
    assert naming.check_host_mount("/root/src/app", "workspace", "/root") == "/root/src/app"
    assert "--allow-home" in mount_refusal("/root", home="/root")
    assert "credentials store /root/.ssh" in mount_refusal("/root/.ssh", home="/root",
                                                            allow_home=True)
    assert "lies in /root" in mount_refusal("/root/src/app")  # someone else's home


def test_a_symlink_is_judged_by_where_it_points(tmp_path):
    link = tmp_path / "innocent"
    link.symlink_to("/etc")
    assert "lies in /etc" in mount_refusal(str(link))


@pytest.fixture
def home_with_keys(tmp_path):
    """A home with ~/.ssh/id_ed25519 and ~/.aws/credentials, and a project beside them."""
    home = tmp_path / "home"
    for secret in (".ssh/id_ed25519", ".aws/credentials"):
        (home / secret).parent.mkdir(parents=True)
        (home / secret).write_text("secret\n")
    (home / "src" / "app").mkdir(parents=True)
    return home


def test_a_symlink_into_ssh_is_resolved_and_refused(home_with_keys):
    link = home_with_keys / "src" / "app" / "keys"
    link.symlink_to(home_with_keys / ".ssh")
    text = mount_refusal(str(link), home=str(home_with_keys))
    assert f"credentials store {home_with_keys / '.ssh'}" in text
    assert naming.check_host_mount(str(home_with_keys / "src" / "app"), "workspace",
                                   str(home_with_keys)) == str(home_with_keys / "src" / "app")


def test_a_credentials_store_reached_through_a_link_is_guarded_where_it_lives(tmp_path):
    home, vault = tmp_path / "home", tmp_path / "vault" / "ssh"
    vault.mkdir(parents=True)
    home.mkdir()
    (home / ".ssh").symlink_to(vault)
    assert f"credentials store {vault}" in mount_refusal(str(vault.parent), home=str(home))


# -- container-side mount targets -----------------------------------------------------------


FIXED = [("the workspace", "/workspace"), ("--storage", "/storage")]


def target_refusal(targets) -> str:
    with pytest.raises(BadInput) as refused:
        naming.check_mount_targets(targets)
    return one_line(refused.value)


def test_separate_targets_are_accepted_also_when_one_name_starts_another():
    naming.check_mount_targets([*FIXED, ("--mount /a", "/data"), ("--mount /b", "/data2"),
                                ("--mount /c", "/workspaces"), ("--mount /d", "/opt/x/y")])


def test_two_mounts_at_one_target_are_refused_naming_both():
    text = target_refusal([*FIXED, ("--mount /a", "/data"), ("--mount /b", "/data")])
    assert "--mount /b and --mount /a both mount at '/data'" in text


@pytest.mark.parametrize("target", ["/workspace", "/storage"])
def test_a_mount_at_the_workspace_or_storage_target_collides_with_it(target):
    text = target_refusal([*FIXED, ("--mount /a", target)])
    assert f"both mount at {target!r}" in text
    assert "--mount /a" in text


@pytest.mark.parametrize(("outer", "inner"), [("/data", "/data/x"), ("/data/x", "/data"),
                                              ("/workspace", "/workspace/sub")])
def test_nested_targets_are_refused_naming_both(outer, inner):
    first, second = ("--mount /one", outer), ("--mount /two", inner)
    targets = [("--storage", "/storage"), first, second]
    if outer != "/workspace":
        targets.insert(0, ("the workspace", "/workspace"))
    text = target_refusal(targets)
    assert repr(outer) in text
    assert repr(inner) in text
    assert "one inside the other" in text


@pytest.mark.parametrize(("target", "why"), [
    ("data", "absolute path"),
    ("", "absolute path"),
    ("/da\nta", "printable"),
    ("/da\0ta", "printable"),
    (None, "absolute path"),
    ("/", "hide the container's own filesystem"),
    ("/data/../etc", "not normalised"),
    ("/data/./x", "not normalised"),
    ("/data/", "not normalised"),
    ("//data", "not normalised"),
    ("/data//x", "not normalised"),
])
def test_a_target_that_is_not_an_absolute_normalised_path_is_refused(target, why):
    text = target_refusal([*FIXED, ("--mount /a", target)])
    assert why in text
    assert text.startswith("--mount /a target")


# -- host paths coi reads to copy into a container or an image --------------------------------


def secret_refusal(path: str, home: str, **kwargs: str) -> str:
    with pytest.raises(BadInput) as refused:
        naming.check_secret_path(path, "/ws/.coi.toml: image.extra_ca_certificates", home,
                                 **kwargs)
    text = one_line(refused.value)
    assert text.startswith("/ws/.coi.toml: image.extra_ca_certificates ")
    return text


@pytest.mark.parametrize("secret", [".ssh/id_ed25519", ".aws/credentials"])
def test_a_file_in_a_credentials_store_is_never_read_for_a_container(home_with_keys, secret):
    text = secret_refusal(str(home_with_keys / secret), str(home_with_keys))
    assert f"lies in {home_with_keys / secret.split('/')[0]}, which holds secrets" in text


def test_a_credential_file_of_its_own_is_refused_too(tmp_path):
    (tmp_path / ".netrc").write_text("machine x password y\n")
    assert f"lies in {tmp_path / '.netrc'}" in secret_refusal(str(tmp_path / ".netrc"),
                                                              str(tmp_path))


def test_a_symlink_to_a_key_is_resolved_and_refused_saying_where_it_points(home_with_keys):
    link = home_with_keys / "proxy-ca.crt"
    link.symlink_to(home_with_keys / ".ssh" / "id_ed25519")
    text = secret_refusal(str(link), str(home_with_keys))
    assert f"(it resolves to {home_with_keys / '.ssh' / 'id_ed25519'})" in text


@pytest.mark.parametrize(("path", "place"), [("/proc/self/environ", "/proc"),
                                             ("/etc/shadow", "/etc/shadow"),
                                             ("/etc/ssh/ssh_host_ed25519_key", "/etc/ssh"),
                                             ("/root/.ssh/id_ed25519", "/root")])
def test_secret_system_paths_are_never_read_for_a_container(path, place):
    assert f"lies in {place}, which holds secrets" in secret_refusal(path, HOME)


def test_the_refusal_of_a_secret_carries_the_callers_hint(home_with_keys):
    text = secret_refusal(str(home_with_keys / ".ssh" / "id_ed25519"), str(home_with_keys),
                          hint="copy the certificate to a file of its own")
    assert text.endswith("(copy the certificate to a file of its own)")


@pytest.mark.parametrize("path", ["/etc/ssl/certs/proxy.pem", "/usr/local/share/x.crt",
                                  "/home/dev/certs/proxy.crt", "/home/dev/.sshx/ca.crt"])
def test_ordinary_files_may_be_read(path):
    assert naming.check_secret_path(path, "key", HOME) == path


def test_when_root_runs_coi_its_own_files_may_be_read_but_not_its_keys():
    assert naming.check_secret_path("/root/ca.crt", "key", "/root") == "/root/ca.crt"
    assert "lies in /root/.ssh" in secret_refusal("/root/.ssh/id_ed25519", "/root")
