"""Whether Incus may map a host uid (subuid/subgid delegation), and what coi says when not."""

import os

import pytest

from coi_common import idmap, sessions
from coi_common.errors import PermissionDenied
from coi_shell import container


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_an_id_inside_any_root_range_is_delegated_and_others_are_not(tmp_path):
    subuid = write(tmp_path, "subuid", "root:1000000:1000000000\nroot:21111:1\nbob:5000:10\n")
    subgid = write(tmp_path, "subgid", "root:1000000:1000000000\n0:21111:1\n")
    assert idmap.delegated(21111, 21111, subuid=subuid, subgid=subgid)
    assert not idmap.delegated(5000, 21111, subuid=subuid, subgid=subgid)
    assert not idmap.delegated(21112, 21111, subuid=subuid, subgid=subgid)


def test_broken_lines_and_comments_delegate_nothing(tmp_path):
    subuid = write(tmp_path, "subuid", "# root:1:100\nroot:x:1\nroot:7\nroot:9:1 # note\n")
    assert idmap.root_ranges(subuid) == [(9, 1)]


def test_missing_lines_are_added_once_and_keep_the_file_s_last_line(tmp_path):
    subuid = write(tmp_path, "subuid", "root:1000000:1000000000")  # no final newline
    subgid = write(tmp_path, "subgid", "")
    missing = idmap.missing_lines([4242], [4243], subuid=subuid, subgid=subgid)
    assert missing == {subuid: ["root:4242:1"], subgid: ["root:4243:1"]}
    idmap.add_lines(missing, record=str(tmp_path / "added"))
    assert (tmp_path / "subuid").read_text() == "root:1000000:1000000000\nroot:4242:1\n"
    assert idmap.missing_lines([4242], [4243], subuid=subuid, subgid=subgid) == {}


def test_uninstall_removes_only_the_lines_coi_added(tmp_path):
    """A line the admin wrote stays, even when it equals one coi added later."""
    subuid = write(tmp_path, "subuid", "root:1000000:1000000000\nroot:4242:1\n")
    subgid = write(tmp_path, "subgid", "root:1000000:1000000000\n")
    record = str(tmp_path / "added")
    idmap.add_lines({subuid: ["root:4242:1", "root:5000:1"], subgid: ["root:4243:1"]},
                    record=record)
    (tmp_path / "subgid").write_text((tmp_path / "subgid").read_text() + "admin:7:1\n")
    removed = idmap.remove_added(record=record, files=(subuid, subgid))
    assert removed == [f"{subuid} root:4242:1", f"{subuid} root:5000:1",
                       f"{subgid} root:4243:1"]
    assert (tmp_path / "subuid").read_text() == "root:1000000:1000000000\nroot:4242:1\n"
    assert (tmp_path / "subgid").read_text() == "root:1000000:1000000000\nadmin:7:1\n"
    assert not (tmp_path / "added").exists()
    assert idmap.remove_added(record=record, files=(subuid, subgid)) == []


def test_a_record_naming_other_files_or_lines_removes_nothing_there(tmp_path):
    other = write(tmp_path, "passwd", "root:4242:1\n")
    subuid = write(tmp_path, "subuid", "root:x:1\n")
    record = tmp_path / "added"
    record.write_text(f"{other} root:4242:1\n{subuid} root:x:1\n")
    assert idmap.remove_added(record=str(record), files=(subuid,)) == []
    assert (tmp_path / "passwd").read_text() == "root:4242:1\n"
    assert (tmp_path / "subuid").read_text() == "root:x:1\n"


def test_root_maps_code_to_the_workspace_owner_and_never_to_root(tmp_path, monkeypatch):
    monkeypatch.setattr(container, "invoking_ids", lambda: (0, 0))
    theirs, roots = tmp_path / "theirs", tmp_path / "roots"
    theirs.mkdir()
    roots.mkdir()
    os.chown(theirs, 59999, 59998)  # no account: the directory's group is taken
    os.chown(roots, 0, 0)
    assert container.session_idmap(str(theirs)) == container.IdMap(59999, 59998)
    with pytest.raises(PermissionDenied) as refused:
        container.session_idmap(str(roots))
    assert "never maps the agent to host root" in refused.value.one_line()


def test_a_normal_user_maps_code_to_themselves_wherever_the_workspace(tmp_path, monkeypatch):
    monkeypatch.setattr(container, "invoking_ids", lambda: (20001, 20002))
    assert container.session_idmap(str(tmp_path)) == container.IdMap(20001, 20002)


def test_every_user_maps_only_their_own_ids_to_code():
    assert container.IdMap(1000, 1000).config() == {"raw.idmap": "uid 1000 1000\ngid 1000 1000"}
    assert container.IdMap(20001, 20002).config() == {
        "raw.idmap": "uid 20001 1000\ngid 20002 1000"}


def test_no_host_backed_mount_is_shifted():
    record = sessions.SlotRecord("/tmp/ws", 1, "coi-0-1", False, "coi", "coi",
                                 mounts=(sessions.Mount("/tmp/a", "/a"),), storage="/tmp/s")
    devices = container.container_devices(record, "/home/someone")
    assert all("shift" not in device for device in devices.values())
