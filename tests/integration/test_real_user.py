"""coi as the people it is for: a non-root member of incus-admin, added after setup,
who installed coi the documented way (fixtures `installed_user`, `user_coi`), in
the DEFAULT network mode, through the checkout's host service (`host_service`).

Also the lifecycle rules that protect what users own: a persistent container is
never deleted by a command's flags, a failed save keeps the container, long
Incus operations are waited for, and an exec Incus failed to start is retried.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

from coi_common import executables, hostservice, naming, proc
from coi_common import incus as incus_module
from coi_common.errors import CoiError, NotFound
from coi_net import policy as np

pytestmark = pytest.mark.incus
ROOT = Path(__file__).resolve().parents[2]


def name_of(user_coi, slot: int) -> str:
    return naming.container_name(str(user_coi.workspace), slot, user_coi.prefix)


def status_of(client, name: str) -> str:
    try:
        return str(client.instance_state(name)["status"])
    except NotFound:
        return "Gone"


# -- a member added after setup, default mode --------------------------------------------


def test_a_member_added_after_setup_runs_a_default_session_and_owns_what_it_makes(
        user_coi, incus_client):
    done = user_coi("run", "--", "sh", "-c", "id -u; touch /workspace/x")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1000\n"
    made = user_coi.workspace / "x"
    assert (made.stat().st_uid, made.stat().st_gid) == (user_coi.user.uid, user_coi.user.gid)
    assert incus_client.instances(user_coi.prefix) == []


def test_the_host_service_applies_rules_for_the_member_s_session_and_removes_them(
        user_coi, host_service, incus_client):
    """A persistent run leaves its container up: its rules are then in the service's
    table, keyed on its fixed host-side interface; `coi kill` removes both."""
    done = user_coi("run", "--persistent", "--", "true")
    assert done.returncode == 0, done.stderr
    name = name_of(user_coi, 1)
    instance = incus_client.instance_config(name)
    assert instance["config"]["user.coi.network"] == "restricted"
    assert instance["config"]["user.coi.host_uid"] == str(user_coi.user.uid)
    interface = np.host_name_for(name, "default")
    assert interface in _table(host_service.table)
    killed = user_coi("kill", name)
    assert killed.returncode == 0, killed.stderr
    assert interface not in _table(host_service.table)


def _table(table: str) -> str:
    listed = proc.run(["nft", "list", "table", "bridge", table], check=False)
    return listed.stdout


def test_a_user_outside_incus_admin_cannot_use_the_host_service(make_test_user,
                                                                   host_service):
    outsider = make_test_user(incus_admin=False)
    done = outsider.run(["python3", "-c", "import socket; s = socket.socket(socket.AF_UNIX); "
                         f"s.connect({host_service.socket!r})"])
    assert done.returncode != 0
    assert "Permission denied" in done.stderr


def test_the_service_grants_an_id_map_only_for_the_caller_itself(installed_user,
                                                                   host_service):
    code = ("import json, os, sys; from coi_common import hostservice; "
            "print(json.dumps(hostservice.call('idmap_grant')))")
    python = installed_user.home / ".local/share/coi/venv/bin/python"
    done = installed_user.run([str(python), "-c", code],
                              env={"COI_HOST_SOCKET": host_service.socket})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["uid"], result["gid"]) == (installed_user.uid, installed_user.gid)
    for path, ident in (("/etc/subuid", installed_user.uid), ("/etc/subgid", installed_user.gid)):
        assert f"root:{ident}:1" in Path(path).read_text().splitlines()


def test_a_refused_verb_is_a_one_line_error_record(installed_user, host_service):
    code = ("from coi_common import hostservice\n"
            "try:\n    hostservice.call('net_apply', container='../etc', mode='open')\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)")
    python = installed_user.home / ".local/share/coi/venv/bin/python"
    done = installed_user.run([str(python), "-c", code],
                              env={"COI_HOST_SOCKET": host_service.socket})
    assert done.stdout.startswith("BadInput"), done.stdout + done.stderr
    assert len(done.stdout.strip().splitlines()) == 1


def test_a_verb_an_older_service_lacks_says_to_run_setup_again(host_service, monkeypatch):
    monkeypatch.setenv("COI_HOST_SOCKET", host_service.socket)
    with pytest.raises(CoiError) as refused:
        hostservice.call("view_build_v9", timeout=10)
    assert "unknown verb 'view_build_v9'" in refused.value.one_line()
    assert "'sudo coi setup'" in refused.value.one_line()


# -- persistent containers are the user's ---------------------------------------------------


def test_run_on_a_persistent_slot_without_the_flag_keeps_the_container(user_coi,
                                                                      incus_client):
    first = user_coi("run", "--persistent", "--slot", "3", "--", "sudo", "touch",
                     "/opt/installed-here")
    assert first.returncode == 0, first.stderr
    again = user_coi("run", "--slot", "3", "--", "test", "-e", "/opt/installed-here")
    assert again.returncode == 0, again.stderr
    assert status_of(incus_client, name_of(user_coi, 3)) != "Gone"


def test_the_persistent_flow_comes_back_to_the_same_container_with_what_was_installed(
        user_coi, terminal, incus_client):
    term = terminal(user_coi.argv("shell", "--persistent"), None, user_coi.workspace)
    term.wait_for("dummy: 0 lines of history")
    term.type("installed a package")
    term.wait_for("noted installed a package")
    term.type("/exit")
    term.type("sudo touch /opt/package-marker && echo MARKED")
    term.wait_for("MARKED")
    term.keys("C-b", "d")
    term.wait_for("COI-EXITED-0")
    name = name_of(user_coi, 1)
    back = terminal(user_coi.argv("attach"), None, user_coi.workspace)
    back.wait_for("MARKED")
    back.type("sudo poweroff")
    back.wait_for("COI-EXITED-0", timeout=90)
    assert status_of(incus_client, name) == "Stopped"
    resumed = terminal(user_coi.argv("shell", "--persistent", "--resume"), None,
                       user_coi.workspace)
    resumed.wait_for("dummy: resumed", timeout=90)
    assert "dummy: 1 lines of history" in resumed.screen()
    resumed.type("/exit")
    resumed.type("test -e /opt/package-marker && echo SAME-CONTAINER")
    resumed.wait_for("SAME-CONTAINER")
    assert [i["name"] for i in incus_client.instances(user_coi.prefix)] == [name]


def test_attach_to_a_stopped_persistent_container_names_the_real_command(user_coi):
    made = user_coi("run", "--persistent", "--slot", "2", "--", "true")
    assert made.returncode == 0, made.stderr
    stopped = user_coi("shutdown", name_of(user_coi, 2))
    assert stopped.returncode == 0, stopped.stderr
    done = user_coi("attach")
    assert done.returncode != 0
    assert "coi shell --slot 2 --persistent" in done.stderr
    assert " N" not in done.stderr


# -- what fails before anything is created --------------------------------------------------


def test_shell_without_a_terminal_is_refused_before_any_container_exists(user_coi,
                                                                          incus_client):
    done = user_coi("shell")
    assert done.returncode == 2
    assert "needs a terminal" in done.stderr
    assert incus_client.instances(user_coi.prefix) == []


def test_a_missing_image_is_refused_before_any_container_exists(user_coi, incus_client):
    done = user_coi("run", "--image", "coi-test-no-such-image", "--", "true")
    assert done.returncode == 3, done.stderr
    assert "coi build" in done.stderr
    assert incus_client.instances(user_coi.prefix) == []


def test_an_unknown_tool_is_refused_and_holds_no_slot(user_coi, incus_client):
    done = user_coi("run", "--tool", "no-such-tool", "--", "true")
    assert done.returncode != 0
    assert "no-such-tool" in done.stderr
    assert "Traceback" not in done.stderr
    again = user_coi("run", "--", "true")
    assert again.returncode == 0, again.stderr


# -- a save that fails keeps the container ----------------------------------------------


def test_a_failed_save_keeps_the_ephemeral_container_and_says_how_to_retry(user_coi,
                                                                          incus_client):
    store = user_coi.user.home / ".coi" / "sessions-dummy"
    user_coi.user.run(["mkdir", "-p", str(store)])
    os.chmod(store, 0o500)  # the user's own store refuses the save
    try:
        done = user_coi("run", "--", "sh", "-c", "mkdir -p ~/.dummy && echo x > ~/.dummy/history")
        assert done.returncode == 0, done.stderr
        assert "could not save" in done.stderr
        assert "coi kill --no-save" in done.stderr
        name = name_of(user_coi, 1)
        assert status_of(incus_client, name) != "Gone"
    finally:
        os.chmod(store, stat.S_IRWXU)
    retried = user_coi("kill", name_of(user_coi, 1))
    assert retried.returncode == 0, retried.stderr
    assert status_of(incus_client, name_of(user_coi, 1)) == "Gone"


# -- Incus: long operations and transient exec failures -------------------------------------


def test_an_operation_longer_than_the_socket_timeout_is_waited_for(make_container,
                                                                   monkeypatch):
    box = make_container()
    monkeypatch.setattr(incus_module, "WAIT_ROUND", 1)
    client = incus_module.Incus(timeout=2)
    started = time.monotonic()
    result = client.request("POST", f"/1.0/instances/{box.name}/exec",
                            {"command": ["sh", "-c", "sleep 4; exit 3"],
                             "wait-for-websocket": False, "interactive": False,
                             "record-output": True})
    assert time.monotonic() - started >= 4
    assert result["metadata"]["return"] == 3


def _incus_failing_once(tmp_path: Path, word: str, failure: str) -> Path:
    """A directory holding an `incus` in front of the real one: its first call with
    `word` among its arguments runs the shell `failure` instead; a marker file says so."""
    real = executables.which("incus")
    marker = tmp_path / "failed-once"
    wrapper = tmp_path / "bin" / "incus"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do [ "$a" = {word} ] && [ ! -e {marker} ] && touch {marker} && '
        f"{{ {failure}; }}; done\n"
        f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper.parent


def _run_as_owner(coi_env, tmp_path: Path, test_image: str, test_user, path: Path,
                  *command: str) -> tuple[proc.Result, str]:
    """`coi run --network open -- COMMAND` by root in a workspace of the test user (code
    acts as its owner), with `path` first on PATH; (its result, its COI_TRACE)."""
    trace = tmp_path / "trace"
    workspace = tmp_path / "ws"
    workspace.mkdir()
    os.chown(workspace, test_user.uid, test_user.gid)
    env = coi_env.environ(PATH=f"{path}:{os.environ['PATH']}",
                          COI_DEFAULTS_IMAGE=test_image, COI_TOOL_NAME="dummy",
                          COI_TRACE=str(trace))
    done = proc.run([str(ROOT / "bin" / "coi"), "run",
                                  "--workspace", str(workspace), "--network", "open", "--",
                                  *command], env=env, check=False, timeout=120)
    return done, trace.read_text() if trace.exists() else ""


def test_an_exec_incus_failed_to_start_is_tried_again_unseen(coi_env, tmp_path, test_image,
                                                            test_user):
    """A wrapper in front of the real incus answers the first exec as Incus does under
    load; coi runs it again and the user sees only the command's own output."""
    path = _incus_failing_once(tmp_path, "exec", "echo 'Error: Failed to retrieve PID of "
                                                 "executing child process' >&2; exit 1")
    done, trace = _run_as_owner(coi_env, tmp_path, test_image, test_user, path,
                                "echo", "hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello\n"
    assert "Failed to retrieve PID" not in done.stderr
    assert (tmp_path / "failed-once").exists()
    assert " retry exec " in trace


def test_a_save_whose_exec_ended_without_a_word_is_tried_again(coi_env, tmp_path, test_image,
                                                              test_user):
    """The state stream's first exec ends at once, silent, with nothing read (seen right
    after a stopped container was started for a save): tar never ran, so the save runs
    it again and the session is saved."""
    path = _incus_failing_once(tmp_path, "--ignore-failed-read", "exit 1")
    done, trace = _run_as_owner(coi_env, tmp_path, test_image, test_user, path, "sh", "-c",
                                "mkdir -p ~/.dummy && echo kept > ~/.dummy/history")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "failed-once").exists()
    assert " retry exec " in trace
    store = coi_env.home / ".coi" / "sessions-dummy"  # the store of root, who ran it
    assert [p for p in store.rglob("history") if p.read_text() == "kept\n"], done.stderr


def test_the_exec_retry_gives_up_after_a_few_tries_with_incus_s_words(monkeypatch):
    monkeypatch.setattr(incus_module.time, "sleep", lambda _seconds: None)
    calls = []

    def attempt():
        calls.append(1)
        return "Error: Failed to retrieve PID of executing child process"

    spec = incus_module.ExecSpec("c", ("true",))
    last = incus_module.retry_exec(spec, attempt, incus_module.exec_not_started)
    assert len(calls) == len(incus_module.EXEC_PAUSES) + 1
    assert "Failed to retrieve PID" in last


# -- whose store, whose exit status -------------------------------------------------------


def test_root_ending_a_member_s_session_saves_it_into_the_member_s_store(user_coi, coi_env):
    made = user_coi("run", "--persistent", "--", "sh", "-c",
                    "mkdir -p ~/.dummy && echo remembered > ~/.dummy/history")
    assert made.returncode == 0, made.stderr
    name = name_of(user_coi, 1)
    root_env = coi_env.environ(COI_CONTAINER_PREFIX=user_coi.prefix)
    done = proc.run([str(ROOT / "bin" / "coi"), "shutdown", name], env=root_env, check=False,
                    timeout=120)
    assert done.returncode == 0, done.stderr
    store = user_coi.user.home / ".coi" / "sessions-dummy"
    saved = [p for p in store.rglob("history") if p.read_text() == "remembered\n"]
    assert saved, f"no saved history under {store}: {done.stderr}"
    assert saved[0].stat().st_uid == user_coi.user.uid
    assert not (coi_env.home / ".coi" / "sessions-dummy").exists()


def test_attach_exits_with_the_status_of_what_it_ran(user_coi, terminal):
    made = user_coi("run", "--persistent", "--", "true")
    assert made.returncode == 0, made.stderr
    term = terminal(user_coi.argv("attach", "--bash"), None, user_coi.workspace)
    term.wait_for("code@")
    term.type("exit 3")
    term.wait_for("COI-EXITED-3")


def test_doctor_passes_for_a_member_added_after_setup_with_the_service_setup_started(
        installed_user):
    """No COI_HOST_SOCKET: the member talks to the host service `coi setup` installed
    (make test runs setup first) — the README's path, end to end."""
    done = installed_user.run([str(installed_user.coi), "doctor", "--format", "json"])
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["network rules"]["ok"], checks["network rules"]
    assert "/run/coi/host.sock" in checks["network rules"]["detail"]


@pytest.mark.parametrize("args", [["--mount", "~/.ssh:/keys"], ["--workspace", "/"],
                                  ["--storage", "/etc"], ["--mount", "~:/home-copy"]])
def test_mounting_secrets_home_or_system_paths_is_refused_before_anything_exists(
        user_coi, incus_client, args):
    ssh = user_coi.user.home / ".ssh"
    user_coi.user.run(["mkdir", "-p", str(ssh)])
    expanded = [a.replace("~", str(user_coi.user.home)) for a in args]
    done = user_coi("run", *expanded, "--", "true")
    assert done.returncode == 2, done.stderr
    assert "may not be mounted into a session" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert incus_client.instances(user_coi.prefix) == []


# -- resource limits ----------------------------------------------------------------------


BOMB = ("last=; n=0; for i in $(seq 300); do sleep 20 & "
        'if [ "$!" != "$last" ]; then n=$((n+1)); last=$!; fi; done; echo started=$n')
"""A bounded fork bomb: 300 background sleeps of 20 s, counted by their pids."""


def test_a_fork_bomb_stops_at_the_process_limit(user_coi):
    limited = user_coi("run", "--processes", "100", "--", "sh", "-c", BOMB, timeout=120)
    assert limited.returncode != 0
    assert "fork" in limited.stderr.lower(), limited.stdout + limited.stderr
    assert "started=300" not in limited.stdout
    # The control: the default limit (4096) lets the same 300 start.
    free = user_coi("run", "--", "sh", "-c", BOMB, timeout=120)
    assert "started=300" in free.stdout, free.stdout + free.stderr


def test_a_memory_hog_is_killed_inside_the_container(user_coi):
    """Bounded: the hog holds at most 600 MiB even if no limit applied (then the test
    fails instead of the host); with --memory 256MiB the kernel kills it inside."""
    done = user_coi("run", "--memory", "256MiB", "--", "sh", "-c",
                    "head -c 600M /dev/zero | tail > /dev/null; echo status=$?", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "status=137" in done.stdout, done.stdout + done.stderr


def test_default_limits_are_set_and_a_bad_one_is_refused_before_anything_exists(
        user_coi, incus_client):
    made = user_coi("run", "--persistent", "--", "true")
    assert made.returncode == 0, made.stderr
    keys = incus_client.instance_config(name_of(user_coi, 1))["config"]
    assert (keys["limits.processes"], keys["limits.memory"]) == ("4096", "50%")
    bad = user_coi("run", "--slot", "2", "--memory", "lots", "--", "true")
    assert bad.returncode == 2
    assert "--memory 'lots'" in bad.stderr
    assert [i["name"] for i in incus_client.instances(user_coi.prefix)] == [name_of(user_coi, 1)]


def test_a_session_whose_tool_cannot_start_is_removed_and_says_so(user_coi, terminal,
                                                                  incus_client):
    """An `incus` in front of the real one fails every `tmux new-session` exec: coi shell
    must not leave a running container without the tool."""
    wrappers = Path(tempfile.mkdtemp(prefix="coi-test-wrap-", dir="/tmp"))
    try:
        wrappers.chmod(0o755)
        fake = wrappers / "incus"
        fake.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in *"new-session "*) '
                        "echo 'Error: tmux refused (test)' >&2; exit 1;; esac; done\n"
                        f'exec {executables.which("incus")} "$@"\n')
        fake.chmod(0o755)
        path = f"{wrappers}:{user_coi.user.home}/.local/bin:/usr/bin:/bin"
        broken = dataclasses.replace(user_coi, env={**user_coi.env, "PATH": path})
        term = terminal(broken.argv("shell"), None, user_coi.workspace)
        term.wait_for("COI-EXITED-1", timeout=90)
        assert "could not start tmux" in term.screen()
        assert "was removed" in term.screen()
        assert incus_client.instances(user_coi.prefix) == []
    finally:
        shutil.rmtree(wrappers, ignore_errors=True)


def test_a_workspace_file_asking_for_open_network_gets_restricted_until_trusted(
        user_coi, incus_client):
    def write_config(text):
        done = user_coi.user.run(["sh", "-c", f"printf '%s' '{text}' > .coi.toml"],
                                 cwd=user_coi.workspace)
        assert done.returncode == 0, done.stderr

    def mode():
        shown = user_coi("config", "show", "--format", "json")
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)["values"]["network.mode"]["value"]

    write_config('[network]\nmode = "open"\n')
    made = user_coi("run", "--persistent", "--", "true")
    assert made.returncode == 0, made.stderr
    assert "ignoring network.mode" in made.stderr
    keys = incus_client.instance_config(name_of(user_coi, 1))["config"]
    assert keys["user.coi.network"] == "restricted"
    trusted = user_coi("trust")
    assert trusted.returncode == 0, trusted.stderr
    assert mode() == "open"
    write_config('[network]\nmode = "open"\n# changed inside\n')
    assert mode() == "restricted"
    assert "changed since trusted" in user_coi("trust", "--show").stdout
