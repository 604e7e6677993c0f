"""A session ended from two sides at once: `coi shutdown NAME` while `coi shell` is attached.

The shutdown stops the container; the attached shell sees it go down and
ends the session too. Both end it through sessions.end_session, under the
container's lock: whoever comes first saves the session and deletes (or
keeps) the container, the other waits, finds the work done and does none of
it again, without an error.

Each case runs in both orders: as it happens by itself (the shell notices
the stop while the shutdown still waits for it, so the shell ends the
session and the shutdown finds it done), and with the shell's processes
paused (SIGSTOP) until the shutdown is over, so the shell comes second.

coi runs as the installed non-root member of incus-admin (`user_coi`); the
shell runs in a real terminal (a host tmux session), the shutdown in a
second process. The AI tool is the `dummy` stand-in, whose history is the
session state that is saved.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from coi_common import locks, naming

pytestmark = pytest.mark.incus

COI = str(Path(__file__).resolve().parents[2] / "bin" / "coi")
SAVE_LINE = re.compile(r"\bcoi: saved session (\S+) of (\S+) \((created|updated|forked), ")
"""What a save prints (saved_sessions.SaveResult.line): one line per save."""
TROUBLE = ("could not", "failed", "error", "traceback", "still running", "not found")
ORDERS = ["shell-notices-first", "shutdown-ends-first"]


def attached_shell(user_coi, terminal, *flags):
    """`coi shell FLAGS` in a terminal, the dummy tool up with one line of history."""
    term = terminal(user_coi.argv("shell", *flags), None, user_coi.workspace)
    term.wait_for("dummy: 0 lines of history")
    term.type("before shutdown")
    term.wait_for("dummy: noted before shutdown")
    return term


def descendants(pid):
    """The pids of every process below `pid` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def paused(term):
    """Every process the terminal runs (coi shell and its incus exec) stopped within."""
    pane = subprocess.run(["tmux", "display-message", "-p", "-t", term.name, "#{pane_pid}"],
                          capture_output=True, text=True, check=True).stdout
    pids = descendants(int(pane))
    assert pids, "the terminal runs nothing"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in reversed(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def shutdown_while_attached(term, order, shutdown):
    """`shutdown()` (coi shutdown NAME, from another process) while the shell is
    attached, in `order`; then the shell's end. Returns the shutdown's result and
    the shell's screen."""
    if order == "shutdown-ends-first":
        with paused(term):
            done = shutdown()
    else:
        done = shutdown()
    term.wait_for("COI-EXITED-", timeout=180)
    return done, term.screen()


def member_shutdown(user_coi, name):
    return lambda: user_coi("shutdown", "--timeout", "30", name)


def saves_of(name, *outputs):
    return [m.group(0) for text in outputs for m in SAVE_LINE.finditer(text)
            if m.group(2) == name]


def trouble_in(*outputs):
    return [line for text in outputs for line in text.splitlines()
            if any(word in line.lower() for word in TROUBLE)]


def saved(user_coi):
    listed = user_coi("session", "list", "--workspace", str(user_coi.workspace),
                      "--format", "json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)["sessions"]


def exit_line(screen):
    return next(line for line in screen.splitlines() if line.startswith("COI-EXITED-"))


def shown(screen):
    """The screen's non-empty lines, for a failure message."""
    return "\n".join(line for line in screen.splitlines() if line.strip())


def assert_ended_once(user_coi, name, done, screen, *, kept):
    """Both commands succeeded without an error line, one save between them, the
    container deleted (or, `kept`, stopped) and its session in the user's store."""
    what = "kept (persistent)" if kept else "deleted"
    assert done.returncode == 0, done.stderr
    assert exit_line(screen) == "COI-EXITED-0", shown(screen)
    assert done.stdout == f"shut down {name}, {what}\n", done.stderr
    ended = f"coi: kept {name} (persistent)" if kept else f"coi: removed {name}"
    assert ended in screen, shown(screen)
    assert len(saves_of(name, done.stderr, screen)) == 1, (done.stderr, shown(screen))
    assert trouble_in(done.stdout, done.stderr, screen) == []
    [session] = saved(user_coi)
    assert session["container"] == name


@pytest.mark.parametrize("order", ORDERS)
def test_shutdown_during_an_attached_shell_saves_once_and_deletes_once(
        user_coi, terminal, incus_client, order):
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    term = attached_shell(user_coi, terminal)
    done, screen = shutdown_while_attached(term, order, member_shutdown(user_coi, name))
    assert_ended_once(user_coi, name, done, screen, kept=False)
    assert not incus_client.instance_exists(name)


@pytest.mark.parametrize("order", ORDERS)
def test_shutdown_during_an_attached_persistent_shell_saves_once_and_keeps_it(
        user_coi, terminal, incus_client, order):
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    term = attached_shell(user_coi, terminal, "--persistent")
    done, screen = shutdown_while_attached(term, order, member_shutdown(user_coi, name))
    assert_ended_once(user_coi, name, done, screen, kept=True)
    assert incus_client.instance_state(name)["status"] == "Stopped"


@pytest.mark.parametrize("order", ORDERS)
def test_roots_shutdown_during_a_members_attached_shell_saves_once_into_their_store(
        user_coi, terminal, incus_client, coi_env, host_service, order):
    """The member's shell and root's shutdown meet on one lock in /run/coi/locks."""
    locks.prepare_ending_locks(incus_client)  # what the host service does at its start
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    term = attached_shell(user_coi, terminal)
    # Root removes the rules from where the host service put them.
    env = coi_env.environ(COI_CONTAINER_PREFIX=user_coi.prefix, COI_NFT_TABLE=host_service.table,
                          COI_NET_STATE_DIR=str(host_service.state_dir))

    def root_shutdown():
        return subprocess.run([COI, "shutdown", "--timeout", "30", name], env=env,
                              cwd=user_coi.workspace, capture_output=True, text=True,
                              timeout=180, check=False)

    done, screen = shutdown_while_attached(term, order, root_shutdown)
    assert_ended_once(user_coi, name, done, screen, kept=False)
    assert not incus_client.instance_exists(name)


def test_a_kept_container_is_saved_again_only_after_it_ran_again(user_coi, incus_client):
    """ENDED_KEY: once a persistent container's end saved it, later ends (shutdown, kill)
    neither save it nor start it for a copy, until it has run again."""
    wrote = user_coi("run", "--persistent", "--", "sh", "-c",
                     "mkdir -p ~/.dummy && echo one >> ~/.dummy/history")
    assert wrote.returncode == 0, wrote.stderr
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    first = user_coi("shutdown", "--timeout", "30", name)
    assert first.returncode == 0, first.stderr
    assert len(saves_of(name, first.stderr)) == 1, first.stderr
    last_start = incus_client.instance_config(name)["last_used_at"]

    again = user_coi("shutdown", name)
    assert (again.returncode, again.stdout) == (0, f"shut down {name}, kept (persistent)\n")
    assert saves_of(name, again.stderr) == [], again.stderr
    assert incus_client.instance_config(name)["last_used_at"] == last_start  # not started

    incus_client.set_state(name, "start")
    ran_again = user_coi("shutdown", "--timeout", "30", name)
    assert ran_again.returncode == 0, ran_again.stderr
    assert len(saves_of(name, ran_again.stderr)) == 1, ran_again.stderr

    killed = user_coi("kill", name)
    assert (killed.returncode, killed.stdout) == (0, f"killed {name}\n"), killed.stderr
    assert saves_of(name, killed.stderr) == [], killed.stderr
    assert not incus_client.instance_exists(name)
    assert len(saved(user_coi)) == 1
