"""Locks several users share (lib/coi_common/locks.py): bounded waits, checked folders,
no links or pipes followed. No daemon; other holders are real processes."""

import io
import multiprocessing
import os
import stat
import time

import pytest

from coi_common import locks
from coi_common.errors import PermissionDenied

OWN = os.geteuid()


@pytest.fixture
def folder(tmp_path):
    """An open lock folder of ours (0700) under tmp_path."""
    fd = locks.open_folder(str(tmp_path / "locks"), owner=OWN, mode=0o700)
    yield fd
    os.close(fd)


def _hold(path, seconds, ready):
    parent = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fd = locks.open_file(parent, "c.lock")
    with locks.held(fd, timeout=5, what="child"):
        ready.set()
        time.sleep(seconds)


def holder(tmp_path, seconds):
    """Another process holding c.lock in tmp_path/locks for `seconds`."""
    ready = multiprocessing.Event()
    child = multiprocessing.Process(target=_hold, args=(str(tmp_path / "locks"), seconds,
                                                        ready))
    child.start()
    assert ready.wait(10)
    return child


def test_a_second_comer_waits_for_the_first_and_then_holds_the_lock(tmp_path, folder):
    child = holder(tmp_path, 0.5)
    fd = locks.open_file(folder, "c.lock")
    started = time.monotonic()
    with locks.held(fd, timeout=10, what="test"):
        waited = time.monotonic() - started
    os.close(fd)
    child.join(5)
    assert waited >= 0.3


def test_a_lock_held_too_long_ends_the_wait_with_lock_timeout(tmp_path, folder):
    child = holder(tmp_path, 3)
    fd = locks.open_file(folder, "c.lock")
    started = time.monotonic()
    with pytest.raises(locks.LockTimeout, match=r"still held by another process after 0\.5 s"), \
            locks.held(fd, timeout=0.5, what="waiting for the test"):
        pass
    assert time.monotonic() - started < 2
    os.close(fd)
    child.terminate()
    child.join(5)


def test_a_long_wait_says_what_it_waits_for(tmp_path, folder, monkeypatch):
    stream = io.StringIO()
    real = locks.progress.waiting
    monkeypatch.setattr(locks.progress, "waiting",
                        lambda what: real(what, after=0.1, stream=stream))
    child = holder(tmp_path, 0.6)
    fd = locks.open_file(folder, "c.lock")
    with locks.held(fd, timeout=10, what="waiting for the test"):
        pass
    os.close(fd)
    child.join(5)
    assert stream.getvalue().startswith("coi: waiting for the test ...\n")
    assert "waiting for the test: done" in stream.getvalue()


def test_a_quick_lock_says_nothing(folder, capsys):
    fd = locks.open_file(folder, "c.lock")
    with locks.held(fd, timeout=1, what="never shown"):
        pass
    os.close(fd)
    assert capsys.readouterr().err == ""


def test_the_lock_file_is_readable_by_all_whatever_the_umask(tmp_path, folder):
    old = os.umask(0o077)
    try:
        os.close(locks.open_file(folder, "c.lock"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "locks" / "c.lock").stat().st_mode) == 0o644


def test_a_symlink_in_place_of_the_lock_file_is_never_followed(tmp_path, folder):
    target = tmp_path / "elsewhere"
    (tmp_path / "locks" / "c.lock").symlink_to(target)
    with pytest.raises(PermissionDenied, match="cannot be opened"):
        locks.open_file(folder, "c.lock")
    assert not target.exists()


def test_a_fifo_in_place_of_the_lock_file_is_refused_without_blocking(tmp_path, folder):
    os.mkfifo(tmp_path / "locks" / "c.lock")
    with pytest.raises(PermissionDenied, match="not a regular file"):
        locks.open_file(folder, "c.lock")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_a_lock_name_that_is_not_one_file_is_refused(folder, name):
    with pytest.raises(PermissionDenied):
        locks.open_file(folder, name)


def test_the_folder_is_made_with_exactly_its_mode_sticky_bit_included(tmp_path):
    old = os.umask(0o077)
    try:
        os.close(locks.open_folder(str(tmp_path / "shared"), owner=OWN, mode=0o1770))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o1770


def test_a_symlinked_folder_is_refused(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "locks").symlink_to(tmp_path / "real")
    with pytest.raises(PermissionDenied, match="is not a directory"):
        locks.open_folder(str(tmp_path / "locks"), owner=OWN, mode=0o700)


def test_a_world_writable_folder_is_refused(tmp_path):
    path = tmp_path / "locks"
    path.mkdir()
    path.chmod(0o777)
    with pytest.raises(PermissionDenied, match="not a safe directory"):
        locks.open_folder(str(path), owner=OWN, mode=0o700)


def test_a_folder_in_a_parent_others_may_write_to_is_refused(tmp_path):
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(PermissionDenied, match="which others may write to") as refused:
        locks.open_folder(str(parent / "locks"), owner=OWN, mode=0o700)
    assert "remove" not in (refused.value.hint or "")  # never: remove /tmp
    assert not (parent / "locks").exists()


AS_ROOT = pytest.mark.skipif(OWN != 0, reason="needs root: a folder of another uid")


@AS_ROOT
def test_a_folder_that_someone_else_made_is_refused(tmp_path):
    path = tmp_path / "locks"
    path.mkdir(mode=0o700)
    os.chown(path, 12345, 12345)
    with pytest.raises(PermissionDenied, match="not a safe directory"):
        locks.open_folder(str(path), owner=OWN, mode=0o700)


@AS_ROOT
def test_a_missing_folder_that_only_its_owner_may_make_is_not_found(tmp_path):
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, 12345, 12345)
    with pytest.raises(FileNotFoundError):
        locks.open_folder(str(parent / "locks"), owner=12345, mode=0o700)
    assert not (parent / "locks").exists()
