"""coi against a remote Incus server (docs/remote.md), the part built so far: the target
comes from the incus client's own remotes, over HTTPS with the client certificate and
the pinned server certificate; listings and ends of containers work there, and every
session is refused before anything is made (its workspace sync and egress are not
built yet). The remote is a second, real Incus daemon in a nested container on coi's
bridge (tests/fixtures_nested.py), added with a trust token, as the installed
non-root user."""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from fixtures_nested import nested_host, run

pytestmark = [pytest.mark.incus, pytest.mark.slow]


class Remote(NamedTuple):
    host: str  # the nested container
    conf: Path  # the test user's incus client directory that knows it
    name: str


@pytest.fixture(scope="module")
def remote(incus_client, test_image, installed_user) -> Iterator[Remote]:
    """The nested daemon on HTTPS, added as a remote to a client directory of the user."""
    for host in nested_host(incus_client, test_image):
        token = run(incus_client, host, "incus config set core.https_address :8443 && "
                    "incus config trust add coi-test-client --quiet")
        assert token.returncode == 0, token.stderr
        conf = installed_user.home / f"incus-{secrets.token_hex(3)}"
        added = installed_user.run(["incus", "remote", "add", "nest",
                                    token.stdout.strip().splitlines()[-1]],
                                   env={"INCUS_CONF": str(conf)})
        assert added.returncode == 0, added.stderr
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


def test_a_session_on_a_remote_is_refused_before_anything_is_made(incus_client, user_coi,
                                                                  remote):
    before = names_on(incus_client, remote)
    done = user_coi("run", "--", "true", env=on(remote))
    assert done.returncode == 1
    assert "sessions on a remote (nest) are not built yet" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert names_on(incus_client, remote) == before


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
