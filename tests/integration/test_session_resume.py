"""Saving, restoring and resuming sessions against real containers of the test image.

coi runs as its main user: the installed non-root member of incus-admin
(`user_coi`), in the default network mode, so sessions are saved into that
user's own ~/.coi. The AI tool is the `dummy` stand-in: it keeps one line
per input in ~/.dummy/history and prints `dummy: N lines of history` when it
starts, so a restored session shows itself by its count. Interactive flows
run `coi shell` in a tmux session on the host (the `terminal` fixture of
conftest); the rest uses `coi run` and `coi session` directly.
"""

import contextlib
import hashlib
import json
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from coi_common import naming
from coi_common.sessions import SlotRecord
from coi_session import saved_sessions
from coi_session.saved_sessions import MASKED_KEY, SESSION_ID_KEY

pytestmark = pytest.mark.incus


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def other_workspace(user_coi, incus_client):
    """A second workspace of the user; its containers and the directory go at the end."""
    path = Path(tempfile.mkdtemp(prefix="coi-test-ws-", dir="/tmp"))
    shutil.chown(path, user_coi.user.uid, user_coi.user.gid)
    yield path
    for instance in incus_client.instances(f"{user_coi.prefix}{naming.workspace_hash(path)}-"):
        incus_client.delete_instance_force(instance["name"])
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home_file(user_coi):
    """home_file(RELATIVE, TEXT): a file of the user's home, written by the user; what
    it made under the home is removed at the end (the home outlives the test)."""
    user = user_coi.user
    made = []

    def write(relative, text):
        path = user.home / relative
        fresh = [p for p in (path, *path.parents)
                 if p.is_relative_to(user.home) and p != user.home and not p.exists()]
        if fresh:
            made.append(fresh[-1])  # the outermost one this write creates
        done = user.run(["sh", "-c", 'mkdir -p "${1%/*}" && cat > "$1"', "-", str(path)],
                        input_text=text)
        assert done.returncode == 0, done.stderr
        return path

    yield write
    for path in made:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def saved(user_coi, workspace):
    """The saved sessions (records) of one workspace, newest first."""
    listed = user_coi("session", "list", "--workspace", str(workspace), "--format", "json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)["sessions"]


def saved_history(record):
    return (Path(record["path"]) / "home" / ".dummy" / "history").read_text()


def container(user_coi, workspace, slot):
    return naming.container_name(str(workspace), slot, user_coi.prefix)


def containers_of(client, user_coi, workspace):
    return [i["name"] for i in client.instances(f"{user_coi.prefix}"
                                                f"{naming.workspace_hash(workspace)}-")]


def as_code(run_in, name, script):
    done = run_in(name, ["sh", "-c", script], user=1000, env={"HOME": "/home/code"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def write_history(user_coi, workspace, lines, *extra):
    """A `coi run` that appends lines to the dummy's history; its end saves the session."""
    script = "mkdir -p ~/.dummy && " + " && ".join(f"echo {line} >> ~/.dummy/history"
                                                   for line in lines)
    done = user_coi("run", "--workspace", str(workspace), *extra, "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    return done


def type_lines_and_poweroff(term, lines):
    for line in lines:
        term.type(line)
        term.wait_for(f"dummy: noted {line}")
    term.type("/exit")
    term.type("sudo poweroff")
    term.wait_for("COI-EXITED-0", timeout=90)


# -- resume through coi shell -------------------------------------------------------------------


def test_poweroff_saves_the_session_and_resume_restores_it_in_a_fresh_container(
        user_coi, terminal, incus_client):
    workspace = user_coi.workspace
    term = terminal(user_coi.argv("shell"), None, workspace)
    term.wait_for("dummy: 0 lines of history")
    type_lines_and_poweroff(term, ["first line", "second line"])
    assert containers_of(incus_client, user_coi, workspace) == []
    sessions = saved(user_coi, workspace)
    assert len(sessions) == 1, term.screen()
    [session] = sessions
    assert saved_history(session) == "first line\nsecond line\n"
    assert session["workspace"] == str(workspace)
    assert Path(session["path"]).is_relative_to(user_coi.user.home / ".coi")
    assert f"session {session['id']}" in term.screen()

    again = terminal(user_coi.argv("shell", "--resume"), None, workspace)
    again.wait_for("dummy: 2 lines of history")
    again.wait_for("dummy: resumed")
    type_lines_and_poweroff(again, ["third line"])
    [continued] = saved(user_coi, workspace)
    assert continued["id"] == session["id"]
    assert continued["updated_at"] > session["updated_at"]
    assert saved_history(continued) == "first line\nsecond line\nthird line\n"
    listed = json.loads(user_coi("list", "--all", "--format", "json").stdout)
    assert session["id"] in [s["ID"] for s in listed["saved_sessions"]]


def test_another_workspace_finds_nothing_and_starts_fresh(user_coi, other_workspace, terminal):
    write_history(user_coi, user_coi.workspace, ["from-a"])
    term = terminal(user_coi.argv("shell", "--resume"), None, other_workspace)
    term.wait_for("dummy: 0 lines of history")
    assert "dummy: resumed" not in term.screen()
    term.keys("C-b", "d")
    term.wait_for("COI-EXITED-0")
    assert f"no saved dummy session for {other_workspace}; starting fresh" in term.screen()


@pytest.mark.parametrize("flag", ["--resume", "--continue"])
def test_resume_of_another_workspaces_id_is_refused_in_one_line(
        user_coi, other_workspace, terminal, incus_client, flag):
    write_history(user_coi, user_coi.workspace, ["from-a"])
    [session] = saved(user_coi, user_coi.workspace)
    # A real terminal: without one, coi shell stops before it looks at the id.
    term = terminal(user_coi.argv("shell", f"{flag}={session['id']}"), None, other_workspace)
    term.wait_for("COI-EXITED-")
    lines = [line for line in term.screen().splitlines() if line.strip()]
    assert lines[-1] == "COI-EXITED-1", lines
    assert len(lines) == 2, lines  # the refusal is one line
    assert "belongs to another workspace" in lines[0]
    assert containers_of(incus_client, user_coi, other_workspace) == []
    # The refusal gave the reserved slot back: the next session gets slot 1.
    write_history(user_coi, other_workspace, ["b"])
    assert saved(user_coi, other_workspace)[0]["slot"] == 1


def test_a_malformed_session_id_is_a_one_line_usage_error(user_coi, incus_client):
    done = user_coi("run", "--resume=../../etc", "--", "true")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert containers_of(incus_client, user_coi, user_coi.workspace) == []


def test_slots_save_separate_sessions_and_resume_picks_the_latest(user_coi):
    workspace = user_coi.workspace
    write_history(user_coi, workspace, ["one"], "--slot", "1")
    write_history(user_coi, workspace, ["two-a", "two-b"], "--slot", "2")
    sessions = saved(user_coi, workspace)
    assert [s["slot"] for s in sessions] == [2, 1]
    slot2, slot1 = sessions
    assert slot1["id"] != slot2["id"]
    resumed = user_coi("run", "--resume", "--", "cat", "/home/code/.dummy/history")
    assert resumed.stdout == "two-a\ntwo-b\n", resumed.stderr
    write_history(user_coi, workspace, ["one-more"], f"--resume={slot1['id']}")
    assert saved(user_coi, workspace)[0]["id"] == slot1["id"]
    resumed = user_coi("run", "--continue", "--", "cat", "/home/code/.dummy/history")
    assert resumed.stdout == "one\none-more\n", resumed.stderr


def test_a_persistent_container_resumes_a_session_saved_by_an_ephemeral_one(user_coi,
                                                                            incus_client):
    write_history(user_coi, user_coi.workspace, ["ephemeral"], "--slot", "1")
    done = user_coi("run", "--persistent", "--slot", "2", "--resume", "--", "cat",
                    "/home/code/.dummy/history")
    assert done.stdout == "ephemeral\n", done.stderr
    assert incus_client.instance_exists(container(user_coi, user_coi.workspace, 2))


# -- credentials and settings --------------------------------------------------------------------


def test_credentials_are_injected_fresh_never_saved_and_settings_are_merged(user_coi,
                                                                            home_file):
    home_file(".config/coi/config.toml", "[tools.dummy]\ninject_credentials = true\n")
    credentials = home_file(".dummy/credentials.json", '{"token": "host-token-1"}')
    home_file(".dummy/settings.json", '{"theme": "host", "permissions": {"allow": ["ls"]}}')
    home_file(".dummy/private-notes", "never in a container")
    done = user_coi("run", "--", "sh", "-c",
                    "cat ~/.dummy/credentials.json; echo; cat ~/.dummy/settings.json; "
                    "ls -A ~/.dummy; stat -c %u ~/.dummy/credentials.json; "
                    "echo line >> ~/.dummy/history")
    assert done.returncode == 0, done.stderr
    first_line, rest = done.stdout.split("\n", 1)
    assert first_line == '{"token": "host-token-1"}'
    settings = json.loads(rest[:rest.rindex("}") + 1])
    assert settings == {"theme": "host", "managed_by": "coi",
                        "permissions": {"allow": ["ls"], "mode": "autonomous"}}
    assert "private-notes" not in done.stdout
    assert done.stdout.splitlines()[-1] == "1000"

    [session] = saved(user_coi, user_coi.workspace)
    kept = Path(session["path"]) / "home" / ".dummy"
    assert sorted(p.name for p in kept.iterdir()) == ["history", "settings.json"]
    assert json.loads((kept / "settings.json").read_text())["theme"] == "host"

    assert home_file(".dummy/credentials.json", '{"token": "host-token-2"}') == credentials
    again = user_coi("run", "--resume", "--", "cat", "/home/code/.dummy/credentials.json")
    assert again.stdout == '{"token": "host-token-2"}', again.stderr


# -- untrusted container contents -------------------------------------------------------------


def test_a_planted_symlink_and_fifo_are_dropped_and_the_host_is_untouched(user_coi, run_in):
    passwd = Path("/etc/passwd")
    before = (hashlib.sha256(passwd.read_bytes()).hexdigest(), passwd.stat().st_mtime_ns)
    write_history(user_coi, user_coi.workspace, ["kept"], "--persistent", "--slot", "1")
    name = container(user_coi, user_coi.workspace, 1)
    as_code(run_in, name, "ln -s /etc/passwd ~/.dummy/evil && mkfifo ~/.dummy/fifo && "
                          "ln -s / ~/.dummy/root")
    done = user_coi("session", "save", name, "--format", "json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dropped"] == 3
    assert sorted(p.split("'")[1] for p in result["dropped_paths"]) == [
        ".dummy/evil", ".dummy/fifo", ".dummy/root"]
    kept = Path(result["path"]) / "home" / ".dummy"
    assert sorted(p.name for p in kept.iterdir()) == ["history", "settings.json"]
    assert not any(p.is_symlink() for p in kept.parent.rglob("*"))
    assert (hashlib.sha256(passwd.read_bytes()).hexdigest(), passwd.stat().st_mtime_ns) == before

    as_code(run_in, name, "rm -rf ~/.dummy && ln -s /etc ~/.dummy")
    done = user_coi("session", "save", name, "--format", "json")
    assert json.loads(done.stdout)["saved"] is False, done.stderr
    assert json.loads(done.stdout)["dropped"] == 1
    assert saved_history(saved(user_coi, user_coi.workspace)[0]) == "kept\n"


def test_kill_9_of_the_saver_mid_stream_keeps_the_previous_save(user_coi, run_in):
    write_history(user_coi, user_coi.workspace, ["before"], "--persistent", "--slot", "1")
    [previous] = saved(user_coi, user_coi.workspace)
    name = container(user_coi, user_coi.workspace, 1)
    # Random data, slow to stream (holes, and zeros, which tar --sparse finds, take no
    # time), under limits.session_size.
    as_code(run_in, name, "head -c 512M /dev/urandom > ~/.dummy/big")
    # setpriv, env and the dispatcher exec: the pid is the saver's own, which names its
    # temp dir.
    saver = subprocess.Popen(shlex.split(user_coi.argv("session", "save", name)[0]),
                             cwd=user_coi.workspace, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    store = Path(previous["path"]).parent
    partial = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and partial is None:
            for candidate in store.glob(f".tmp-{saver.pid}-*/home/.dummy/big"):
                with contextlib.suppress(FileNotFoundError):  # moved in meanwhile
                    if candidate.stat().st_size > 0:
                        partial = candidate
            time.sleep(0.01)
        saver.send_signal(signal.SIGKILL)
        saver.wait(timeout=30)
    finally:
        if saver.poll() is None:
            saver.kill()
    assert partial is not None, "the save never started streaming the big file"
    assert partial.stat().st_size < 512 * 1024**2
    [after] = saved(user_coi, user_coi.workspace)
    assert (after["id"], after["updated_at"]) == (previous["id"], previous["updated_at"])
    assert saved_history(after) == "before\n"

    as_code(run_in, name, "rm ~/.dummy/big && echo after >> ~/.dummy/history")
    done = user_coi("session", "save", name)
    assert done.returncode == 0, done.stderr
    assert saved_history(saved(user_coi, user_coi.workspace)[0]) == "before\nafter\n"
    assert not list(store.glob(".tmp-*")), "the dead saver's temp dir was not removed"


# The library's start-for-the-copy, in this process (no coi command runs here).


def test_a_stopped_container_is_started_for_the_copy_without_a_network(
        make_container, incus_client, run_in):
    name = make_container(start=False).name
    before = incus_client.instance_config(name)
    assert any(d.get("type") == "nic" for d in before["expanded_devices"].values())
    with saved_sessions.running(incus_client, name) as started:
        assert started is True
        assert run_in(name, ["ls", "/sys/class/net"]).stdout.split() == ["lo"]
    after = incus_client.instance_config(name)
    assert incus_client.instance_state(name)["status"] == "Stopped"
    assert after["devices"] == before["devices"]
    assert MASKED_KEY not in after["config"]


def test_nics_left_masked_by_a_killed_save_are_put_back_by_the_next(make_container,
                                                                     incus_client):
    name = make_container(start=False).name
    before = incus_client.instance_config(name)["devices"]
    saved_sessions._mask_nics(incus_client, name)  # what a save killed mid-way leaves
    assert incus_client.instance_config(name)["devices"]["eth0"] == {"type": "none"}
    with saved_sessions.running(incus_client, name):
        pass
    assert incus_client.instance_config(name)["devices"] == before


# -- coi session on its own --------------------------------------------------------------------


def test_save_and_restore_work_from_the_command_line_and_from_stdin(user_coi, incus_client,
                                                                    run_in):
    workspace = user_coi.workspace
    write_history(user_coi, workspace, ["standalone"], "--persistent", "--slot", "1")
    source = container(user_coi, workspace, 1)
    devices_before = incus_client.instance_config(source)["devices"]
    incus_client.set_state(source, "stop", force=True)
    done = user_coi("session", "save", source, "--format", "json")
    assert done.returncode == 0, done.stderr
    stopped_save = json.loads(done.stdout)
    assert (stopped_save["saved"], stopped_save["started"]) == (True, True)
    assert incus_client.instance_state(source)["status"] == "Stopped"
    config = incus_client.instance_config(source)
    assert config["devices"] == devices_before  # the NICs masked for the copy are back
    assert MASKED_KEY not in config["config"]

    record = SlotRecord(str(workspace), 1, source, True, "coi-test-image", "coi", "dummy")
    done = user_coi("session", "save", "--format", "json",
                    input_text=json.dumps(record.to_record()) + "\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == stopped_save["id"]

    done = user_coi("run", "--persistent", "--slot", "2", "--", "true")
    assert done.returncode == 0, done.stderr
    target = container(user_coi, workspace, 2)
    done = user_coi("session", "restore", stopped_save["id"], target)
    assert done.returncode == 0, done.stderr
    owner_and_text = as_code(run_in, target, "stat -c %u ~/.dummy/history; cat ~/.dummy/history")
    assert owner_and_text == "1000\nstandalone\n"
    assert incus_client.instance_config(target)["config"][SESSION_ID_KEY] == stopped_save["id"]

    as_code(run_in, target, "rm -rf ~/.dummy")
    incus_client.set_state(target, "stop", force=True)
    record = SlotRecord(str(workspace), 2, target, True, "coi-test-image", "coi", "dummy")
    done = user_coi("session", "restore", stopped_save["id"], "--format", "json",
                    input_text=json.dumps(record.to_record()) + "\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["container"] == target
    incus_client.set_state(target, "start")
    assert as_code(run_in, target, "cat ~/.dummy/history") == "standalone\n"


def test_restore_refuses_a_container_of_another_workspace(user_coi, other_workspace):
    write_history(user_coi, user_coi.workspace, ["a"])
    [session] = saved(user_coi, user_coi.workspace)
    done = user_coi("run", "--workspace", str(other_workspace), "--persistent", "--", "true")
    assert done.returncode == 0, done.stderr
    refused = user_coi("session", "restore", session["id"],
                       container(user_coi, other_workspace, 1))
    assert refused.returncode == 1
    assert "another workspace" in refused.stderr
    assert refused.stderr.count("\n") == 1


# -- the save hook in coi-slot's paths ---------------------------------------------------------


@pytest.fixture
def unsaveable_store(user_coi):
    """The user's dummy store made a plain file (no save can go in); the real store is
    put back at the end (the user's home outlives the test)."""
    store = user_coi.user.home / ".coi" / "sessions-dummy"
    aside = store.with_name(f"{store.name}.aside")
    store.parent.mkdir(exist_ok=True)
    shutil.chown(store.parent, user_coi.user.uid, user_coi.user.gid)
    if store.exists():
        store.rename(aside)
    store.write_text("not a directory")
    yield store
    store.unlink()
    if aside.exists():
        aside.rename(store)


def test_kill_saves_the_session_and_says_when_it_could_not(user_coi, other_workspace,
                                                          incus_client, request):
    write_history(user_coi, user_coi.workspace, ["killed"], "--persistent", "--slot", "1")
    [before] = saved(user_coi, user_coi.workspace)
    name = container(user_coi, user_coi.workspace, 1)
    killed = user_coi("kill", name)
    assert killed.returncode == 0, killed.stderr
    assert f"coi: saved session {before['id']} of {name} (updated, " in killed.stderr
    assert saved(user_coi, user_coi.workspace)[0]["updated_at"] > before["updated_at"]

    write_history(user_coi, other_workspace, ["unsaveable"], "--persistent", "--slot", "1")
    request.getfixturevalue("unsaveable_store")
    other = container(user_coi, other_workspace, 1)
    killed = user_coi("kill", other)
    # A save that fails keeps the container, so nothing is lost; --no-save discards it.
    assert killed.returncode == 1, killed.stderr
    assert f"could not save the session of {other}" in killed.stderr
    assert f"coi kill --no-save {other}" in killed.stderr
    assert incus_client.instance_exists(other)
    discarded = user_coi("kill", "--no-save", other)
    assert discarded.returncode == 0, discarded.stderr
    assert not incus_client.instance_exists(other)


def test_nothing_is_saved_for_a_run_that_never_used_the_tool(user_coi):
    done = user_coi("run", "--", "true")
    assert done.returncode == 0, done.stderr
    assert saved(user_coi, user_coi.workspace) == []
    assert "coi: nothing to save in " in done.stderr
    assert "saved session" not in done.stderr
