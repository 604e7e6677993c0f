"""coi against a remote Incus server (docs/remote.md): the target comes from the incus
client's own remotes, over HTTPS with the client certificate and the pinned server
certificate; sessions run there with the workspace copied in and synced back (owned
by the user, conflicts kept both ways), and a network mode coi cannot enforce there is
refused before anything is made. The remote is a second, real Incus daemon in a
nested container on coi's bridge (tests/fixtures_nested.py), set up by `coi setup`,
added with a trust token, as the installed non-root user."""

from __future__ import annotations

import dataclasses
import json
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from coi_common import naming
from fixtures_nested import SOURCE, nested_host, run

pytestmark = [pytest.mark.incus, pytest.mark.slow]


class Remote(NamedTuple):
    host: str  # the nested container
    conf: Path  # the test user's incus client directory that knows it
    name: str


@pytest.fixture(scope="module")
def remote(incus_client, test_image, installed_user) -> Iterator[Remote]:
    """The nested daemon, set up by coi, on HTTPS at its address on coi's bridge (and
    nowhere else: a token names every address it listens on, and the client tries
    them), added as a remote to a client directory of the user, the test image copied
    there."""
    for host in nested_host(incus_client, test_image, runs_containers=True):
        setup = run(incus_client, host, f"{SOURCE}/bin/coi setup", timeout=600)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        address = incus_client.instance_state(host)
        ipv4 = next(a["address"] for a in address["network"]["eth0"]["addresses"]
                    if a["family"] == "inet" and a["scope"] == "global")
        token = run(incus_client, host, f"incus config set core.https_address {ipv4}:8443 "
                    "&& incus config trust add coi-test-client --quiet")
        assert token.returncode == 0, token.stderr
        conf = installed_user.home / f"incus-{secrets.token_hex(3)}"
        env = {"INCUS_CONF": str(conf)}
        added = installed_user.run(["incus", "remote", "add", "nest",
                                    token.stdout.strip().splitlines()[-1]], env=env)
        assert added.returncode == 0, added.stderr
        copied = installed_user.run(["incus", "image", "copy", test_image, "nest:", "--alias",
                                     test_image, "--mode", "relay"], env=env, timeout=600)
        assert copied.returncode == 0, copied.stderr
        try:
            yield Remote(host, conf, "nest")
        finally:
            shutil.rmtree(conf, ignore_errors=True)


def on(remote: Remote) -> dict[str, str]:
    return {"INCUS_CONF": str(remote.conf), "COI_REMOTE": remote.name}


def make_container(incus_client, remote: Remote, name: str, uid: int) -> None:
    """A stopped container with coi's keys, made on the remote with its own client."""
    done = run(incus_client, remote.host,
               "incus storage create default dir >/dev/null 2>&1; "
               "incus profile device add default root disk path=/ pool=default "
               f">/dev/null 2>&1; incus init --empty {name} && incus config set {name} "
               f"user.coi.workspace=/home/x/w user.coi.slot=1 user.coi.tool=dummy "
               f"user.coi.persistent=false user.coi.host_uid={uid}")
    assert done.returncode == 0, done.stderr


def names_on(incus_client, remote: Remote) -> list[str]:
    done = run(incus_client, remote.host, "incus list -c n -f csv")
    return done.stdout.split()


def test_coi_lists_and_ends_containers_of_a_remote_over_https(incus_client, user_coi, remote):
    name = f"{user_coi.prefix}0123abcd-1"
    make_container(incus_client, remote, name, user_coi.user.uid)
    listed = user_coi("list", "--format", "json", env=on(remote))
    assert listed.returncode == 0, listed.stderr
    assert [c["name"] for c in json.loads(listed.stdout)["active_containers"]] == [name]
    here = user_coi("list", "--format", "json")  # the local daemon has no such container
    assert name not in here.stdout
    killed = user_coi("kill", "--no-save", name, "--remote", remote.name,
                      env={"INCUS_CONF": str(remote.conf)})  # the flag, as COI_REMOTE
    assert killed.returncode == 0, killed.stderr
    assert name not in names_on(incus_client, remote)


def test_allowlist_mode_on_a_remote_is_refused_before_anything_is_made(incus_client,
                                                                      user_coi, remote):
    before = names_on(incus_client, remote)
    done = user_coi("run", "--network", "allowlist", "--", "true", env=on(remote))
    assert done.returncode == 1
    assert "network mode allowlist cannot be enforced on remote nest" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert names_on(incus_client, remote) == before


PROBE = ("curl -s -o /dev/null --connect-timeout 3 -m 3 http://{address}:8099/; "
         "echo curl-exit=$?")


@pytest.fixture
def private_host(incus_client, remote) -> Iterator[str]:
    """A web server on the server's own bridge address (a private address of a test host
    this test made), for the length of the test."""
    found = run(incus_client, remote.host, "incus network get coibr0 ipv4.address")
    address = found.stdout.strip().split("/")[0]
    started = run(incus_client, remote.host, f"cd /tmp && nohup python3 -m http.server 8099 "
                  f"--bind {address} >/dev/null 2>&1 </dev/null & echo $!")
    assert started.returncode == 0, started.stderr
    try:
        yield address
    finally:
        run(incus_client, remote.host, f"kill {started.stdout.strip()}")


def test_restricted_mode_on_a_remote_is_enforced_by_the_servers_coi(
        incus_client, user_coi, remote, private_host, host_service):
    probe = PROBE.format(address=private_host)
    control = user_coi("run", "--network", "open", "--", "sh", "-c", probe, env=on(remote))
    assert control.stdout.strip() == "curl-exit=0", control.stderr  # it answers
    done = user_coi("run", "--persistent", "--", "sh", "-c", probe,  # the default mode
                    env=on(remote))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("curl-exit=7", "curl-exit=28"), done.stdout
    # The server's coi put the rules in (its start hook adopted the container) and
    # keeps them while it exists; nothing of them is on this host.
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    ifname = run(incus_client, remote.host, f"incus config device get {name} eth0 host_name")
    kept = run(incus_client, remote.host, f"test -f /var/lib/coi/net/default/{name}.json && "
               f"nft list table bridge coi | grep -c {ifname.stdout.strip()}")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert not list(host_service.state_dir.rglob(f"{name}.json"))  # this host's coi-net
    assert user_coi("kill", name, env=on(remote)).returncode == 0


def test_a_run_on_a_remote_sees_the_workspace_and_brings_back_what_it_made(
        incus_client, user_coi, remote):
    (user_coi.workspace / "hello.txt").write_text("from the host\n")
    done = user_coi("run", "--", "sh", "-c",
                    "cat hello.txt && echo made > made-remotely && mkdir -p sub && "
                    "echo deep > sub/deep && rm hello.txt", env=on(remote))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the host\n"
    for rel, text in (("made-remotely", "made\n"), ("sub/deep", "deep\n")):
        made = user_coi.workspace / rel
        assert made.read_text() == text
        assert made.stat().st_uid == user_coi.user.uid
    assert not (user_coi.workspace / "hello.txt").exists()  # deleted there, unchanged here
    assert "pushed 1 files" in done.stderr
    assert "pulled 2 files" in done.stderr
    assert names_on(incus_client, remote) == []


def test_what_the_agent_does_to_protected_and_masked_paths_never_comes_back(
        user_coi, remote):
    hooks = user_coi.workspace / ".git" / "hooks"
    hooks.mkdir(parents=True)
    (user_coi.workspace / ".env").write_text("SECRET=1\n")
    done = user_coi("run", "--", "sh", "-c",
                    "test -e .env && echo SAW-THE-SECRET; mkdir -p .git/hooks && "
                    "echo planted > .git/hooks/pre-commit "
                    "&& chmod +x .git/hooks/pre-commit && echo theirs > .env && echo ok > ok",
                    env=on(remote))
    assert done.returncode == 0, done.stderr
    assert "SAW-THE-SECRET" not in done.stdout
    assert not (hooks / "pre-commit").exists()
    assert (user_coi.workspace / ".env").read_text() == "SECRET=1\n"
    assert (user_coi.workspace / "ok").read_text() == "ok\n"


def on_remote(user_coi, remote: Remote):
    return dataclasses.replace(user_coi, env={**user_coi.env, **on(remote)})


def test_a_file_changed_on_both_sides_is_kept_both_ways_and_reported(user_coi, remote):
    there = on_remote(user_coi, remote)
    notes = user_coi.workspace / "notes"
    notes.write_text("base\n")
    made = there("run", "--persistent", "--", "true")
    assert made.returncode == 0, made.stderr
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    assert there("container", "start", name).returncode == 0
    edited = there("container", "exec", name, "--user", "1000", "--", "sh", "-c",
                   "echo theirs > /workspace/notes && echo new > /workspace/fresh")
    assert edited.returncode == 0, edited.stderr
    notes.write_text("mine\n")
    pulled = there("sync", "pull", name, "--format", "json")
    assert pulled.returncode == 0, pulled.stderr
    record = json.loads(pulled.stdout)
    beside = f"notes.coi-remote-{name}"
    assert record["conflicts"] == [{"path": "notes", "why": "changed on both sides",
                                    "remote_copy": beside}]
    assert "coi: conflict: notes: changed on both sides" in pulled.stderr
    assert notes.read_text() == "mine\n"
    assert (user_coi.workspace / beside).read_text() == "theirs\n"
    assert (user_coi.workspace / "fresh").read_text() == "new\n"
    assert (user_coi.workspace / "fresh").stat().st_uid == user_coi.user.uid
    assert there("kill", name).returncode == 0


def test_sync_every_brings_changes_while_the_session_runs_and_ends_with_it(user_coi, remote):
    there = on_remote(user_coi, remote)
    assert there("run", "--persistent", "--", "true").returncode == 0
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    assert there("container", "start", name).returncode == 0
    watcher = subprocess.Popen(shlex.split(there.argv("sync", "pull", name, "--every",
                                                      "1")[0]),
                               cwd=user_coi.workspace, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        made = there("container", "exec", name, "--user", "1000", "--", "sh", "-c",
                     "echo live > /workspace/live")
        assert made.returncode == 0, made.stderr
        live = user_coi.workspace / "live"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not live.exists():
            time.sleep(0.2)
        assert live.read_text() == "live\n"  # while the session still runs
        assert there("kill", name).returncode == 0
        out, err = watcher.communicate(timeout=30)  # the container is gone: so is it
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    assert f"pulled 1 files (5 B) from {name}" in out


def test_clean_on_a_remote_pulls_a_stopped_leftover_and_removes_it(incus_client, user_coi,
                                                                   remote):
    there = on_remote(user_coi, remote)
    assert there("run", "--persistent", "--", "sh", "-c",
                 "echo first > first").returncode == 0
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    # A leftover: ephemeral, stopped, with a change its session never brought back.
    changed = run(incus_client, remote.host, f"incus exec {name} -- su code -c 'echo late > "
                  f"/workspace/late' && incus config set {name} user.coi.persistent=false && "
                  f"incus stop -f {name}")
    assert changed.returncode == 0, changed.stderr
    cleaned = there("clean", "--force")
    assert cleaned.returncode == 0, cleaned.stderr
    assert names_on(incus_client, remote) == []
    assert (user_coi.workspace / "late").read_text() == "late\n"


def test_build_custom_and_file_transfer_work_on_a_remote(user_coi, remote, tmp_path):
    there = on_remote(user_coi, remote)
    script = user_coi.workspace / "build.sh"
    script.write_text("echo built-on-the-remote > /etc/coi-test-marker\n")
    image = f"{user_coi.prefix}custom"
    built = there("build", "custom", image, "--script", str(script), "--base",
                  user_coi.env["COI_DEFAULTS_IMAGE"], timeout=900)
    assert built.returncode == 0, built.stderr
    listed = json.loads(there("image", "list", "--format", "json").stdout)["images"]
    assert image in [i["alias"] for i in listed]
    assert image not in there("image", "list", env={"COI_REMOTE": ""}).stdout  # not here
    assert there("run", "--persistent", "--image", image, "--",
                 "true").returncode == 0
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    assert there("container", "start", name).returncode == 0
    pulled = user_coi.workspace / "marker"
    done = there("file", "pull", f"{name}:/etc/coi-test-marker", str(pulled))
    assert done.returncode == 0, done.stderr
    assert pulled.read_text() == "built-on-the-remote\n"
    (user_coi.workspace / "sent").write_text("sent over\n")
    done = there("file", "push", str(user_coi.workspace / "sent"), f"{name}:/tmp/sent")
    assert done.returncode == 0, done.stderr
    read = there("container", "exec", name, "--capture", "--", "cat", "/tmp/sent")
    assert json.loads(read.stdout)["stdout"] == "sent over\n"
    assert there("kill", name).returncode == 0
    assert there("image", "delete", image).returncode == 0


def test_shell_tmux_attach_shutdown_and_resume_on_a_remote(incus_client, user_coi, terminal,
                                                           remote):
    there = on_remote(user_coi, remote)
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    term = terminal(there.argv("shell"), None, user_coi.workspace)
    term.wait_for("dummy: 0 lines of history", timeout=120)
    term.type("typed in the terminal")
    term.wait_for("noted typed in the terminal")
    term.keys("C-b", "d")
    term.wait_for("COI-EXITED-0")
    assert there("tmux", "send", name, "sent by tmux").returncode == 0
    deadline, screen = time.monotonic() + 30, ""
    while time.monotonic() < deadline and "noted sent by tmux" not in screen:
        screen = there("tmux", "capture", name).stdout
        time.sleep(0.3)
    assert "dummy: noted sent by tmux" in screen
    back = terminal(there.argv("attach", name), None, user_coi.workspace)
    back.wait_for("noted sent by tmux")
    back.keys("C-b", "d")
    back.wait_for("COI-EXITED-0")
    listed = json.loads(there("list", "--format", "json").stdout)["active_containers"]
    assert [(c["name"], c["remote"]) for c in listed] == [(name, "nest")]
    assert "REMOTE" in there("list").stdout
    ended = there("shutdown", name)
    assert ended.returncode == 0, ended.stderr
    assert names_on(incus_client, remote) == []
    again = terminal(there.argv("shell", "--resume"), None,
                     user_coi.workspace)
    again.wait_for("dummy: 2 lines of history", timeout=120)
    again.wait_for("dummy: resumed")
    again.keys("C-b", "d")
    again.wait_for("COI-EXITED-0")
    assert there("kill", "--no-save", name).returncode == 0


def test_a_server_with_another_certificate_than_the_pinned_one_is_refused(user_coi, remote):
    changed = remote._replace(conf=remote.conf.with_name(f"{remote.conf.name}-changed"))
    copied = user_coi.user.run(["sh", "-c", f"cp -r {remote.conf} {changed.conf} && cp "
                                f"{changed.conf}/client.crt {changed.conf}/servercerts/nest.crt"])
    assert copied.returncode == 0, copied.stderr  # pinned: a certificate not the server's
    done = user_coi("list", env=on(changed))
    shutil.rmtree(changed.conf, ignore_errors=True)
    assert done.returncode == 5, done.stderr
    assert "presented a certificate other than the one pinned for it" in done.stderr


def test_an_unknown_remote_is_a_one_line_error(user_coi, remote):
    done = user_coi("list", env={**on(remote), "COI_REMOTE": "nowhere"})
    assert done.returncode == 2
    assert done.stderr.startswith("coi list: the incus client knows no remote 'nowhere'")
    assert "Traceback" not in done.stderr


def test_doctor_of_a_remote_checks_the_server_and_says_which_modes_start_there(user_coi,
                                                                             remote):
    done = user_coi("doctor", "--remote", remote.name, "--format", "json",
                    env={"INCUS_CONF": str(remote.conf)})
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["daemon"]["ok"]
    assert "remote nest (https://" in checks["daemon"]["detail"]
    assert checks["profile"]["ok"]
    assert checks["image"]["ok"]
    assert checks["egress"]["ok"]
    assert "allowlist: refused on a remote" in checks["egress"]["detail"]
    assert "idmap delegation" not in checks


# -- a cluster of two nested daemons --------------------------------------------------------


class Cluster(NamedTuple):
    first: str
    second: str  # the member sessions are placed on
    conf: Path


def _address(incus_client, host: str) -> str:
    state = incus_client.instance_state(host)
    return next(a["address"] for a in state["network"]["eth0"]["addresses"]
                if a["family"] == "inet" and a["scope"] == "global")


JOIN = """cluster:
  enabled: true
  server_name: {name}
  server_address: {address}:8443
  cluster_token: {token}
  member_config:
  - entity: storage-pool
    name: coi
    key: source
    value: ""
"""


@pytest.fixture(scope="module")
def cluster(incus_client, test_image, installed_user) -> Iterator[Cluster]:
    """Two nested daemons joined as a cluster (the first set up by `coi setup`, then
    clustered; the second joined with a token, then set up too: its coi enforces the
    egress of the containers placed there), added as remote `clus`, the image copied
    there."""
    for first in nested_host(incus_client, test_image, runs_containers=True):
        for second in nested_host(incus_client, test_image, runs_containers=True):
            made = run(incus_client, first, f"{SOURCE}/bin/coi setup >/dev/null && incus "
                       f"config set core.https_address {_address(incus_client, first)}:8443 "
                       f"&& incus cluster enable {first} >/dev/null && incus cluster add "
                       f"{second} --quiet", timeout=600)
            assert made.returncode == 0, made.stderr
            joined = run(incus_client, second, "incus admin init --preseed", stdin=JOIN.format(
                name=second, address=_address(incus_client, second),
                token=made.stdout.strip().splitlines()[-1]).encode(), timeout=600)
            assert joined.returncode == 0, joined.stderr
            member = run(incus_client, second, f"{SOURCE}/bin/coi setup", timeout=600)
            assert member.returncode == 0, member.stdout + member.stderr  # its egress
            token = run(incus_client, first, "incus config trust add coi-test-client --quiet")
            conf = installed_user.home / f"incus-{secrets.token_hex(3)}"
            env = {"INCUS_CONF": str(conf)}
            added = installed_user.run(["incus", "remote", "add", "clus",
                                        token.stdout.strip().splitlines()[-1]], env=env)
            assert added.returncode == 0, added.stderr
            copied = installed_user.run(["incus", "image", "copy", test_image, "clus:",
                                         "--alias", test_image, "--mode", "relay"], env=env,
                                        timeout=600)
            assert copied.returncode == 0, copied.stderr
            try:
                yield Cluster(first, second, conf)
            finally:
                shutil.rmtree(conf, ignore_errors=True)


def test_run_with_target_places_the_session_on_that_member_and_list_shows_it(user_coi,
                                                                            cluster):
    there = dataclasses.replace(user_coi, env={**user_coi.env, "INCUS_CONF": str(cluster.conf),
                                               "COI_REMOTE": "clus"})
    done = there("run", "--persistent", "--target", cluster.second,
                 "--", "true")
    assert done.returncode == 0, done.stderr
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    listed = json.loads(there("list", "--format", "json").stdout)["active_containers"]
    assert [(c["name"], c["remote"], c["location"]) for c in listed] == \
        [(name, "clus", cluster.second)]
    table = there("list").stdout
    assert "LOCATION" in table
    assert cluster.second in table
    doctor = json.loads(there("doctor", "--format", "json").stdout)
    members = next(c for c in doctor["checks"] if c["name"] == "cluster")
    assert members["ok"]
    assert f"{cluster.first} (Online), {cluster.second} (Online)" in members["detail"]
    assert there("kill", name).returncode == 0
