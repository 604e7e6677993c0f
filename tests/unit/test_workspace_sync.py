"""The workspace sync of remote sessions (coi_session.workspace_sync): the three-way
decisions, the container's listing as hostile input, the host side of a pull (what it
refuses to write through), and the sync point on disk."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coi_common.errors import CoiError
from coi_session import workspace_sync as ws

A, B, C = "a" * 64, "b" * 64, "c" * 64


@pytest.mark.parametrize(("host", "remote", "base", "copy", "delete", "conflict"), [
    (A, B, A, ["f"], [], None),           # changed there only: fetched
    (B, A, A, [], [], None),              # changed here only: kept for the next push
    (B, B, A, [], [], None),              # changed alike
    (B, C, A, [], [], "changed on both sides"),
    (None, A, None, ["f"], [], None),     # made there
    (A, None, A, [], ["f"], None),        # deleted there, unchanged here
    (B, None, A, [], [], "deleted in the container, changed on the host"),
    (None, B, A, [], [], "changed in the container, deleted on the host"),
])
def test_a_pull_takes_the_containers_changes_only_where_the_host_kept_the_base(
        host, remote, base, copy, delete, conflict):
    side = lambda sha: {} if sha is None else {"f": sha}  # noqa: E731
    plan = ws.plan_pull(side(host), side(remote), side(base))
    assert (plan.copy, plan.delete) == (copy, delete)
    assert plan.conflicts.get("f") == conflict
    assert plan.beside == (["f"] if conflict and remote is not None else [])


@pytest.mark.parametrize(("host", "remote", "base", "copy", "delete", "conflict"), [
    (B, A, A, ["f"], [], False),
    (A, B, A, [], [], False),             # changed there only: the next pull's
    (None, A, A, [], ["f"], False),
    (A, None, None, ["f"], [], False),    # the first push sends everything
    (B, C, A, [], [], True),
])
def test_a_push_sends_the_hosts_changes_only_where_the_container_kept_the_base(
        host, remote, base, copy, delete, conflict):
    side = lambda sha: {} if sha is None else {"f": sha}  # noqa: E731
    plan = ws.plan_push(side(host), side(remote), side(base))
    assert (plan.copy, plan.delete, "f" in plan.conflicts) == (copy, delete, conflict)


shas = st.sampled_from([None, A, B, C])


@given(shas, shas, shas)
def test_no_decision_ever_overwrites_a_side_that_changed(host, remote, base):
    side = lambda sha: {} if sha is None else {"f": sha}  # noqa: E731
    pulled = ws.plan_pull(side(host), side(remote), side(base))
    if "f" in pulled.copy or "f" in pulled.delete:
        assert host == base  # the host's copy was still the base's
    pushed = ws.plan_push(side(host), side(remote), side(base))
    if "f" in pushed.copy or "f" in pushed.delete:
        assert remote == base


def test_the_listing_of_the_container_is_read_as_sha256sum_prints_it():
    data = f"{A}  ./src/main.py\0{B} *./odd\nname\0".encode()
    assert ws.parse_listing(data) == {"src/main.py": A, "odd\nname": B}


@pytest.mark.parametrize("entry", [
    f"{A}  ../../etc/passwd", f"{A}  /etc/passwd", "nothex" * 10 + "abcd  ./x",
    f"{A}x./x", f"{A}  ./a/../../b",
])
def test_a_malformed_listing_is_refused_whole(entry):
    with pytest.raises(CoiError, match="malformed"):
        ws.parse_listing(f"{A}  ./fine\0{entry}\0".encode())


def test_masked_protected_and_coi_own_files_take_part_as_the_rules_say():
    rules = ws.Rules(protect=(".git/hooks", ".coi.toml"), mask=(".env", "*.pem"))
    sent = [".git/hooks/pre-commit", ".coi.toml", ".coi.toml.bak", "src/.coi-sync-x"]
    pulled = [".coi.toml.bak", "src/.coi-sync-x"]
    neither = ["config/.env", "keys/server.pem", "notes.txt.coi-remote-coi-1a2b3c4d-1",
               ".coi-sync-1234/x"]
    paths = sent + neither
    assert [p for p in paths if rules.sent(p)] == sent
    assert [p for p in paths if rules.pulled(p)] == pulled


def _into(tmp_path, files):
    staging = tmp_path / "ws" / ".coi-sync-test"
    staging.mkdir(parents=True)
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    result = ws.SyncResult("coi-1a2b3c4d-1", "pull", str(tmp_path / "ws"))
    return ws._Into(str(tmp_path / "ws"), str(staging), result, {})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_pulled_file_is_never_written_through_a_link_on_the_host(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    into = _into(tmp_path, {"docs/x": b"planted"})
    (tmp_path / "ws" / "docs").symlink_to(outside)
    into.take("docs/x", sha(b"planted"), None)
    assert list(outside.iterdir()) == []
    assert "not a plain directory" in into.result.conflicts["docs/x"]
    assert into.result.copied == 0


def test_a_pulled_file_whose_hash_is_not_the_listed_one_is_left_for_the_next_sync(tmp_path):
    into = _into(tmp_path, {"x": b"other"})
    into.take("x", sha(b"listed"), None)
    assert not (tmp_path / "ws" / "x").exists()
    assert into.result.changing == ["x"]


def test_a_host_file_changed_during_the_pull_is_kept(tmp_path):
    into = _into(tmp_path, {"x": b"theirs"})
    (tmp_path / "ws" / "x").write_bytes(b"mine, edited meanwhile")
    into.take("x", sha(b"theirs"), (sha(b"mine"), 4, 0))
    assert (tmp_path / "ws" / "x").read_bytes() == b"mine, edited meanwhile"
    assert into.result.conflicts["x"] == "changed on the host meanwhile"


def test_a_conflicting_file_is_kept_beside_the_hosts(tmp_path):
    into = _into(tmp_path, {"notes": b"theirs"})
    (tmp_path / "ws" / "notes").write_bytes(b"mine")
    into.beside("notes", sha(b"theirs"), "notes.coi-remote-c1")
    assert (tmp_path / "ws" / "notes").read_bytes() == b"mine"
    assert (tmp_path / "ws" / "notes.coi-remote-c1").read_bytes() == b"theirs"
    assert into.result.kept_beside == {"notes": "notes.coi-remote-c1"}


def test_the_staging_writer_writes_only_the_files_asked_for_and_no_links(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in (("wanted", b"1"), ("extra", b"2")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o4755
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("wanted2")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    buffer.seek(0)
    writer = ws._Staging(str(tmp_path / "s"), ["wanted", "wanted2"])
    writer.consume(buffer)
    assert sorted(os.listdir(tmp_path / "s")) == ["wanted"]
    assert os.stat(tmp_path / "s" / "wanted").st_mode & 0o7777 == 0o755  # no setuid


def test_a_sync_point_is_written_whole_and_read_back_checked(tmp_path):
    path = str(tmp_path / "remote" / "r" / "c.json")
    base = ws.Base(path, "c", "r", "/home/u/w", "2026-01-01T00:00:00Z", True,
                   {"a/b": (A, 3, 7)})
    base.save()
    assert ws.load_base(path) == base
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.replace('"a/b"', '"../b"'))
    with pytest.raises(CoiError, match="not one coi wrote"):
        ws.load_base(path)
    assert ws.load_base(str(tmp_path / "none.json")) is None
