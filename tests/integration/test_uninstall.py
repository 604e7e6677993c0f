"""`coi setup --uninstall` on a set-up machine of its own: a nested Incus host
(tests/fixtures_nested.py), so this machine's pool, bridge, profile, tables and host
service are never touched. Setup runs there as on a fresh machine, with a member of
incus-admin (whose id-map lines setup adds), a line the admin wrote, a session
container and a saved session; the uninstall must leave none of coi's objects and
everything else."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from fixtures_nested import SOURCE, nested_host, run

pytestmark = [pytest.mark.incus, pytest.mark.slow]

MEMBER_UID = 4321
ADMIN_LINE = "root:7777:1"
SAVED = f"/home/tester/.coi/sessions-dummy/20260101-000000-{'a' * 12}"


@pytest.fixture
def host(incus_client, test_image) -> Iterator[str]:
    yield from nested_host(incus_client, test_image)


def coi(incus_client, host: str, args: str, *, stdin: bytes | None = None):
    return run(incus_client, host, f"cd {SOURCE} && bin/coi {args}", stdin=stdin)


def facts(incus_client, host: str) -> dict[str, object]:
    """What of coi's is on the nested host: Incus's collections, tables, files, lines."""
    found: dict[str, object] = {}
    for collection in ("storage-pools", "networks", "profiles", "instances"):
        done = run(incus_client, host, f"incus query /1.0/{collection}")
        assert done.returncode == 0, done.stderr
        found[collection] = json.loads(done.stdout or "[]")  # an empty list prints nothing
    found["files"] = run(incus_client, host, "nft list tables; ls -d /usr/local/lib/coi "
                         "/etc/systemd/system/coi-host.service /var/lib/coi /run/coi "
                         f"{SAVED} 2>/dev/null; cat /etc/subuid /etc/subgid").stdout
    return found


def test_uninstall_removes_what_setup_made_and_nothing_else(incus_client, host):
    prepare = run(incus_client, host, f"useradd -m -u {MEMBER_UID} -G incus-admin tester && "
                  f"echo {ADMIN_LINE} >> /etc/subuid && mkdir -p {SAVED} && "
                  f"chown -R tester: /home/tester/.coi")
    assert prepare.returncode == 0, prepare.stderr
    setup = coi(incus_client, host, "setup")
    assert setup.returncode == 0, setup.stdout + setup.stderr
    session = run(incus_client, host, "incus init --empty coi-0123abcd-1 --profile coi && "
                  "incus config set coi-0123abcd-1 user.coi.workspace=/home/tester/w")
    assert session.returncode == 0, session.stderr
    rules = coi(incus_client, host, "network apply coi-0123abcd-1 --mode restricted")
    assert rules.returncode == 0, rules.stdout + rules.stderr  # coi's tables now exist
    before = facts(incus_client, host)
    assert "/1.0/storage-pools/coi" in before["storage-pools"]
    assert "/1.0/networks/coibr0" in before["networks"]
    assert "table inet coi" in before["files"]
    assert "table bridge coi" in before["files"]
    assert f"root:{MEMBER_UID}:1" in before["files"]

    asked = coi(incus_client, host, "setup --uninstall")  # no terminal, no --force
    assert asked.returncode == 2, asked.stdout + asked.stderr
    assert "add --force" in asked.stderr
    assert facts(incus_client, host) == before  # nothing removed unasked

    removed = coi(incus_client, host, "setup --uninstall --force")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    after = facts(incus_client, host)
    assert "/1.0/storage-pools/coi" not in after["storage-pools"]
    assert "/1.0/networks/coibr0" not in after["networks"]
    assert "/1.0/profiles/coi" not in after["profiles"]
    assert after["instances"] == []
    files = str(after["files"])
    for gone in ("table inet coi", "table bridge coi", "coi-host.service", "/usr/local/lib/coi",
                 "/var/lib/coi", "/run/coi", f"root:{MEMBER_UID}:1"):
        assert gone not in files, f"{gone} left:\n{files}"
    assert ADMIN_LINE in files
    assert SAVED in files
    assert run(incus_client, host, "incus info >/dev/null").returncode == 0  # Incus stays

    again = coi(incus_client, host, "setup --uninstall --force")
    assert again.returncode == 0, again.stderr
    assert "nothing to remove" in again.stdout
