"""./install.sh as a normal user: a venv in the user's home, every executable linked into
~/.local/bin, the dispatcher finding its siblings there, and a second run upgrading in place.
Also the harness's own test accounts: the sweep removes those a killed run left."""

import pwd
import secrets
import tomllib
from pathlib import Path

import pytest

from coi_common import __version__, idmap
from coi_common.commands import COMMANDS
from coi_common.protocol import parse_record
from fixtures_users import create_user, remove_user

pytestmark = pytest.mark.incus

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def venv_of(user):
    return user.home / ".local" / "share" / "coi" / "venv"


def test_install_links_every_entry_point_into_local_bin(installed_user):
    bin_dir = installed_user.home / ".local" / "bin"
    for name in SCRIPTS:
        link = bin_dir / name
        assert link.is_symlink(), name
        assert link.resolve().parent == (venv_of(installed_user) / "bin").resolve(), name
    assert sorted(p.name for p in bin_dir.iterdir()) == SCRIPTS


def test_installed_coi_prints_its_version(installed_user):
    done = installed_user.run([str(installed_user.coi), "--version"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"coi {__version__}\n")
    done = installed_user.run(["coi", "version", "--format", "json"])  # through PATH
    assert done.returncode == 0, done.stderr
    assert parse_record(done.stdout, "version")["coi_version"] == __version__


def test_installed_coi_help_lists_every_command(installed_user):
    done = installed_user.run(["coi", "help"])
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")}
    assert listed >= {command.name for command in COMMANDS}


@pytest.mark.parametrize(("page", "first_usage"), [
    ("coi", "coi <command> [<args>...]"), ("coi-shell", "coi shell [--workspace DIR]"),
    ("coi-list", "coi list [--all]"), ("coi-slot", "coi-slot next [--workspace DIR]")])
def test_man_pages_work_for_the_user_after_install(installed_user, page, first_usage):
    done = installed_user.run(["man", "-P", "cat", page], env={"MANWIDTH": "120"})
    assert done.returncode == 0, done.stderr
    assert first_usage in done.stdout
    where = installed_user.run(["man", "-w", page]).stdout.strip()  # the link's target
    linked = installed_user.home / ".local" / "share" / "man" / "man1" / f"{page}.1"
    assert linked.is_symlink()
    assert where == str(linked.resolve())


def test_installed_coi_list_finds_coi_slot_beside_it(installed_user):
    done = installed_user.run(["coi", "list", "--format", "json"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert isinstance(parse_record(done.stdout, "container_list")["active_containers"], list)


def test_a_coi_linked_alone_still_finds_its_siblings(installed_user):
    """A user who links only `coi` somewhere of their own (~/bin) still gets every
    command: the dispatcher also looks beside the link's target, the venv's bin."""
    lonely = installed_user.home / "lonely-bin"
    installed_user.run(["mkdir", "-p", str(lonely)])
    installed_user.run(["ln", "-sf", str(venv_of(installed_user) / "bin" / "coi"),
                        str(lonely / "coi")])
    done = installed_user.run([str(lonely / "coi"), "list", "--format", "json"],
                              env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert isinstance(parse_record(done.stdout, "container_list")["active_containers"], list)


def test_installed_doctor_finds_nft_outside_the_users_path(installed_user):
    done = installed_user.run(["coi", "doctor", "--format", "json"])
    checks = {c["name"]: c for c in parse_record(done.stdout, "doctor")["checks"]}
    assert "sbin" not in installed_user.login_env()["PATH"]
    assert checks["nft"]["ok"], checks["nft"]
    assert checks["nft"]["detail"].endswith("sbin/nft")
    assert "Traceback" not in done.stderr


def test_install_runs_the_users_python_and_never_writes_the_checkout(installed_user):
    python = venv_of(installed_user) / "bin" / "python"
    done = installed_user.run([str(python), "-c", "import sys, coi_common; "
                               "print(sys.base_prefix); print(coi_common.__file__)"])
    base, module = done.stdout.split()
    assert not base.startswith("/root")
    assert module.startswith(str(venv_of(installed_user)))  # not editable
    source = installed_user.source
    assert not (source / "build").exists()
    assert not list(source.glob("*.egg-info"))


def test_install_again_upgrades_in_place_without_modules_removed_since(installed_user):
    extra = installed_user.source / "lib" / "coi_common" / "zz_install_probe.py"
    site = next(venv_of(installed_user).glob("lib/python3*/site-packages"))
    extra.write_text("PROBE = 1\n")
    extra.chmod(0o644)
    try:
        first = installed_user.install()
        assert first.returncode == 0, first.stdout + first.stderr
        assert (site / "coi_common" / "zz_install_probe.py").exists()
    finally:
        extra.unlink()
    # The second run is the Makefile's, as `make install-user` does it.
    second = installed_user.run(["make", "--no-print-directory", "install-user"],
                                cwd=installed_user.source, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert not (site / "coi_common" / "zz_install_probe.py").exists()
    assert installed_user.run(["coi", "list", "--format", "json"]).returncode == 0
    assert f"{installed_user.home}/.local/bin is on your PATH" in second.stdout
    assert "sudo " in second.stdout
    assert "su -c" in second.stdout


def test_install_refuses_a_python_older_than_3_11_before_touching_anything(test_user,
                                                                           checkout_copy):
    data = test_user.home / "refused-data"
    done = test_user.run(["./install.sh"], cwd=checkout_copy,
                         env={"PYTHON": "/bin/false", "XDG_DATA_HOME": str(data)})
    assert done.returncode != 0
    assert "PYTHON=/bin/false is not Python 3.11 or newer" in done.stderr
    assert not data.exists()


def test_install_by_a_user_outside_incus_admin_warns_with_the_fix(make_test_user,
                                                                  checkout_copy):
    outsider = make_test_user(incus_admin=False)
    done = outsider.run(["./install.sh"], cwd=checkout_copy, timeout=300,
                        env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"usermod -aG incus-admin {outsider.name}, then log in again" in done.stderr
    assert f"{outsider.home}/.local/bin is not on your PATH" in done.stdout
    version = outsider.run([str(outsider.home / ".local" / "bin" / "coi"), "--version"])
    assert version.returncode == 0, version.stderr


def test_uninstall_removes_the_users_links_and_venv_and_keeps_saved_sessions(
        make_test_user, checkout_copy):
    user = make_test_user()
    assert user.run(["./install.sh"], cwd=checkout_copy, timeout=300).returncode == 0
    saved = user.home / ".coi" / "sessions-claude"
    user.run(["mkdir", "-p", str(saved)])
    bin_dir, man_dir = user.home / ".local" / "bin", user.home / ".local" / "share" / "man"
    user.run(["ln", "-s", "/bin/true", str(bin_dir / "coi-other-tool")])  # not ours
    done = user.run(["./install.sh", "--uninstall"], cwd=checkout_copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not venv_of(user).exists()
    assert sorted(p.name for p in bin_dir.iterdir()) == ["coi-other-tool"]
    assert list(man_dir.rglob("coi*.1")) == []
    assert saved.is_dir()
    again = user.run(["./install.sh", "--uninstall"], cwd=checkout_copy)
    assert again.returncode == 0
    assert "is not installed" in again.stdout


# -- the harness's test accounts ---------------------------------------------------------


def test_sweep_removes_leftover_test_users_with_home_and_granted_subid_lines(
        incus_client, sweeper, tmp_path):
    scope = f"sw{secrets.token_hex(2)}-"
    user = create_user(f"{scope}x")
    try:
        line = f"root:{user.uid}:1\n"
        for path in (idmap.SUBUID, idmap.SUBGID):
            with open(path, "a") as handle:
                handle.write(line)
        sleeper = user.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo started"])
        assert sleeper.stdout == "started\n"

        removed = sweeper.sweep(incus_client, scope=scope)

        assert f"removed user {user.name} (uid {user.uid})" in removed
        assert f"removed home {user.home}" in removed
        assert f"removed {idmap.SUBUID} line root:{user.uid}:1" in removed
        with pytest.raises(KeyError):
            pwd.getpwnam(user.name)
        assert not user.home.exists()
        assert not idmap.delegated(user.uid, user.gid)
        assert sweeper.sweep(incus_client, scope=scope) == []
    finally:
        remove_user(user)
