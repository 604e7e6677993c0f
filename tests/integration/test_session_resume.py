"""Saving, restoring and resuming sessions against real containers of the test image.

The AI tool is the `dummy` stand-in: it keeps one line per input in
~/.dummy/history and prints `dummy: N lines of history` when it starts, so a
restored session shows itself by its count. Interactive flows run `coi shell`
in a tmux session on the host (the `terminal` fixture of conftest); the rest
uses `coi run` and `coi-session` directly.
"""

import hashlib
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from coi_common import naming, saved_sessions
from coi_common.saved_sessions import MASKED_KEY, SESSION_ID_KEY
from coi_common.sessions import SlotRecord

pytestmark = [pytest.mark.incus, pytest.mark.usefixtures("coi_env")]

ROOT = Path(__file__).resolve().parents[2]
COI = str(ROOT / "bin" / "coi")
COI_SESSION = str(ROOT / "bin" / "coi-session")


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def env(coi_env):
    return coi_env.environ(COI_DEFAULTS_IMAGE="coi-test-image", COI_TOOL_NAME="dummy")


@pytest.fixture
def make_workspace(incus_client, coi_env):
    """make_workspace() -> a fresh workspace dir; its containers are removed afterwards."""
    made = []

    def factory():
        path = Path(tempfile.mkdtemp(prefix="coi-test-ws-", dir="/tmp"))
        path.chmod(0o777)
        made.append(path)
        return path

    yield factory
    for path in made:
        ours = f"{coi_env.prefix}{naming.workspace_hash(path)}-"
        for instance in incus_client.instances(ours):
            incus_client.delete_instance_force(instance["name"])
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def workspace(make_workspace):
    return make_workspace()


def run(argv, env, *, cwd=None, input_text=None, timeout=120):
    return subprocess.run(argv, env=env, cwd=cwd, input=input_text, capture_output=True,
                          text=True, timeout=timeout, check=False)


def coi(args, env, **kwargs):
    return run([COI, *args], env, **kwargs)


def coi_session(args, env, **kwargs):
    return run([COI_SESSION, *args], env, **kwargs)


def saved(env, workspace=None):
    """The saved sessions (records), newest first: of one workspace or of all."""
    scope = ["--workspace", str(workspace)] if workspace else ["--all"]
    listed = coi_session(["list", *scope, "--format", "json"], env)
    assert listed.returncode == 0, listed.stderr
    return [json.loads(line) for line in listed.stdout.splitlines()]


def saved_history(record):
    return (Path(record["path"]) / "home" / ".dummy" / "history").read_text()


def container(coi_env, workspace, slot):
    return naming.container_name(workspace, slot, coi_env.prefix)


def containers_of(client, coi_env, workspace):
    return [i["name"] for i in client.instances(f"{coi_env.prefix}"
                                                f"{naming.workspace_hash(workspace)}-")]


def as_code(run_in, name, script):
    done = run_in(name, ["sh", "-c", script], user=1000, env={"HOME": "/home/code"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def write_history(env, workspace, lines, *extra):
    """A `coi run` that appends lines to the dummy's history; its end saves the session."""
    script = "mkdir -p ~/.dummy && " + " && ".join(f"echo {line} >> ~/.dummy/history"
                                                   for line in lines)
    done = coi(["run", "--workspace", str(workspace), *extra, "--", "sh", "-c", script], env)
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
        env, workspace, terminal, incus_client, coi_env):
    term = terminal([COI, "shell"], env, workspace)
    term.wait_for("dummy: 0 lines of history")
    type_lines_and_poweroff(term, ["first line", "second line"])
    assert containers_of(incus_client, coi_env, workspace) == []
    [session] = saved(env, workspace)
    assert saved_history(session) == "first line\nsecond line\n"
    assert session["workspace"] == str(workspace)
    assert f"session {session['id']}" in term.screen()

    again = terminal([COI, "shell", "--resume"], env, workspace)
    again.wait_for("dummy: 2 lines of history")
    again.wait_for("dummy: resumed")
    type_lines_and_poweroff(again, ["third line"])
    [continued] = saved(env, workspace)
    assert continued["id"] == session["id"]
    assert continued["updated_at"] > session["updated_at"]
    assert saved_history(continued) == "first line\nsecond line\nthird line\n"
    listed = json.loads(coi(["list", "--all", "--format", "json"], env).stdout)
    assert session["id"] in [s["ID"] for s in listed["saved_sessions"]]


def test_another_workspace_finds_nothing_and_starts_fresh(env, make_workspace, terminal):
    first, second = make_workspace(), make_workspace()
    write_history(env, first, ["from-a"])
    term = terminal([COI, "shell", "--resume"], env, second)
    term.wait_for("dummy: 0 lines of history")
    assert "dummy: resumed" not in term.screen()
    subprocess.run(["tmux", "send-keys", "-t", term.name, "C-b", "d"], check=True)
    term.wait_for("COI-EXITED-0")
    assert f"no saved dummy session for {second}; starting fresh" in term.screen()


@pytest.mark.parametrize("flag", ["--resume", "--continue"])
def test_resume_of_another_workspaces_id_is_refused_in_one_line(
        env, make_workspace, incus_client, coi_env, flag):
    first, second = make_workspace(), make_workspace()
    write_history(env, first, ["from-a"])
    [session] = saved(env, first)
    done = coi(["shell", f"{flag}={session['id']}"], env, cwd=second)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "belongs to another workspace" in done.stderr
    assert containers_of(incus_client, coi_env, second) == []
    # The refusal gave the reserved slot back: the next session gets slot 1.
    write_history(env, second, ["b"])
    assert saved(env, second)[0]["slot"] == 1


def test_a_malformed_session_id_is_a_one_line_usage_error(env, workspace, incus_client,
                                                          coi_env):
    done = coi(["run", "--resume=../../etc", "--", "true"], env, cwd=workspace)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert containers_of(incus_client, coi_env, workspace) == []


def test_slots_save_separate_sessions_and_resume_picks_the_latest(env, workspace):
    write_history(env, workspace, ["one"], "--slot", "1")
    write_history(env, workspace, ["two-a", "two-b"], "--slot", "2")
    sessions = saved(env, workspace)
    assert [s["slot"] for s in sessions] == [2, 1]
    slot2, slot1 = sessions
    assert slot1["id"] != slot2["id"]
    resumed = coi(["run", "--resume", "--", "cat", "/home/code/.dummy/history"], env,
                  cwd=workspace)
    assert resumed.stdout == "two-a\ntwo-b\n", resumed.stderr
    write_history(env, workspace, ["one-more"], f"--resume={slot1['id']}")
    assert saved(env, workspace)[0]["id"] == slot1["id"]
    resumed = coi(["run", "--continue", "--", "cat", "/home/code/.dummy/history"], env,
                  cwd=workspace)
    assert resumed.stdout == "one\none-more\n"


def test_a_persistent_container_resumes_a_session_saved_by_an_ephemeral_one(
        env, workspace, incus_client, coi_env):
    write_history(env, workspace, ["ephemeral"], "--slot", "1")
    done = coi(["run", "--persistent", "--slot", "2", "--resume", "--", "cat",
                "/home/code/.dummy/history"], env, cwd=workspace)
    assert done.stdout == "ephemeral\n", done.stderr
    assert incus_client.instance_exists(container(coi_env, workspace, 2))


# -- credentials and settings --------------------------------------------------------------------


def test_credentials_are_injected_fresh_never_saved_and_settings_are_merged(
        env, workspace, coi_env):
    (coi_env.config_home / "coi").mkdir(exist_ok=True)
    (coi_env.config_home / "coi" / "config.toml").write_text(
        "[tools.dummy]\ninject_credentials = true\n")
    host = coi_env.home / ".dummy"
    host.mkdir(parents=True)
    (host / "credentials.json").write_text('{"token": "host-token-1"}')
    (host / "settings.json").write_text('{"theme": "host", "permissions": {"allow": ["ls"]}}')
    (host / "private-notes").write_text("never in a container")
    done = coi(["run", "--", "sh", "-c",
                "cat ~/.dummy/credentials.json; echo; cat ~/.dummy/settings.json; "
                "ls -A ~/.dummy; stat -c %u ~/.dummy/credentials.json; "
                "echo line >> ~/.dummy/history"], env, cwd=workspace)
    assert done.returncode == 0, done.stderr
    first_line, rest = done.stdout.split("\n", 1)
    assert first_line == '{"token": "host-token-1"}'
    settings = json.loads(rest[:rest.rindex("}") + 1])
    assert settings == {"theme": "host", "managed_by": "coi",
                        "permissions": {"allow": ["ls"], "mode": "autonomous"}}
    assert "private-notes" not in done.stdout
    assert done.stdout.splitlines()[-1] == "1000"

    [session] = saved(env, workspace)
    kept = Path(session["path"]) / "home" / ".dummy"
    assert sorted(p.name for p in kept.iterdir()) == ["history", "settings.json"]
    assert json.loads((kept / "settings.json").read_text())["theme"] == "host"

    (host / "credentials.json").write_text('{"token": "host-token-2"}')
    again = coi(["run", "--resume", "--", "cat", "/home/code/.dummy/credentials.json"], env,
                cwd=workspace)
    assert again.stdout == '{"token": "host-token-2"}', again.stderr


# -- untrusted container contents -------------------------------------------------------------


def test_a_planted_symlink_and_fifo_are_dropped_and_the_host_is_untouched(
        env, workspace, coi_env, run_in):
    passwd = Path("/etc/passwd")
    before = (hashlib.sha256(passwd.read_bytes()).hexdigest(), passwd.stat().st_mtime_ns)
    write_history(env, workspace, ["kept"], "--persistent", "--slot", "1")
    name = container(coi_env, workspace, 1)
    as_code(run_in, name, "ln -s /etc/passwd ~/.dummy/evil && mkfifo ~/.dummy/fifo && "
                          "ln -s / ~/.dummy/root")
    done = coi_session(["save", name, "--format", "json"], env)
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
    done = coi_session(["save", name, "--format", "json"], env)
    assert json.loads(done.stdout)["saved"] is False
    assert json.loads(done.stdout)["dropped"] == 1
    assert saved_history(saved(env, workspace)[0]) == "kept\n"


def test_kill_9_of_the_saver_mid_stream_keeps_the_previous_save(
        env, workspace, coi_env, run_in):
    write_history(env, workspace, ["before"], "--persistent", "--slot", "1")
    [previous] = saved(env, workspace)
    name = container(coi_env, workspace, 1)
    as_code(run_in, name, "truncate -s 3G ~/.dummy/big")
    saver = subprocess.Popen([COI_SESSION, "save", name], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    store = Path(previous["path"]).parent
    partial = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and partial is None:
            for candidate in store.glob(f".tmp-{saver.pid}-*/home/.dummy/big"):
                if candidate.stat().st_size > 0:
                    partial = candidate
            time.sleep(0.01)
        saver.send_signal(signal.SIGKILL)
        saver.wait(timeout=30)
    finally:
        if saver.poll() is None:
            saver.kill()
    assert partial is not None, "the save never started streaming the big file"
    assert partial.stat().st_size < 3 * 1024**3
    [after] = saved(env, workspace)
    assert (after["id"], after["updated_at"]) == (previous["id"], previous["updated_at"])
    assert saved_history(after) == "before\n"

    as_code(run_in, name, "rm ~/.dummy/big && echo after >> ~/.dummy/history")
    done = coi_session(["save", name], env)
    assert done.returncode == 0, done.stderr
    assert saved_history(saved(env, workspace)[0]) == "before\nafter\n"
    assert not list(store.glob(".tmp-*")), "the dead saver's temp dir was not removed"


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


# -- coi-session on its own --------------------------------------------------------------------


def test_save_and_restore_work_from_the_command_line_and_from_stdin(
        env, workspace, coi_env, incus_client, run_in):
    write_history(env, workspace, ["standalone"], "--persistent", "--slot", "1")
    source = container(coi_env, workspace, 1)
    devices_before = incus_client.instance_config(source)["devices"]
    incus_client.set_state(source, "stop", force=True)
    done = coi_session(["save", source, "--format", "json"], env)
    assert done.returncode == 0, done.stderr
    stopped_save = json.loads(done.stdout)
    assert (stopped_save["saved"], stopped_save["started"]) == (True, True)
    assert incus_client.instance_state(source)["status"] == "Stopped"
    config = incus_client.instance_config(source)
    assert config["devices"] == devices_before  # the NICs masked for the copy are back
    assert MASKED_KEY not in config["config"]

    record = SlotRecord(str(workspace), 1, source, True, "coi-test-image", "coi", "dummy")
    done = coi_session(["save", "--format", "json"], env,
                       input_text=json.dumps(record.to_record()) + "\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == stopped_save["id"]

    done = coi(["run", "--persistent", "--slot", "2", "--", "true"], env, cwd=workspace)
    assert done.returncode == 0, done.stderr
    target = container(coi_env, workspace, 2)
    done = coi_session(["restore", stopped_save["id"], target], env)
    assert done.returncode == 0, done.stderr
    owner_and_text = as_code(run_in, target, "stat -c %u ~/.dummy/history; cat ~/.dummy/history")
    assert owner_and_text == "1000\nstandalone\n"
    assert incus_client.instance_config(target)["config"][SESSION_ID_KEY] == stopped_save["id"]

    as_code(run_in, target, "rm -rf ~/.dummy")
    incus_client.set_state(target, "stop", force=True)
    record = SlotRecord(str(workspace), 2, target, True, "coi-test-image", "coi", "dummy")
    done = coi_session(["restore", stopped_save["id"], "--format", "json"], env,
                       input_text=json.dumps(record.to_record()) + "\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["container"] == target
    incus_client.set_state(target, "start")
    assert as_code(run_in, target, "cat ~/.dummy/history") == "standalone\n"


def test_restore_refuses_a_container_of_another_workspace(env, make_workspace, coi_env):
    first, second = make_workspace(), make_workspace()
    write_history(env, first, ["a"])
    [session] = saved(env, first)
    done = coi(["run", "--workspace", str(second), "--persistent", "--", "true"], env)
    assert done.returncode == 0, done.stderr
    refused = coi_session(["restore", session["id"], container(coi_env, second, 1)], env)
    assert refused.returncode == 1
    assert "another workspace" in refused.stderr
    assert refused.stderr.count("\n") == 1


# -- the save hook in coi-slot's paths ---------------------------------------------------------


def test_kill_saves_the_session_and_says_when_it_could_not(env, make_workspace, coi_env,
                                                          incus_client):
    first, second = make_workspace(), make_workspace()
    write_history(env, first, ["killed"], "--persistent", "--slot", "1")
    [before] = saved(env, first)
    name = container(coi_env, first, 1)
    killed = coi(["kill", name], env)
    assert killed.returncode == 0, killed.stderr
    assert f"updated session {before['id']}" in killed.stderr
    assert saved(env, first)[0]["updated_at"] > before["updated_at"]

    write_history(env, second, ["unsaveable"], "--persistent", "--slot", "1")
    store = coi_env.home / ".coi" / "sessions-dummy"
    subprocess.run(["rm", "-rf", str(store)], check=True)
    store.write_text("not a directory")
    other = container(coi_env, second, 1)
    killed = coi(["kill", other], env)
    assert killed.returncode == 0, killed.stderr
    assert f"could not save the session of {other}" in killed.stderr
    assert not incus_client.instance_exists(other)


def test_nothing_is_saved_for_a_run_that_never_used_the_tool(env, workspace):
    done = coi(["run", "--", "true"], env, cwd=workspace)
    assert done.returncode == 0, done.stderr
    assert saved(env, workspace) == []
    assert "session" not in done.stderr
