"""What scripts and configs written for the original coi rely on, as the installed
non-root user in the default (restricted) mode: [[mounts.default]] tables in the user's
config and in the file COI_CONFIG names add mounts to every session; a session the
original saved in its own layout resumes; a session's steps are told in fixed words."""

from __future__ import annotations

import json
import re
import secrets
import shutil

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


def original_session(user_coi, session_id: str):
    """A session as the original coi leaves it in the user's ~/.coi: its own
    metadata.json and the tool's state directory beside it; owned by the user."""
    folder = user_coi.user.home / ".coi" / "sessions-dummy" / session_id
    (folder / ".dummy").mkdir(parents=True)
    (folder / ".dummy" / "history").write_text("from the original\n")
    (folder / "metadata.json").write_text(json.dumps({
        "session_id": session_id, "container_name": "claude-aabbcc-1", "persistent": False,
        "workspace": str(user_coi.workspace), "saved_at": "2024-01-15T10:30:00Z"}))
    for path in (folder.parent.parent, folder.parent, *folder.rglob("*"), folder):
        shutil.chown(path, user_coi.user.uid, user_coi.user.gid)
    return folder


def test_a_session_the_original_saved_resumes_and_its_steps_are_told_in_fixed_words(
        user_coi):
    session_id = f"orig-{secrets.token_hex(4)}"
    folder = original_session(user_coi, session_id)
    before = {p.name: p.read_bytes() for p in (folder / "metadata.json",
                                               folder / ".dummy" / "history")}
    try:
        done = user_coi("run", f"--resume={session_id}", "--", "cat",
                        "/home/code/.dummy/history")
        after = {p.name: p.read_bytes() for p in (folder / "metadata.json",
                                                  folder / ".dummy" / "history")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert (done.returncode, done.stdout) == (0, "from the original\n"), done.stderr
    assert after == before  # the original's directory is left as it was
    steps = [line for line in done.stderr.splitlines() if line.startswith("coi: ")]
    name = re.fullmatch(r"coi: starting (\S+) \(a new container of image \S+\)",
                        steps[0])
    assert name, done.stderr
    container = name.group(1)
    assert f"coi: saving the session of {container}" in steps, done.stderr
    assert any(re.fullmatch(rf"coi: saved session \S+ of {container} \(forked, \d+ files, "
                            r".+\)", line) for line in steps), done.stderr
    assert steps[-1] == f"coi: removed {container}", done.stderr
