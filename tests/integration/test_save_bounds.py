"""Saved sessions against real containers: sparse files keep their holes both ways, and
limits.session_size / limits.sessions_total bound what the store holds.

The containers are plain ones of the test image that carry the two keys that make
coi treat them as a `dummy` session (`user.coi.workspace`, `user.coi.tool`), named
with this test's prefix; the saves and restores run in this process, into the
isolated home of `coi_env` (so its ~/.coi is the store).
"""

import contextlib
from pathlib import Path

import pytest

from coi_common import config
from coi_common.errors import CoiError, NotFound
from coi_session import saved_sessions
from coi_session.saved_sessions import SESSION_ID_KEY, Store
from coi_slot import ending

pytestmark = pytest.mark.incus

GIB = 1024**3
ON_DISK_MAX = 50 * 1024**2
MARK_AT = 2_000_000_000


@pytest.fixture
def workspace(tmp_path):
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def session_container(coi_env, incus_client, test_image, workspace):
    """session_container() -> the name of a new running dummy-session container of
    `workspace`; every one is force-deleted at the end."""
    made = []

    def make():
        name = f"{coi_env.prefix}{len(made) + 1}"
        made.append(name)
        incus_client.create_instance(name, test_image, profiles=["coi"], config={
            "user.coi.workspace": str(workspace), "user.coi.tool": "dummy"}, start=True)
        return name

    yield make
    for name in made:
        with contextlib.suppress(NotFound):
            incus_client.delete_instance_force(name)


def as_code(run_in, name, script):
    done = run_in(name, ["sh", "-c", script], user=1000, env={"HOME": "/home/code"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def settings(workspace):
    return config.load(str(workspace))


def save(incus_client, name, workspace):
    return saved_sessions.save_container(incus_client, name, settings=settings(workspace))


def on_disk(path):
    """Bytes the files and directories under `path` take on the disk (allocated blocks)."""
    return sum(p.lstat().st_blocks * 512 for p in [Path(path), *Path(path).rglob("*")])


def test_a_sparse_3_gib_file_costs_its_data_on_the_host_and_comes_back_sparse(
        session_container, run_in, incus_client, workspace):
    source = session_container()
    as_code(run_in, source, "mkdir -p ~/.dummy && echo one > ~/.dummy/history && "
                            "truncate -s 3G ~/.dummy/big && printf marker | dd "
                            f"of=$HOME/.dummy/big bs=1 seek={MARK_AT} conv=notrunc status=none")
    result = save(incus_client, source, workspace)
    assert result.session is not None
    big = Path(result.session.home) / ".dummy" / "big"
    assert big.stat().st_size == 3 * GIB
    used = on_disk(result.session.path)
    print(f"\nsaved session with a 3 GiB sparse file: {used} bytes on the host disk")
    assert used < ON_DISK_MAX
    assert result.bytes < 1024**2  # data, not holes: under the default 2GiB session size

    target = session_container()
    restored = saved_sessions.restore_into(incus_client, target, result.session,
                                           settings=settings(workspace))
    assert restored.files == 2
    size, blocks, unit, mark = as_code(
        run_in, target, "stat -c '%s %b %B' ~/.dummy/big; dd if=$HOME/.dummy/big bs=1 "
                        f"skip={MARK_AT} count=6 status=none; echo").split()
    print(f"restored into the container: {int(blocks) * int(unit)} bytes on its disk")
    assert int(size) == 3 * GIB
    assert int(blocks) * int(unit) < ON_DISK_MAX
    assert mark == "marker"


def test_a_session_over_session_size_fails_in_one_line_and_the_old_save_stays(
        session_container, run_in, incus_client, workspace, monkeypatch):
    name = session_container()
    as_code(run_in, name, "mkdir -p ~/.dummy && echo before > ~/.dummy/history")
    first = save(incus_client, name, workspace).session
    monkeypatch.setenv("COI_LIMITS_SESSION_SIZE", "1MiB")
    as_code(run_in, name, "head -c 3M /dev/urandom > ~/.dummy/blob && "
                          "echo after >> ~/.dummy/history")
    # The hook every end of a session calls first: it reports, the caller keeps the container.
    ok, message = ending.save_session(name, None)
    assert not ok
    assert "\n" not in message
    assert message.startswith(f"could not save the session of {name}: the tool state holds "
                              "more than limits.session_size (1MiB) of data; not saved")
    [kept] = Store(settings(workspace).path("paths.state_dir")).sessions()
    assert (kept.id, kept.updated_at) == (first.id, first.updated_at)
    assert (Path(kept.home) / ".dummy" / "history").read_text() == "before\n"
    assert not (Path(kept.home) / ".dummy" / "blob").exists()
    assert list(Path(kept.path).parent.glob(".tmp-*")) == []

    monkeypatch.setenv("COI_LIMITS_SESSION_SIZE", "0")  # no limit
    assert save(incus_client, name, workspace).bytes > 3 * 1024**2


def test_a_save_over_sessions_total_removes_the_oldest_other_sessions(
        session_container, run_in, incus_client, workspace, monkeypatch):
    name = session_container()
    as_code(run_in, name, "mkdir -p ~/.dummy && head -c 400K /dev/urandom > ~/.dummy/blob")
    ids = []
    for total in ("0", "0", "1MiB"):
        monkeypatch.setenv("COI_LIMITS_SESSIONS_TOTAL", total)
        incus_client.edit_instance(name, unset=[SESSION_ID_KEY])  # the save makes a new one
        result = save(incus_client, name, workspace)
        ids.append(result.session.id)
    assert result.evicted == (ids[0],)
    assert result.line().endswith(f"; removed the 1 oldest saved session(s) to stay within "
                                  f"limits.sessions_total (1MiB): {ids[0]}")
    store = Store(settings(workspace).path("paths.state_dir"))
    assert [s.id for s in store.sessions()] == [ids[2], ids[1]]

    monkeypatch.setenv("COI_LIMITS_SESSIONS_TOTAL", "300KiB")  # less than the state itself
    with pytest.raises(CoiError, match=r"more than limits\.sessions_total \(300KiB\)"):
        save(incus_client, name, workspace)
    assert [s.id for s in store.sessions()] == [ids[2], ids[1]]
