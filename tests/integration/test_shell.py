"""coi run / shell / attach / tmux against real containers of the test image.

coi runs as its main user: the installed non-root member of incus-admin
(`user_coi`), in the default network mode, whose rules the host service puts
in place. Root runs it only where a test is about root.

Interactive flows are driven through a real terminal: a tmux session on the
host runs `coi shell` as that user, keys are typed with send-keys and the
screen is read with capture-pane. The AI tool is the `dummy` stand-in.
"""

import concurrent.futures
import grp
import json
import os
import shlex
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from coi_common import naming
from coi_host.setup import ensure_subids

pytestmark = pytest.mark.incus

ROOT = Path(__file__).resolve().parents[2]
COI = str(ROOT / "bin" / "coi")
INCUS_GROUP = grp.getgrnam("incus-admin").gr_gid
SHIFTED_UID = 1000  # the container's `code`: a host uid equal to it
UNPRIVILEGED_BASE = 1000000  # Incus's default map: container uid 0 is host uid 1000000


def name_of(user_coi, slot):
    return naming.container_name(str(user_coi.workspace), slot, user_coi.prefix)


def containers_of(client, user_coi):
    return [i["name"] for i in client.instances(
        f"{user_coi.prefix}{naming.workspace_hash(user_coi.workspace)}-")]


def popen_as_user(user_coi, *args):
    """`coi ARGS` as the user, not waited for: its pid is coi's own (setpriv and env exec)."""
    return subprocess.Popen(shlex.split(user_coi.argv(*args)[0]), cwd=user_coi.workspace,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- coi run ------------------------------------------------------------------------------


def test_run_executes_as_code_in_workspace_and_passes_the_exit_code(user_coi):
    done = user_coi("run", "--", "sh", "-c", "id -u; pwd; exit 7")
    assert done.returncode == 7, done.stderr
    assert done.stdout == "1000\n/workspace\n"


def test_run_streams_stdin_and_keeps_stderr(user_coi):
    done = user_coi("run", "--", "sh", "-c", "cat; echo to-stderr >&2",
                    input_text="from stdin\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from stdin\n"
    assert "to-stderr" in done.stderr


def test_host_environment_never_reaches_the_container(user_coi):
    done = user_coi("run", "--env", "GIVEN=yes", "--", "sh", "-c",
                    'echo "[$HOST_TEST_SECRET][$GIVEN]"; env',
                    env={"HOST_TEST_SECRET": "x-secret"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "[][yes]"
    names = {line.split("=")[0] for line in done.stdout.splitlines()[1:] if "=" in line}
    assert names <= {"HOME", "USER", "LANG", "TERM", "PATH", "PWD", "GIVEN", "container",
                     "SHLVL", "_"}


def test_ephemeral_run_deletes_its_container_and_keeps_workspace_files(user_coi,
                                                                       incus_client):
    done = user_coi("run", "--", "sh", "-c", "echo kept > /workspace/result.txt; exit 3")
    assert done.returncode == 3, done.stderr
    assert (user_coi.workspace / "result.txt").read_text() == "kept\n"
    assert containers_of(incus_client, user_coi) == []


# -- who owns what the container makes ------------------------------------------------------


@dataclass(frozen=True)
class Invoker:
    """Someone who runs `coi ARGS` in their own workspace as host uid `uid`."""

    uid: int
    workspace: Path
    coi: Callable[..., subprocess.CompletedProcess]
    run_flags: tuple[str, ...] = ()


def checkout_coi(env, workspace, *args, user=None):
    """The checkout's coi, as root or (user=UID) as a bare numeric uid in incus-admin."""
    wrapper = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}",
                                       f"--groups={INCUS_GROUP}"]
    return subprocess.run([*wrapper, COI, *args], env=env, cwd=workspace, capture_output=True,
                          text=True, timeout=120, check=False)


def _own_workspace(request, uid):
    """A workspace owned by `uid`, and a home for it; the containers of coi_env's prefix
    and both directories are removed at the end."""
    coi_env, client = request.getfixturevalue("coi_env"), request.getfixturevalue("incus_client")
    workspace = Path(tempfile.mkdtemp(prefix="coi-test-ws-", dir="/tmp"))
    home = Path(tempfile.mkdtemp(prefix="coi-test-home-", dir="/tmp"))
    for path in (workspace, home):
        os.chown(path, uid, uid)

    def remove():
        for instance in client.instances(coi_env.prefix):
            client.delete_instance_force(instance["name"])
        subprocess.run(["rm", "-rf", str(workspace), str(home)], check=False)

    request.addfinalizer(remove)
    env = coi_env.environ(COI_DEFAULTS_IMAGE="coi-test-image", COI_TOOL_NAME="dummy",
                          HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                          COI_SYSTEM_CONFIG=str(home / "no-system-config.toml"))
    return workspace, env


@pytest.fixture(params=["root", "uid-1000", "member"])
def invoker(request):
    """root (in a workspace of the session's test user, whom code then acts as); the
    bare uid 1000; the installed incus-admin member."""
    yield from _invoker(request)


def _invoker(request):
    if request.param == "member":
        user_coi = request.getfixturevalue("user_coi")
        yield Invoker(user_coi.user.uid, user_coi.workspace, user_coi)
        return
    if request.param == "root":
        owner = request.getfixturevalue("test_user").uid
        workspace, env = _own_workspace(request, owner)
        yield Invoker(owner, workspace, lambda *args: checkout_coi(env, workspace, *args))
        return
    # Host uid 1000 equals the container's `code`; it is mapped by raw.idmap like any
    # other uid (idmapped mounts are never used: they map container root to host root).
    # No real test user can have uid 1000 (a system account holds it here, outside
    # incus-admin, so the host service would not delegate it): this case runs the
    # checkout's coi as the bare number, in open mode and without a workspace view (both
    # need the host service, which serves members only), with the delegation added here
    # and taken away again.
    sweeper = request.getfixturevalue("sweeper")
    added = ensure_subids([SHIFTED_UID], [SHIFTED_UID])
    workspace, env = _own_workspace(request, SHIFTED_UID)
    env["COI_SECURITY_PROTECT"] = "false"
    yield Invoker(SHIFTED_UID, workspace,
                  lambda *args: checkout_coi(env, workspace, *args, user=SHIFTED_UID),
                  run_flags=("--network", "open", "--no-mask"))
    if added:  # only what this fixture added goes again
        sweeper.drop_subid_lines(SHIFTED_UID, SHIFTED_UID)


def test_files_made_inside_belong_to_the_invoking_host_user(invoker):
    host_made = invoker.workspace / "host-made"
    host_made.write_text("host\n")
    os.chown(host_made, invoker.uid, invoker.uid)
    os.chmod(host_made, 0o644)
    done = invoker.coi("run", *invoker.run_flags, "--", "sh", "-c",
                       "touch /workspace/made-inside && echo more >> /workspace/host-made")
    assert done.returncode == 0, done.stderr
    assert (invoker.workspace / "made-inside").stat().st_uid == invoker.uid
    assert host_made.read_text() == "host\nmore\n"


def test_a_setuid_shell_planted_inside_never_runs_as_root_on_the_host(invoker):
    """The exploit: root inside copies bash into /workspace, gives it to uid 0 and sets
    the setuid bit (and code does the same without sudo, and creates one with the bit
    at open). No file on the host carries a setuid or setgid bit, and none belongs to
    host root, whoever ran coi (root included: code acts as the workspace's owner)."""
    done = invoker.coi("run", *invoker.run_flags, "--", "sh", "-c",
                       "sudo sh -c 'cp /bin/bash /workspace/rootsh; chown 0:0 /workspace/rootsh;"
                       " chmod 4755 /workspace/rootsh; chmod g+s /workspace/rootsh';"
                       " cp /bin/bash /workspace/codesh; chmod 6755 /workspace/codesh;"
                       " install -m 4755 /bin/true /workspace/installed; echo planted")
    assert done.returncode == 0, done.stderr
    assert "planted" in done.stdout
    assert "Operation not permitted" in done.stderr
    for name in ("rootsh", "codesh", "installed"):
        path = invoker.workspace / name
        if not path.exists():
            continue
        info = path.stat()
        assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{name} is setuid/setgid"
        assert info.st_uid != 0, f"{name} belongs to host root"
        assert info.st_gid != 0, f"{name} belongs to host group root"
    assert (invoker.workspace / "rootsh").stat().st_uid >= UNPRIVILEGED_BASE
    assert (invoker.workspace / "codesh").stat().st_uid == invoker.uid


def test_root_in_a_workspace_of_root_is_refused_before_anything_exists(request, incus_client):
    """code is never host root: when root runs coi, code acts as the workspace's owner,
    and a workspace owned by root gets a one-line refusal."""
    workspace, env = _own_workspace(request, 0)
    done = checkout_coi(env, workspace, "run", "--", "true")
    assert done.returncode == 5, done.stderr  # PermissionDenied
    assert done.stderr.count("\n") == 1
    assert "belongs to root" in done.stderr
    assert "never maps the agent to host root" in done.stderr
    assert incus_client.instances(env["COI_CONTAINER_PREFIX"]) == []


# -- persistent containers and slots ---------------------------------------------------------


def test_persistent_run_keeps_the_container_and_its_changes(user_coi, incus_client):
    first = user_coi("run", "--persistent", "--slot", "3", "--",
                     "sh", "-c", "sudo touch /opt/installed-earlier")
    assert first.returncode == 0, first.stderr
    name = name_of(user_coi, 3)
    assert incus_client.instance_exists(name)
    incus_client.set_state(name, "stop", force=True)
    again = user_coi("run", "--persistent", "--slot", "3", "--",
                     "test", "-e", "/opt/installed-earlier")
    assert again.returncode == 0, again.stderr


def test_slots_have_separate_homes(user_coi):
    one = user_coi("run", "--persistent", "--slot", "1", "--", "touch", "/home/code/slot1_file")
    assert one.returncode == 0, one.stderr
    two = user_coi("run", "--slot", "2", "--", "test", "-e", "/home/code/slot1_file")
    assert two.returncode == 1, two.stderr


def test_five_concurrent_runs_use_distinct_containers_and_leave_none(user_coi, incus_client):
    def one_run(_):
        return user_coi("run", "--", "sh", "-c", "hostname; sleep 2")

    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(one_run, range(5)))
    assert [r.returncode for r in results] == [0] * 5, [r.stderr for r in results]
    assert len({r.stdout for r in results}) == 5
    assert containers_of(incus_client, user_coi) == []


def test_sigterm_during_run_removes_the_container(user_coi, incus_client):
    child = popen_as_user(user_coi, "run", "--", "sleep", "60")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            names = containers_of(incus_client, user_coi)
            if names and running_sleep(incus_client, names[0]):
                break
            time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err
    assert containers_of(incus_client, user_coi) == []


def running_sleep(client, name):
    return client.cli(["exec", name, "--", "pgrep", "-x", "sleep"], check=False).ok


def test_run_with_a_malformed_env_flag_is_one_line(user_coi):
    done = user_coi("run", "--env", "NOEQUALS", "--", "true")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr


def test_run_with_a_missing_image_says_to_build_it(user_coi):
    done = user_coi("run", "--", "true", env={"COI_DEFAULTS_IMAGE": "coi-test-no-such-image"})
    assert done.returncode == 3, done.stderr
    assert "coi build" in done.stderr


# -- interactive sessions, through a real terminal -------------------------------------------


def test_shell_runs_the_tool_in_tmux_and_poweroff_ends_the_session(user_coi, terminal,
                                                                   incus_client):
    term = terminal(user_coi.argv("shell"), None, user_coi.workspace)
    term.wait_for("dummy: 0 lines of history")
    term.type("first line")
    term.wait_for("dummy: noted first line")
    term.type("/exit")
    term.type("echo in-bash-$((6*7)) > /workspace/from-shell")
    term.wait_for("code@")
    term.type("sudo poweroff")
    term.wait_for("COI-EXITED-0", timeout=60)
    assert f"coi: removed {name_of(user_coi, 1)}" in term.screen()
    assert (user_coi.workspace / "from-shell").read_text() == "in-bash-42\n"
    assert containers_of(incus_client, user_coi) == []


def test_exit_in_bash_keeps_the_container_and_attach_brings_the_tool_back(
        user_coi, terminal, incus_client):
    term = terminal(user_coi.argv("shell"), None, user_coi.workspace)
    term.wait_for("dummy: 0 lines of history")
    term.type("/exit")
    term.type("exit")
    term.wait_for("COI-EXITED-0")
    assert "is still running" in term.screen()
    assert incus_client.instance_state(name_of(user_coi, 1))["status"] == "Running"
    again = terminal(user_coi.argv("attach"), None, user_coi.workspace)
    again.wait_for("dummy: 0 lines of history")


def test_detach_keeps_the_session_and_attach_returns_to_it(user_coi, terminal):
    term = terminal(user_coi.argv("shell"), None, user_coi.workspace)
    term.wait_for("dummy: 0 lines of history")
    term.type("remember me")
    term.wait_for("noted remember me")
    term.keys("C-b", "d")
    term.wait_for("COI-EXITED-0")
    back = terminal(user_coi.argv("attach", name_of(user_coi, 1)), None, user_coi.workspace)
    back.wait_for("noted remember me")


def test_a_slot_killed_after_a_detach_can_be_taken_again_at_once(user_coi, terminal,
                                                                  incus_client):
    """The reservation coi-slot next made for the shell goes with the container: a
    `coi kill` right after a detach frees the slot (it used to stay reserved 2 min)."""
    term = terminal(user_coi.argv("shell", "--slot", "2"), None, user_coi.workspace)
    term.wait_for("dummy: 0 lines of history")
    term.keys("C-b", "d")
    term.wait_for("COI-EXITED-0")
    killed = user_coi("kill", "--no-save", name_of(user_coi, 2))
    assert killed.returncode == 0, killed.stderr
    again = user_coi("run", "--slot", "2", "--", "true")
    assert again.returncode == 0, again.stderr
    assert not incus_client.instance_exists(name_of(user_coi, 2))


def test_tmux_send_and_capture_round_trip(user_coi, terminal):
    term = terminal(user_coi.argv("shell"), None, user_coi.workspace)
    term.wait_for("dummy: 0 lines of history")
    term.keys("C-b", "d")
    term.wait_for("COI-EXITED-0")
    name = name_of(user_coi, 1)
    sent = user_coi("tmux", "send", name, "automated hello")
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + 20
    screen = ""
    while time.monotonic() < deadline and "noted automated hello" not in screen:
        screen = user_coi("tmux", "capture", name).stdout
        time.sleep(0.3)
    assert "dummy: noted automated hello" in screen
    listed = user_coi("tmux", "list", "--format", "json")
    assert f'"name": "{name}"' in listed.stdout, listed.stderr


def test_persistent_shell_is_kept_after_poweroff_and_reused(user_coi, terminal, incus_client):
    term = terminal(user_coi.argv("shell", "--persistent"), None, user_coi.workspace)
    term.wait_for("dummy: 0 lines of history")
    term.type("/exit")
    term.type("touch ~/persisted-file && sudo poweroff")
    term.wait_for("COI-EXITED-0", timeout=60)
    assert incus_client.instance_state(name_of(user_coi, 1))["status"] == "Stopped"
    again = terminal(user_coi.argv("shell", "--slot", "1"), None, user_coi.workspace)
    again.wait_for("dummy: 0 lines of history")
    again.type("/exit")
    again.type("ls ~/persisted-file && echo FOUND-IT")
    again.wait_for("FOUND-IT")


def test_attach_without_a_session_is_a_one_line_not_found(user_coi):
    done = user_coi("attach", "--workspace", str(user_coi.workspace))
    assert done.returncode == 3, done.stderr
    assert done.stderr.count("\n") == 1


def test_attach_to_a_foreign_container_is_refused(user_coi, make_container):
    foreign = make_container(start=False).name
    done = user_coi("attach", foreign)
    assert done.returncode == 3, done.stderr
    assert f"{foreign} is not one of your coi sessions" in done.stderr


def test_tmux_send_to_a_missing_container_fails_with_exit_3(user_coi):
    done = user_coi("tmux", "send", "coi-test-nonexistent-1", "x")
    assert done.returncode == 3, done.stderr


def test_slot_record_piped_into_coi_shell_starts_that_slot(user_coi, terminal, incus_client):
    # `coi slot next` is coi-slot next and `coi shell` is coi-shell (git's rule), so
    # this is `coi-slot next --slot 4 | coi-shell`, both as the user.
    piped = [*user_coi.argv("slot", "next", "--slot", "4"), "|", *user_coi.argv("shell")]
    term = terminal(piped, None, user_coi.workspace)
    term.wait_for("dummy: 0 lines of history")
    name = name_of(user_coi, 4)
    assert incus_client.instance_state(name)["status"] == "Running"
    term.type("/exit")
    term.type("sudo poweroff")
    term.wait_for("COI-EXITED-0", timeout=60)
    assert not incus_client.instance_exists(name)


def test_shell_on_a_running_persistent_slot_attaches_instead_of_creating(user_coi, terminal):
    first = terminal(user_coi.argv("shell", "--persistent", "--slot", "5"), None,
                     user_coi.workspace)
    first.wait_for("dummy: 0 lines of history")
    first.type("only once")
    first.wait_for("noted only once")
    first.keys("C-b", "d")
    first.wait_for("COI-EXITED-0")
    again = terminal(user_coi.argv("shell", "--slot", "5"), None, user_coi.workspace)
    # The same tmux session, not a new container: what was typed before is on screen.
    again.wait_for("noted only once")


# -- egress rules ---------------------------------------------------------------------------------


def net_status(user_coi, host_service):
    """`coi network status` as the user, over the state the host service keeps (next to
    its socket in the test run; /var/lib/coi/net on a real machine)."""
    state = host_service.state_dir
    done = user_coi("network", "status", "--format", "json",
                    env={"COI_NET_STATE_DIR": str(state)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["containers"]


def test_run_puts_egress_rules_in_place_and_removes_them_with_the_container(user_coi,
                                                                           host_service):
    name = name_of(user_coi, 6)
    child = popen_as_user(user_coi, "run", "--slot", "6", "--", "sleep", "3")
    try:
        deadline = time.monotonic() + 20
        seen = []
        while time.monotonic() < deadline and not seen:
            seen = [r for r in net_status(user_coi, host_service) if r.get("container") == name]
            time.sleep(0.2)
        assert seen, "no rules appeared for the session container"
        assert seen[0]["mode"] == "restricted"
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    assert [r for r in net_status(user_coi, host_service) if r.get("container") == name] == []
