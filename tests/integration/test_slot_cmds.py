"""`coi-slot next|list|kill|shutdown|clean|persist` against the real daemon.

Session-like containers are made here from the test image with the
`user.coi.*` keys a session sets and the name of their workspace slot under
this test's prefix (coi_env), so nothing outside the test is ever seen or
touched. Workspaces are directories in open_tmp (every user can read them). Every
container under the
test's prefix is force-deleted when the test ends, whatever happened.
Stops that are not about grace use a short --timeout. Whose container it is
is tested with real non-root users (uids 1001 and 1002 in incus-admin, run
through setpriv), each with a home of their own.
"""

import grp
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest

from coi_common import naming, sessions
from coi_common.errors import CoiError, NotFound
from coi_common.incus import Incus
from coi_common.protocol import parse_record

pytestmark = pytest.mark.incus

ROOT = Path(__file__).resolve().parents[2]
COI_SLOT = str(ROOT / "bin" / "coi-slot")
COI = str(ROOT / "bin" / "coi")
PROFILE = "coi"
INCUS_GROUP = grp.getgrnam("incus-admin").gr_gid
ANA, BEN = 1001, 1002
"""Two host users (numbers only) who start and end sessions."""
IGNORES_SHUTDOWN = {"raw.lxc": "lxc.signal.halt = SIGCONT"}
"""Init gets SIGCONT instead of SIGPWR for a clean stop, so the stop never happens."""


class User:
    """A non-root host user in incus-admin with a home of their own (for the store)."""

    def __init__(self, uid: int, home: Path, env: dict) -> None:
        self.uid = uid
        self.argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                     f"--groups={INCUS_GROUP}"]
        self.env = {**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                    "COI_SYSTEM_CONFIG": str(home / "no-system-config.toml")}


@pytest.fixture
def users(coi_env, open_tmp) -> dict[int, User]:
    """ANA and BEN, each with an empty home they own."""
    made = {}
    for uid in (ANA, BEN):
        home = open_tmp / f"home-{uid}"
        home.mkdir()
        os.chown(home, uid, uid)
        made[uid] = User(uid, home, coi_env.environ())
    return made


def coi_slot(*args: str, stdin: str | None = None, timeout: float = 120,
             user: User | None = None, program: str = COI_SLOT, steps: bool = False):
    """`bin/coi-slot ARGS` (or `program`) with stdin not a terminal, as root or as
    `user`: (status, stdout, stderr). The save's step lines (docs/sessions.md, "What a
    session says") are left out of stderr unless `steps`: most tests look at the rest;
    test_kill_tells_the_steps_of_its_save looks at them."""
    prefix, env = ([], None) if user is None else (user.argv, user.env)
    done = subprocess.run([*prefix, program, *args], input=stdin or "", capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)
    err = done.stderr if steps else "".join(
        line for line in done.stderr.splitlines(keepends=True) if not SAVE_STEP.match(line))
    return done.returncode, done.stdout, err


SAVE_STEP = re.compile(r"coi: (saving the session of|saved session|nothing to save in) ")


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


MakeSession = Callable[..., str]


@pytest.fixture
def make_session(coi_env, incus_client: Incus, test_image: str,
                 open_tmp: Path) -> Iterator[MakeSession]:
    """make_session(workspace="ws", slot=1, persistent=False, start=True, config=None,
    owner=0) -> name.

    A container as a coi session of host user `owner` leaves it: slot `slot` of
    open_tmp/workspace (made when missing), coi's user.coi.* keys, profile coi.
    At the end every instance under the test's prefix goes, also those a command
    created.
    """

    def factory(workspace: str = "ws", slot: int = 1, *, persistent: bool = False,
                start: bool = True, config: dict | None = None, owner: int = 0) -> str:
        path = open_tmp / workspace
        path.mkdir(exist_ok=True)
        name = naming.container_name(path, slot, coi_env.prefix)
        keys = {f"{sessions.KEY}workspace": str(path.resolve()),
                f"{sessions.KEY}slot": str(slot),
                f"{sessions.KEY}persistent": str(persistent).lower(),
                f"{sessions.KEY}image": test_image, f"{sessions.KEY}tool": "claude",
                f"{sessions.KEY}network": "restricted",
                f"{sessions.KEY}host_uid": str(owner)}
        incus_client.create_instance(name, test_image, profiles=[PROFILE],
                                     config={**keys, **(config or {})}, start=start)
        return name

    yield factory
    failures = []
    for instance in incus_client.instances(coi_env.prefix):
        try:
            incus_client.delete_instance_force(instance["name"])
        except CoiError as exc:
            failures.append(exc.one_line())
    if failures:
        pytest.fail("could not delete test containers: " + "; ".join(failures), pytrace=False)


def exists(client: Incus, name: str) -> bool:
    return client.instance_exists(name)


def status(client: Incus, name: str) -> str:
    return client.instance_state(name)["status"]


def wait_running(client: Incus, name: str, timeout: float = 20) -> None:
    """Until systemd inside is far enough to act on a clean-stop request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = client.cli(["exec", name, "--", "systemctl", "is-system-running"], check=False)
        if done.stdout.strip() in ("running", "degraded"):
            return
        time.sleep(0.2)
    pytest.fail(f"{name} did not finish booting in {timeout:g} s", pytrace=False)


# -- next ---------------------------------------------------------------------------------------


def test_ten_concurrent_next_calls_get_ten_distinct_slots_and_an_eleventh_is_refused(
        coi_env, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    calls = [subprocess.Popen([COI_SLOT, "next", "--workspace", str(workspace)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True) for _ in range(10)]
    outputs = [call.communicate(timeout=60) for call in calls]
    assert [call.returncode for call in calls] == [0] * 10, outputs
    records = [sessions.SlotRecord.from_record(parse_record(out, "slot")) for out, _ in outputs]
    assert sorted(r.slot for r in records) == list(range(1, 11))
    assert {r.container for r in records} == \
        {naming.container_name(workspace, n, coi_env.prefix) for n in range(1, 11)}
    assert all(err == "" for _, err in outputs)

    code, out, err = coi_slot("next", "--workspace", str(workspace))
    assert (code, out) == (1, "")
    line = one_line(err)
    assert line.startswith(f"coi-slot: all 10 slots of {workspace.resolve()}")
    assert "in use" in line


def test_next_skips_slots_whose_container_exists(coi_env, make_session, open_tmp):
    make_session("ws", 1, start=False)
    make_session("ws", 2, start=False)
    code, out, err = coi_slot("next", "--workspace", str(open_tmp / "ws"), "--format", "json")
    assert (code, err) == (0, "")
    record = parse_record(out, "slot")
    assert record["slot"] == 3
    assert record["container"] == naming.container_name(open_tmp / "ws", 3, coi_env.prefix)


def test_next_lays_flags_and_the_profile_over_the_config(coi_env, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (coi_env.config_home / "coi").mkdir()
    (coi_env.config_home / "coi" / "config.toml").write_text(
        '[defaults]\nenvironment = { A = "config", B = "kept" }\n'
        '[profiles.rust]\nimage = "coi-rust"\n')
    code, out, err = coi_slot("next", "--workspace", str(workspace), "--profile", "rust",
                              "--persistent", "--env", "A=flag", "--env", "C=new")
    assert (code, err) == (0, "")
    record = sessions.SlotRecord.from_record(parse_record(out, "slot"))
    assert (record.image, record.persistent, record.slot) == ("coi-rust", True, 1)
    assert record.environment == {"A": "flag", "B": "kept", "C": "new"}

    code, out, err = coi_slot("next", "--workspace", str(workspace), "--slot", "1")
    assert (code, out) == (1, "")
    assert "slot 1 of" in one_line(err)  # reserved by the call above, no container yet


# -- list -----------------------------------------------------------------------------------------


def test_list_shows_coi_containers_with_mode_status_slot_and_address(
        coi_env, make_session, make_container, wait_for_ipv4, incus_client, open_tmp):
    running = make_session("ws", 2, persistent=True)
    stopped = make_session("ws", 1, start=False)
    foreign = make_container(start=False).name  # coi-test-..., no user.coi keys
    address = wait_for_ipv4(running)

    code, out, err = coi_slot("list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["NAME", "MODE", "STATUS", "SLOT", "IPV4"]
    assert [line.split()[:5] for line in lines[1:]] == [
        [stopped, "ephemeral", "STOPPED", "1", "-"],
        [running, "persistent", "RUNNING", "2", address]]
    assert foreign not in out

    code, out, err = coi_slot("list", "--format", "json")
    assert (code, err) == (0, "")
    record = parse_record(out, "container_list")
    assert "saved_sessions" not in record
    by_name = {c["name"]: c for c in record["active_containers"]}
    assert set(by_name) == {running, stopped}
    assert by_name[running]["ipv4"] == address
    assert by_name[running]["persistent"] is True
    assert by_name[running]["workspace"] == str((open_tmp / "ws").resolve())
    assert by_name[stopped] | {"created_at": None} == {
        "name": stopped, "status": "Stopped", "persistent": False, "mode": "ephemeral",
        "workspace": str((open_tmp / "ws").resolve()), "ipv4": "", "image": "coi-test-image",
        "created_at": None, "slot": 1, "tool": "claude", "network": "restricted",
        "owner_uid": 0, "pooled": False, "remote": "local", "location": ""}


def test_list_of_nothing_is_one_friendly_line_or_an_empty_list(coi_env):
    assert coi_slot("list") == (0, "no coi containers\n", "")
    code, out, err = coi_slot("list", "--format", "json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"coi": 1, "kind": "container_list", "active_containers": []}


def test_list_all_adds_the_saved_sessions(coi_env):
    code, out, _ = coi_slot("list", "--all", "--format", "json")
    assert (code, json.loads(out)["saved_sessions"]) == (0, [])
    session = coi_env.home / ".coi" / "sessions-claude" / "20260101-100000-0123456789ab"
    session.mkdir(parents=True)
    (session / "metadata.json").write_text(json.dumps(
        {"coi": 1, "kind": "session", "id": session.name, "tool": "claude",
         "workspace": "/w/app", "updated_at": "2026-01-01T10:00:00Z"}))
    code, out, err = coi_slot("list", "--all", "--format", "json")
    assert (code, err) == (0, "")
    assert json.loads(out)["saved_sessions"] == [
        {"ID": session.name, "SavedAt": "2026-01-01T10:00:00Z", "Workspace": "/w/app",
         "Tool": "claude"}]
    code, out, _ = coi_slot("list", "--all")
    assert out.splitlines()[:3] == ["no coi containers", "", "Saved sessions:"]
    assert session.name in out.splitlines()[4]


def test_list_with_an_unknown_format_is_refused_in_one_line(coi_env):
    code, out, err = coi_slot("list", "--format", "yaml")
    assert (code, out) == (2, "")
    assert one_line(err) == "coi-slot: unknown format 'yaml'; use text or json"


# -- kill -----------------------------------------------------------------------------------------


def test_kill_deletes_the_named_container_and_leaves_the_others(make_session, incus_client):
    doomed = make_session("ws", 1)
    other = make_session("ws", 2)
    assert coi_slot("kill", doomed) == (0, f"killed {doomed}\n", "")
    assert not exists(incus_client, doomed)
    assert status(incus_client, other) == "Running"


def test_kill_tells_the_steps_of_its_save(make_session):
    doomed = make_session("ws", 1)
    code, out, err = coi_slot("kill", doomed, steps=True)
    assert (code, out) == (0, f"killed {doomed}\n")
    assert err == (f"coi: saving the session of {doomed}\n"
                   f"coi: nothing to save in {doomed} (no tool state there)\n")
    assert coi_slot("kill", "--all", "--force", "-q", steps=True)[2] == ""  # -q: no steps


def test_kill_all_force_deletes_every_coi_container_and_reports_json_lines(
        coi_env, make_session, make_container, incus_client):
    names = [make_session("ws", 1), make_session("ws", 2, persistent=True),
             make_session("other", 1, start=False)]
    foreign = make_container(start=False).name
    code, out, err = coi_slot("kill", "--all", "--force", "--format", "json")
    assert (code, err) == (0, "")
    results = [parse_record(line, "container_action") for line in out.splitlines()]
    assert sorted(r["name"] for r in results) == sorted(names)
    assert all(r["ok"] and r["deleted"] and r["saved"] and r["action"] == "kill"
               for r in results)
    assert incus_client.instances(coi_env.prefix) == []
    assert exists(incus_client, foreign)


def test_kill_of_a_container_that_is_not_coi_s_is_refused_and_it_stays(
        make_session, make_container, incus_client):
    mine = make_session("ws", 1, start=False)
    foreign = make_container().name
    code, out, err = coi_slot("kill", mine, foreign)
    assert (code, out) == (3, "")
    assert one_line(err).startswith(f"coi-slot: {foreign}: not a coi container")
    assert status(incus_client, foreign) == "Running"
    assert exists(incus_client, mine)  # nothing at all happens when one name is wrong


def test_kill_of_a_missing_name_is_not_found(coi_env):
    code, out, err = coi_slot("kill", f"{coi_env.prefix}0123abcd-1", "--format", "json")
    assert code == 3
    assert parse_record(out, "error")["code"] == "not_found"
    assert "not a coi container" in one_line(err)


# -- shutdown ------------------------------------------------------------------------------------


def test_shutdown_of_a_running_ephemeral_container_stops_it_cleanly_and_deletes_it(
        make_session, incus_client):
    name = make_session("ws", 1)
    wait_running(incus_client, name)
    assert coi_slot("shutdown", "--timeout", "20", name) == \
        (0, f"shut down {name}, deleted\n", "")
    assert not exists(incus_client, name)


def test_shutdown_of_a_persistent_container_keeps_it_stopped(make_session, incus_client):
    name = make_session("ws", 1, persistent=True)
    wait_running(incus_client, name)
    code, out, err = coi_slot("shutdown", "--timeout", "20", name, "--format", "json")
    assert (code, err) == (0, "")
    result = parse_record(out, "container_action")
    assert (result["ok"], result["deleted"], result["forced"]) == (True, False, False)
    assert status(incus_client, name) == "Stopped"


def test_shutdown_forces_a_container_that_does_not_stop_in_time_and_says_so(
        make_session, incus_client):
    name = make_session("ws", 1, config=IGNORES_SHUTDOWN)
    started = time.monotonic()
    code, out, err = coi_slot("shutdown", "--timeout", "1", name)
    assert (code, err) == (0, ""), err
    assert out == f"forced {name} to stop (no clean stop within 1 s), deleted\n"
    assert time.monotonic() - started < 15
    assert not exists(incus_client, name)


# -- clean ---------------------------------------------------------------------------------------


def test_clean_removes_stopped_ephemeral_containers_only(make_session, incus_client):
    orphan = make_session("ws", 1, start=False)
    kept_persistent = make_session("ws", 2, persistent=True, start=False)
    running = make_session("ws", 3)
    assert coi_slot("clean", "--force") == (0, f"removed {orphan} (stopped, ephemeral)\n", "")
    assert not exists(incus_client, orphan)
    assert status(incus_client, kept_persistent) == "Stopped"
    assert status(incus_client, running) == "Running"
    assert coi_slot("clean", "--force") == (0, "nothing to clean\n", "")


# -- persist -------------------------------------------------------------------------------------


def test_persist_makes_an_ephemeral_container_persistent(make_session, incus_client):
    name = make_session("ws", 1, start=False)
    assert coi_slot("persist", name) == (0, f"{name} is now persistent\n", "")
    config = incus_client.instance(name)["config"]
    assert config[f"{sessions.KEY}persistent"] == "true"
    assert config[f"{sessions.KEY}workspace"]  # PATCH kept the other keys
    code, out, _ = coi_slot("list", "--format", "json")
    assert code == 0
    assert parse_record(out, "container_list")["active_containers"][0]["mode"] == "persistent"
    assert coi_slot("persist", name) == (0, f"{name} was persistent already\n", "")


# -- confirmation --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [("kill", "--all"), ("shutdown", "--all"),
                                  ("persist", "--all"), ("clean",)])
def test_every_container_at_once_without_force_and_without_a_terminal_is_refused(
        argv, make_session, incus_client):
    name = make_session("ws", 1, start=False)
    code, out, err = coi_slot(*argv)
    assert (code, out) == (2, "")
    assert "add --force" in one_line(err)
    assert exists(incus_client, name)
    assert incus_client.instance(name)["config"][f"{sessions.KEY}persistent"] == "false"


def test_kill_all_on_a_terminal_asks_first_and_no_keeps_everything(coi_env, make_session,
                                                                     incus_client):
    name = make_session("ws", 1, start=False)
    child = pexpect.spawn(COI_SLOT, ["kill", "--all"], env=coi_env.environ(), timeout=30,
                          encoding="utf-8")
    child.expect(r"Kill 1 container \(" + name + r"\)\? \[y/N\] ")
    child.sendline("n")
    child.expect("cancelled; nothing changed")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert exists(incus_client, name)

    child = pexpect.spawn(COI_SLOT, ["kill", "--all"], env=coi_env.environ(), timeout=30,
                          encoding="utf-8")
    child.expect(r"\[y/N\] ")
    child.sendline("y")
    child.expect(f"killed {name}")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    with pytest.raises(NotFound):
        incus_client.instance(name)


# -- whose containers ----------------------------------------------------------------------------


def names_listed(out: str) -> set[str]:
    return {c["name"] for c in parse_record(out, "container_list")["active_containers"]}


OPEN = {f"{sessions.KEY}network": "open"}
"""Sessions of non-root users here have no network rules (changing them needs root)."""


def test_each_user_lists_their_own_containers_and_all_users_lists_everyones(
        make_session, users):
    ana = make_session("ws", 1, start=False, owner=ANA)
    ben = make_session("ws", 2, start=False, owner=BEN)
    code, out, err = coi_slot("list", "--format", "json", user=users[ANA])
    assert (code, err) == (0, "")
    assert names_listed(out) == {ana}
    assert parse_record(out, "container_list")["active_containers"][0]["owner_uid"] == ANA
    code, out, _ = coi_slot("list", "--all-users", "--format", "json", user=users[ANA])
    assert (code, names_listed(out)) == (0, {ana, ben})
    code, out, _ = coi_slot("list", "--format", "json")  # root sees everyone's
    assert (code, names_listed(out)) == (0, {ana, ben})
    code, out, _ = coi_slot("list", "--all-users", user=users[BEN])
    lines = out.splitlines()
    owner = lines[0].split().index("OWNER")
    assert [line.split()[owner] for line in lines[1:]] == [str(ANA), str(BEN)]


@pytest.mark.parametrize("verb", [("kill",), ("kill", "--no-save"),
                                  ("shutdown", "--timeout", "1"), ("persist",)])
def test_naming_another_users_container_is_refused_in_one_line_and_it_stays(
        verb, make_session, users, incus_client):
    ben = make_session("ws", 1, owner=BEN)
    code, out, err = coi_slot(*verb, ben, user=users[ANA])
    assert (code, out) == (5, "")
    assert one_line(err) == (f"coi-slot: {ben} belongs to uid {BEN}; you are uid {ANA} "
                             "(add --all-users to act on it anyway)")
    assert status(incus_client, ben) == "Running"
    assert incus_client.instance(ben)["config"][f"{sessions.KEY}persistent"] == "false"


def test_all_users_acts_on_another_users_container(make_session, users, incus_client):
    ben = make_session("ws", 1, owner=BEN, config=OPEN)
    # Only Ben (or root) may write Ben's session store, so Ana cannot end it saved...
    code, out, err = coi_slot("kill", "--all-users", ben, user=users[ANA])
    assert (code, out) == (1, "")
    assert f"could not save the session of {ben}" in one_line(err)
    assert exists(incus_client, ben)
    # ...but she can end it unsaved.
    code, out, err = coi_slot("kill", "--all-users", "--no-save", ben, user=users[ANA])
    assert (code, out) == (0, f"killed {ben} (session not saved)\n"), err
    assert not exists(incus_client, ben)


def test_kill_all_of_a_user_takes_only_their_own_containers(make_session, users,
                                                            incus_client):
    ana = [make_session("ws", 1, owner=ANA, config=OPEN),
           make_session("ws", 2, start=False, owner=ANA, config=OPEN)]
    ben = make_session("ws", 3, owner=BEN, config=OPEN)
    code, out, err = coi_slot("kill", "--all", "--force", user=users[ANA])
    assert (code, err) == (0, "")
    assert sorted(out.splitlines()) == sorted(f"killed {n}" for n in ana)
    assert not any(exists(incus_client, n) for n in ana)
    assert status(incus_client, ben) == "Running"


def test_tmux_commands_act_only_on_the_callers_sessions(make_session, users):
    ana = make_session("ws", 1, owner=ANA)
    ben = make_session("ws", 2, owner=BEN)
    done = coi_slot("tmux", "list", "--format", "json", user=users[ANA], program=COI)
    assert done[0] == 0, done[2]
    assert [s["name"] for s in json.loads(done[1])["sessions"]] == [ana]
    done = coi_slot("tmux", "list", "--all-users", "--format", "json", user=users[ANA],
                    program=COI)
    assert sorted(s["name"] for s in json.loads(done[1])["sessions"]) == sorted([ana, ben])
    for argv in (["send", ben, "hello"], ["capture", ben]):
        code, out, err = coi_slot("tmux", *argv, user=users[ANA], program=COI)
        assert (code, out) == (5, "")
        assert f"{ben} belongs to uid {BEN}" in one_line(err)


# -- --all skips what is done already; a failed save keeps the container ---------------------------


def plant_state(client: Incus, name: str, tmp_path: Path) -> None:
    """Give the session's tool (claude) something to save, in a running or stopped container."""
    source = tmp_path / f"state-{name}"
    source.write_text("conversation\n")
    client.cli(["file", "push", "--quiet", "--create-dirs", "--uid", "1000", "--gid", "1000",
                str(source), f"{name}/home/code/.claude/projects/s.jsonl"])


def saved_ids(home: Path) -> list[str]:
    store = home / ".coi" / "sessions-claude"
    return sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(
        ".")) if store.is_dir() else []


def test_shutdown_all_leaves_stopped_persistent_containers_alone(
        coi_env, make_session, incus_client, tmp_path):
    kept = make_session("ws", 1, persistent=True, start=False)
    live = make_session("ws", 2)
    plant_state(incus_client, kept, tmp_path)
    plant_state(incus_client, live, tmp_path)
    wait_running(incus_client, live)
    code, out, err = coi_slot("shutdown", "--all", "--force", "--timeout", "20",
                              "--format", "json")
    assert code == 0, err
    results = {r["name"]: r for r in (parse_record(line, "container_action")
                                      for line in out.splitlines())}
    assert (results[kept]["ok"], results[kept]["changed"], results[kept]["deleted"]) == \
        (True, False, False)
    assert (results[live]["ok"], results[live]["changed"], results[live]["deleted"]) == \
        (True, True, True)
    assert len(saved_ids(coi_env.home)) == 1  # only the running one's session
    assert status(incus_client, kept) == "Stopped"
    assert coi_slot("shutdown", "--all", "--force") == \
        (0, f"{kept} was stopped already (persistent, kept)\n", "")


def test_a_kill_whose_save_fails_keeps_the_container_and_no_save_discards_it(
        coi_env, make_session, incus_client, tmp_path):
    name = make_session("ws", 1)
    plant_state(incus_client, name, tmp_path)
    store = coi_env.home / ".coi" / "sessions-claude"
    store.parent.mkdir(parents=True)
    store.write_text("not a directory")  # every save into the store fails
    code, out, err = coi_slot("kill", name)
    assert (code, out) == (1, "")
    line = one_line(err)
    assert line.startswith(f"coi-slot: kill {name} failed: could not save the session of "
                           f"{name}")
    assert f"coi kill --no-save {name}" in line
    assert f"the session store {store} is not a directory" in line  # not an internal error
    assert status(incus_client, name) == "Stopped"  # kept: nothing of the session is lost

    assert coi_slot("kill", "--no-save", name) == \
        (0, f"killed {name} (session not saved)\n", "")
    assert not exists(incus_client, name)


def test_kill_saves_the_session_into_the_store_of_its_user(make_session, users, incus_client,
                                                          tmp_path):
    name = make_session("ws", 1, owner=ANA, config=OPEN)
    plant_state(incus_client, name, tmp_path)
    code, out, err = coi_slot("kill", name, user=users[ANA])
    assert (code, out) == (0, f"killed {name}\n"), err
    assert len(saved_ids(Path(users[ANA].env["HOME"]))) == 1


# -- repeated flags through the dispatcher ------------------------------------------------------


def test_coi_run_with_two_mounts_sees_both(coi_env, incus_client, open_tmp, test_user):
    workspace, first, second = (open_tmp / n for n in ("run-ws", "one", "two"))
    for path, marker in ((workspace, ""), (first, "first"), (second, "second")):
        path.mkdir()
        if marker:
            (path / "marker").write_text(f"{marker}\n")
    os.chown(workspace, test_user.uid, test_user.gid)  # root runs coi: code acts as its owner
    env = coi_env.environ(COI_DEFAULTS_IMAGE="coi-test-image", COI_TOOL_NAME="dummy")
    try:
        done = subprocess.run(
            [COI, "run", "--workspace", str(workspace), "--network", "open",
             "--mount", f"{first}:/d1", "--mount", f"{second}:/d2", "--",
             "sh", "-c", "cat /d1/marker /d2/marker"],
            env=env, capture_output=True, text=True, timeout=180, check=False)
    finally:
        for instance in incus_client.instances(coi_env.prefix):
            incus_client.delete_instance_force(instance["name"])
    assert (done.returncode, done.stdout) == (0, "first\nsecond\n"), done.stderr
