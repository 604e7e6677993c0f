"""coi run / shell / attach / tmux against real containers of the test image.

Interactive flows are driven through a real terminal: a tmux session on the
host runs `coi shell`, keys are typed with send-keys and the screen is read
with capture-pane. The AI tool is the `dummy` stand-in.
"""

import concurrent.futures
import grp
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from coi_common import naming
from coi_host.setup import ensure_subids

pytestmark = pytest.mark.incus

ROOT = Path(__file__).resolve().parents[2]
COI = str(ROOT / "bin" / "coi")
INCUS_GROUP = grp.getgrnam("incus-admin").gr_gid


@pytest.fixture(scope="module", autouse=True)
def _test_users_may_be_mapped():
    """coi setup allows root, the sudo caller and incus-admin members; the test users
    1000 and 1001 exist only as numbers, so allow them here (idempotent)."""
    ensure_subids([1000, 1001], [1000, 1001])


@pytest.fixture
def env(coi_env):
    return coi_env.environ(COI_DEFAULTS_IMAGE="coi-test-image", COI_TOOL_NAME="dummy")


@pytest.fixture
def workspace(incus_client, coi_env):
    """A workspace every test user can use; its containers are removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="coi-test-ws-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    ours = f"{coi_env.prefix}{naming.workspace_hash(path)}-"
    for instance in incus_client.instances(ours):
        incus_client.delete_instance_force(instance["name"])
    subprocess.run(["rm", "-rf", str(path)], check=False)


def coi(args, env, *, cwd=None, input_text=None, timeout=120, user=None):
    prefix = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}",
                  f"--groups={INCUS_GROUP}"]
    return subprocess.run([*prefix, COI, *args], env=env, cwd=cwd, input=input_text,
                          capture_output=True, text=True, timeout=timeout, check=False)


def containers_of(client, prefix, workspace):
    return [i["name"] for i in client.instances(f"{prefix}{naming.workspace_hash(workspace)}-")]


# -- coi run ------------------------------------------------------------------------------


def test_run_executes_as_code_in_workspace_and_passes_the_exit_code(env, workspace):
    done = coi(["run", "--workspace", str(workspace), "--", "sh", "-c", "id -u; pwd; exit 7"],
               env)
    assert done.returncode == 7, done.stderr
    assert done.stdout == "1000\n/workspace\n"


def test_run_streams_stdin_and_keeps_stderr(env, workspace):
    done = coi(["run", "--workspace", str(workspace), "--", "sh", "-c",
                "cat; echo to-stderr >&2"], env, input_text="from stdin\n")
    assert done.returncode == 0
    assert done.stdout == "from stdin\n"
    assert "to-stderr" in done.stderr


def test_host_environment_never_reaches_the_container(env, workspace):
    env = {**env, "HOST_TEST_SECRET": "x-secret"}
    done = coi(["run", "--workspace", str(workspace), "--env", "GIVEN=yes", "--", "sh", "-c",
                'echo "[$HOST_TEST_SECRET][$GIVEN]"; env'], env)
    assert done.stdout.splitlines()[0] == "[][yes]"
    names = {line.split("=")[0] for line in done.stdout.splitlines()[1:] if "=" in line}
    assert names <= {"HOME", "USER", "LANG", "TERM", "PATH", "PWD", "GIVEN", "container",
                     "SHLVL", "_"}


def test_ephemeral_run_deletes_its_container_and_keeps_workspace_files(
        env, workspace, incus_client, coi_env):
    done = coi(["run", "--workspace", str(workspace), "--", "sh", "-c",
                "echo kept > /workspace/result.txt; exit 3"], env)
    assert done.returncode == 3
    assert (workspace / "result.txt").read_text() == "kept\n"
    assert containers_of(incus_client, coi_env.prefix, workspace) == []


@pytest.mark.parametrize("uid", [0, 1000, 1001])
def test_files_made_inside_belong_to_the_invoking_host_user(env, workspace, coi_env, uid):
    home = Path(tempfile.mkdtemp(prefix="coi-test-home-", dir="/tmp"))
    os.chown(home, uid, uid)
    os.chown(workspace, uid, uid)
    (workspace / "host-made").write_text("host\n")
    os.chown(workspace / "host-made", uid, uid)
    os.chmod(workspace / "host-made", 0o644)
    user_env = {**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                "COI_SYSTEM_CONFIG": str(home / "no-system-config.toml")}
    try:
        # Filtered network modes need root for their rules (docs/network.md); the
        # test users have no sudoers rule, and ownership does not depend on the network.
        network = ["--network", "open"] if uid else []
        done = coi(["run", "--workspace", str(workspace), *network, "--", "sh", "-c",
                    "touch /workspace/made-inside && echo more >> /workspace/host-made"],
                   user_env, user=None if uid == 0 else uid)
        assert done.returncode == 0, done.stderr
        assert (workspace / "made-inside").stat().st_uid == uid
        assert (workspace / "host-made").read_text() == "host\nmore\n"
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_persistent_run_keeps_the_container_and_its_changes(env, workspace, incus_client,
                                                            coi_env):
    first = coi(["run", "--workspace", str(workspace), "--persistent", "--slot", "3", "--",
                 "sh", "-c", "sudo touch /opt/installed-earlier"], env)
    assert first.returncode == 0, first.stderr
    name = naming.container_name(workspace, 3, coi_env.prefix)
    assert incus_client.instance_exists(name)
    incus_client.set_state(name, "stop", force=True)
    again = coi(["run", "--workspace", str(workspace), "--persistent", "--slot", "3", "--",
                 "test", "-e", "/opt/installed-earlier"], env)
    assert again.returncode == 0, again.stderr


def test_slots_have_separate_homes(env, workspace):
    one = coi(["run", "--workspace", str(workspace), "--persistent", "--slot", "1", "--",
               "touch", "/home/code/slot1_file"], env)
    assert one.returncode == 0, one.stderr
    two = coi(["run", "--workspace", str(workspace), "--slot", "2", "--",
               "test", "-e", "/home/code/slot1_file"], env)
    assert two.returncode == 1


def test_five_concurrent_runs_use_distinct_containers_and_leave_none(env, workspace,
                                                                     incus_client, coi_env):
    def one_run(_):
        return coi(["run", "--workspace", str(workspace), "--", "sh", "-c",
                    "hostname; sleep 2"], env)

    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(one_run, range(5)))
    assert [r.returncode for r in results] == [0] * 5, [r.stderr for r in results]
    assert len({r.stdout for r in results}) == 5
    assert containers_of(incus_client, coi_env.prefix, workspace) == []


def test_sigterm_during_run_removes_the_container(env, workspace, incus_client, coi_env):
    child = subprocess.Popen([COI, "run", "--workspace", str(workspace), "--", "sleep", "60"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            names = containers_of(incus_client, coi_env.prefix, workspace)
            if names and running_sleep(incus_client, names[0]):
                break
            time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err
    assert containers_of(incus_client, coi_env.prefix, workspace) == []


def running_sleep(client, name):
    return client.cli(["exec", name, "--", "pgrep", "-x", "sleep"], check=False).ok


def test_run_with_a_malformed_env_flag_is_one_line(env, workspace):
    done = coi(["run", "--workspace", str(workspace), "--env", "NOEQUALS", "--", "true"], env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1


def test_run_with_a_missing_image_says_to_build_it(coi_env, workspace):
    env = coi_env.environ(COI_DEFAULTS_IMAGE="coi-test-no-such-image", COI_TOOL_NAME="dummy")
    done = coi(["run", "--workspace", str(workspace), "--", "true"], env)
    assert done.returncode == 3
    assert "coi build" in done.stderr


# -- interactive sessions, through a real terminal -------------------------------------------


def test_shell_runs_the_tool_in_tmux_and_poweroff_ends_the_session(
        env, workspace, terminal, incus_client, coi_env):
    term = terminal([COI, "shell"], env, workspace)
    term.wait_for("dummy: 0 lines of history")
    term.type("first line")
    term.wait_for("dummy: noted first line")
    term.type("/exit")
    term.type("echo in-bash-$((6*7)) > /workspace/from-shell")
    term.wait_for("code@")
    term.type("sudo poweroff")
    term.wait_for("COI-EXITED-0", timeout=60)
    assert "container deleted" in term.screen()
    assert (workspace / "from-shell").read_text() == "in-bash-42\n"
    assert containers_of(incus_client, coi_env.prefix, workspace) == []


def test_exit_in_bash_keeps_the_container_and_attach_brings_the_tool_back(
        env, workspace, terminal, incus_client, coi_env):
    term = terminal([COI, "shell"], env, workspace)
    term.wait_for("dummy: 0 lines of history")
    term.type("/exit")
    term.type("exit")
    term.wait_for("COI-EXITED-0")
    assert "is still running" in term.screen()
    name = naming.container_name(workspace, 1, coi_env.prefix)
    assert incus_client.instance_state(name)["status"] == "Running"
    again = terminal([COI, "attach"], env, workspace)
    again.wait_for("dummy: 0 lines of history")


def test_detach_keeps_the_session_and_attach_returns_to_it(env, workspace, terminal, coi_env):
    term = terminal([COI, "shell"], env, workspace)
    term.wait_for("dummy: 0 lines of history")
    term.type("remember me")
    term.wait_for("noted remember me")
    term.keys("C-b", "d")
    term.wait_for("COI-EXITED-0")
    name = naming.container_name(workspace, 1, coi_env.prefix)
    back = terminal([COI, "attach", name], env, workspace)
    back.wait_for("noted remember me")


def test_tmux_send_and_capture_round_trip(env, workspace, terminal, coi_env):
    term = terminal([COI, "shell"], env, workspace)
    term.wait_for("dummy: 0 lines of history")
    term.keys("C-b", "d")
    term.wait_for("COI-EXITED-0")
    name = naming.container_name(workspace, 1, coi_env.prefix)
    sent = coi(["tmux", "send", name, "automated hello"], env)
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + 20
    screen = ""
    while time.monotonic() < deadline and "noted automated hello" not in screen:
        screen = coi(["tmux", "capture", name], env).stdout
        time.sleep(0.3)
    assert "dummy: noted automated hello" in screen
    listed = coi(["tmux", "list", "--format", "json"], env)
    assert f'"name": "{name}"' in listed.stdout


def test_persistent_shell_is_kept_after_poweroff_and_reused(env, workspace, terminal,
                                                            incus_client, coi_env):
    term = terminal([COI, "shell", "--persistent"], env, workspace)
    term.wait_for("dummy: 0 lines of history")
    term.type("/exit")
    term.type("touch ~/persisted-file && sudo poweroff")
    term.wait_for("COI-EXITED-0", timeout=60)
    name = naming.container_name(workspace, 1, coi_env.prefix)
    assert incus_client.instance_state(name)["status"] == "Stopped"
    again = terminal([COI, "shell", "--slot", "1"], env, workspace)
    again.wait_for("dummy: 0 lines of history")
    again.type("/exit")
    again.type("ls ~/persisted-file && echo FOUND-IT")
    again.wait_for("FOUND-IT")


def test_attach_without_a_session_is_a_one_line_not_found(env, workspace):
    done = coi(["attach", "--workspace", str(workspace)], env)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1


def test_attach_to_a_foreign_container_is_refused(env, make_container):
    foreign = make_container(start=False).name
    done = coi(["attach", foreign], env)
    assert done.returncode == 1
    assert "not a coi session container" in done.stderr


def test_tmux_send_to_a_missing_container_fails_with_exit_3(env):
    done = coi(["tmux", "send", "coi-test-nonexistent-1", "x"], env)
    assert done.returncode == 3


def test_slot_record_piped_into_coi_shell_starts_that_slot(env, workspace, terminal,
                                                           incus_client, coi_env):
    slot_cmd = str(ROOT / "bin" / "coi-slot")
    shell_cmd = str(ROOT / "bin" / "coi-shell")
    term = terminal([slot_cmd, "next", "--slot", "4", "|", shell_cmd], env, workspace)
    term.wait_for("dummy: 0 lines of history")
    name = naming.container_name(workspace, 4, coi_env.prefix)
    assert incus_client.instance_state(name)["status"] == "Running"
    term.type("/exit")
    term.type("sudo poweroff")
    term.wait_for("COI-EXITED-0", timeout=60)
    assert not incus_client.instance_exists(name)


def test_shell_on_a_running_persistent_slot_attaches_instead_of_creating(
        env, workspace, terminal, coi_env):
    first = terminal([COI, "shell", "--persistent", "--slot", "5"], env, workspace)
    first.wait_for("dummy: 0 lines of history")
    first.type("only once")
    first.wait_for("noted only once")
    first.keys("C-b", "d")
    first.wait_for("COI-EXITED-0")
    again = terminal([COI, "shell", "--slot", "5"], env, workspace)
    # The same tmux session, not a new container: what was typed before is on screen.
    again.wait_for("noted only once")


def net_status(env):
    import json  # noqa: PLC0415

    done = subprocess.run([str(ROOT / "bin" / "coi-net"), "status", "--format", "json"],
                          env=env, capture_output=True, text=True, check=False)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_run_puts_egress_rules_in_place_and_removes_them_with_the_container(
        env, workspace, coi_env):
    name = naming.container_name(workspace, 6, coi_env.prefix)
    child = subprocess.Popen([COI, "run", "--workspace", str(workspace), "--slot", "6", "--",
                              "sleep", "3"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        seen = []
        while time.monotonic() < deadline and not seen:
            seen = [r for r in net_status(env) if r.get("container") == name]
            time.sleep(0.2)
        assert seen, "no rules appeared for the session container"
        assert seen[0]["mode"] == "restricted"
        child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0
    assert [r for r in net_status(env) if r.get("container") == name] == []
