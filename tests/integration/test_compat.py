"""What scripts and configs written for the original coi rely on, as the installed
non-root user in the default (restricted) mode: [[mounts.default]] tables in the user's
config and in the file COI_CONFIG names add mounts to every session."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.incus


def test_mounts_default_tables_of_the_user_config_and_coi_config_reach_the_session(user_coi):
    home = user_coi.user.home
    for name in ("data", "extra"):
        user_coi.user.run(["mkdir", "-p", str(home / name)])
        user_coi.user.run(["sh", "-c", f"echo {name} > {home / name / 'marker'}"])
    user_coi.user.run(["mkdir", "-p", str(home / ".config" / "coi")])
    user_coi.user.run(["sh", "-c", "printf '%s\\n' '[[mounts.default]]' 'host = \"~/data\"' "
                       "'container = \"/data\"' 'readonly = true' > "
                       f"{home / '.config' / 'coi' / 'config.toml'}"])
    extra = home / "extra.toml"
    user_coi.user.run(["sh", "-c", "printf '%s\\n' '[[mounts.default]]' "
                       f"'host = \"{home / 'extra'}\"' 'container = \"/extra\"' > {extra}"])
    try:
        plain = user_coi("run", "--", "sh", "-c", "cat /data/marker; "
                         "touch /data/new 2>/dev/null || echo read-only")
        extra_layer = user_coi("run", "--", "sh", "-c",
                               "cat /extra/marker; test -e /data || echo no-data",
                               env={"COI_CONFIG": str(extra)})
    finally:
        user_coi.user.run(["rm", "-f", str(home / ".config" / "coi" / "config.toml")])
    assert (plain.returncode, plain.stdout) == (0, "data\nread-only\n"), plain.stderr
    # COI_CONFIG is a layer above the user's file: its mounts.default replaces theirs.
    assert (extra_layer.returncode, extra_layer.stdout) == (0, "extra\nno-data\n"), \
        extra_layer.stderr


def test_attach_outside_any_workspace_finds_the_running_session_of_another(user_coi,
                                                                         terminal):
    made = user_coi("run", "--persistent", "--", "true")
    assert made.returncode == 0, made.stderr
    elsewhere = user_coi.user.home  # no session was ever started here
    term = terminal(user_coi.argv("attach", "--bash"), None, elsewhere)
    term.wait_for("code@")
    term.type("exit 4")
    term.wait_for("COI-EXITED-4")
