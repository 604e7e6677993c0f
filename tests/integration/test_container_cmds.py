"""`coi container ...` and `coi file ...` against the real daemon.

Most tests share one running container of the test image (`box`, made once
for this module, each test under its own paths); tests that change a
container's state make their own from `container_name` or `make_container`.
Every container is named `coi-test-<random>` and force-deleted when its test
(or this module) ends, whatever happened. Commands run in-process through
`main()` where that is enough, and through `bin/coi` where the terminal,
stdin or raw bytes matter.
"""

import contextlib
import json
import os
import secrets
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from coi_common.errors import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, EXIT_USAGE, NotFound
from coi_common.incus import Incus
from coi_common.protocol import parse_record
from coi_common.tools import TOOL_UID
from coi_container import __doc__ as USAGE
from coi_container import main
from coi_container.lifecycle import STOP_TIMEOUT
from coi_host.setup import ensure_subids

pytestmark = pytest.mark.incus

COI = str(Path(__file__).resolve().parents[2] / "bin" / "coi")
TEST_IMAGE = "coi-test-image"
CODE_UID = 1000
BOOTED = ("until systemctl is-system-running 2>/dev/null | grep -qE '^(running|degraded)$'; "
          "do sleep 0.05; done")


def run_main(capsys, *argv):
    """coi-container ARGV in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def coi(*args, env, stdin=subprocess.DEVNULL):
    """`bin/coi ARGS` as a user runs it, output as bytes: (status, stdout, stderr)."""
    done = subprocess.run([COI, *args], capture_output=True, env=env, stdin=stdin,
                          timeout=60, check=False)
    return done.returncode, done.stdout, done.stderr


def force_delete(client: Incus, name: str) -> None:
    with contextlib.suppress(NotFound):
        client.delete_instance_force(name)


@pytest.fixture(scope="module")
def box(incus_run_lock, incus_client: Incus, test_image: str) -> Iterator[str]:
    """A running container of the test image shared by this module's tests.

    It asks for the run lock first so the session's sweep of leftovers runs
    before it exists, never after."""
    name = f"coi-test-{secrets.token_hex(4)}"
    try:
        incus_client.create_instance(name, test_image, profiles=["coi"], start=True)
        yield name
    finally:
        force_delete(incus_client, name)


@pytest.fixture
def where(box: str) -> str:
    """A directory path in `box` that is this test's own (not created yet)."""
    return f"/root/t-{secrets.token_hex(4)}"


@pytest.fixture
def own(container_name: str, incus_client: Incus, test_image: str, run_in):
    """own(start=True, booted=False) -> the name of a container of this test alone
    (from `container_name`, so it is force-deleted at the end). booted: wait until
    systemd has booted, since a clean stop sent before that is lost (not a network)."""

    def make(*, start: bool = True, booted: bool = False) -> str:
        incus_client.create_instance(container_name, test_image, profiles=["coi"],
                                     start=start)
        if booted:
            # `is-system-running --wait` gives up at once while systemd's bus is not up yet.
            done = run_in(container_name, ["sh", "-c", BOOTED], timeout=30)
            assert done.ok, f"{container_name} did not boot: {done.stderr}"
        return container_name

    return make


def status_of(client: Incus, name: str) -> str:
    return client.instance(name)["status"]


# -- launch -------------------------------------------------------------------------------


def test_launch_creates_and_starts_a_persistent_container_with_the_coi_profile(
        coi_env, capsys, incus_client, test_image, container_name):
    code, out, err = run_main(capsys, "container", "launch", test_image, container_name)
    assert (code, err) == (0, "")
    assert out == f"launched {container_name} from {test_image}\n"
    found = incus_client.instance(container_name)
    assert found["status"] == "Running"
    assert found["profiles"] == ["coi"]
    assert found["ephemeral"] is False
    assert found["config"]["security.nesting"] == "true"  # Docker inside, as in a session


def test_a_launched_container_refuses_setuid_files_as_a_session_does(
        coi_env, capsys, incus_client, test_image, container_name, run_in):
    code, _, err = run_main(capsys, "container", "launch", test_image, container_name)
    assert code == 0, err
    done = run_in(container_name, ["sh", "-c", "touch /tmp/f && chmod u+s /tmp/f; "
                                   "echo $?; stat -c %a /tmp/f"])
    assert done.stdout.split() == ["1", "644"], done


def test_launch_ephemeral_makes_a_container_that_stopping_deletes(
        coi_env, capsys, incus_client, test_image, container_name):
    code, out, _ = run_main(capsys, "container", "launch", test_image, container_name,
                            "--ephemeral")
    assert code == 0
    assert out.endswith("(ephemeral)\n")
    assert incus_client.instance(container_name)["ephemeral"] is True
    code, out, _ = run_main(capsys, "container", "stop", container_name, "--force")
    assert code == 0
    assert "Incus deleted it" in out
    assert not incus_client.instance_exists(container_name)


def test_launch_takes_the_profile_from_config(coi_env, capsys, incus_client, test_image,
                                             container_name):
    (coi_env.config_home / "coi").mkdir()
    (coi_env.config_home / "coi" / "config.toml").write_text(
        '[incus]\nprofile = "coi-test-no-such-profile"\n')
    code, _, err = run_main(capsys, "container", "launch", test_image, container_name)
    assert code == EXIT_FAILED
    assert "coi-test-no-such-profile" in err
    assert err.count("\n") == 1
    assert not incus_client.instance_exists(container_name)


def test_launch_of_a_missing_image_exits_3_and_makes_nothing(coi_env, capsys, incus_client,
                                                              container_name):
    code, out, err = run_main(capsys, "container", "launch", "coi-test-no-such-image",
                              container_name)
    assert (code, out) == (EXIT_NOT_FOUND, "")
    assert err == ("coi-container: image coi-test-no-such-image does not exist "
                   "(see 'coi image list --all')\n")
    assert not incus_client.instance_exists(container_name)


def test_launch_of_a_name_in_use_exits_1_and_leaves_the_container(coi_env, capsys, box,
                                                                 incus_client, test_image):
    code, _, err = run_main(capsys, "container", "launch", test_image, box)
    assert code == EXIT_FAILED
    assert f"container {box} already exists" in err
    assert status_of(incus_client, box) == "Running"


# -- start / stop / delete -------------------------------------------------------------------


def test_stop_shuts_down_cleanly_and_start_starts_again(coi_env, capsys, own, incus_client):
    name = own(booted=True)
    assert run_main(capsys, "container", "stop", name) == (0, f"stopped {name}\n", "")
    assert status_of(incus_client, name) == "Stopped"
    assert run_main(capsys, "container", "stop", name)[1] == f"{name} is already stopped\n"
    assert run_main(capsys, "container", "start", name) == (0, f"started {name}\n", "")
    assert status_of(incus_client, name) == "Running"
    assert run_main(capsys, "container", "start", name)[1] == f"{name} is already running\n"


def test_stop_force_stops_a_running_container_at_once(coi_env, capsys, own, incus_client):
    name = own()
    code, out, _ = run_main(capsys, "container", "stop", name, "--force")
    assert (code, out) == (0, f"stopped {name}\n")
    assert status_of(incus_client, name) == "Stopped"


@pytest.mark.parametrize("verb", ["start", "stop", "delete"])
def test_lifecycle_verbs_on_a_missing_container_exit_3_in_one_line(coi_env, capsys, verb):
    code, out, err = run_main(capsys, "container", verb, "coi-test-nonexistent-zz")
    assert (code, out) == (EXIT_NOT_FOUND, "")
    assert err == ("coi-container: container coi-test-nonexistent-zz does not exist "
                   "(see 'coi list' or 'incus list')\n")


def test_delete_of_a_running_container_without_force_is_refused_and_keeps_it(
        coi_env, capsys, box, incus_client):
    code, out, err = run_main(capsys, "container", "delete", box)
    assert (code, out) == (EXIT_FAILED, "")
    assert err.count("\n") == 1
    assert f"container {box} is running; not deleting it" in err
    assert f"coi container delete {box} --force" in err
    assert status_of(incus_client, box) == "Running"


def test_delete_force_removes_a_running_container(coi_env, capsys, own, incus_client):
    name = own()
    assert run_main(capsys, "container", "delete", name, "--force") == \
        (0, f"deleted {name}\n", "")
    assert not incus_client.instance_exists(name)


def test_delete_removes_a_stopped_container_without_force(coi_env, capsys, own,
                                                          incus_client):
    name = own(start=False)
    assert run_main(capsys, "container", "delete", name)[:2] == (0, f"deleted {name}\n")
    assert not incus_client.instance_exists(name)


# -- exists / running ------------------------------------------------------------------------


def test_exists_and_running_answer_by_exit_status_alone(coi_env, capsys, box, own):
    stopped = own(start=False)
    assert run_main(capsys, "container", "exists", box) == (0, "", "")
    assert run_main(capsys, "container", "running", box) == (0, "", "")
    assert run_main(capsys, "container", "exists", stopped) == (0, "", "")
    assert run_main(capsys, "container", "running", stopped) == (1, "", "")
    for verb in ("exists", "running"):
        assert run_main(capsys, "container", verb, "coi-test-nonexistent-zz") == (1, "", "")
        assert run_main(capsys, "container", verb, "not/a/name") == (1, "", "")


def test_exists_with_the_daemon_unreachable_exits_4_in_one_line(coi_env, capsys, monkeypatch,
                                                               tmp_path):
    monkeypatch.setenv("INCUS_SOCKET", str(tmp_path / "no.socket"))
    code, out, err = run_main(capsys, "container", "exists", "coi-test-nonexistent-zz")
    assert (code, out) == (EXIT_UNAVAILABLE, "")
    assert err.startswith("coi-container: Incus is not running")
    assert err.count("\n") == 1


# -- exec ----------------------------------------------------------------------------------


def test_exec_streams_output_and_passes_the_exit_code_through(coi_env, box):
    code, out, err = coi("container", "exec", box, "--", "sh", "-c",
                         "echo to-out; echo to-err >&2; exit 7", env=coi_env.environ())
    assert code == 7
    assert out == b"to-out\n"
    assert err == b"to-err\n"


def test_exec_gives_a_terminal_only_when_stdin_and_stdout_are_terminals(coi_env, box):
    child = pexpect.spawn(COI, ["container", "exec", box, "--", "tty"], env=coi_env.environ(),
                          timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert child.before.startswith(b"/dev/pts/")
    code, out, _ = coi("container", "exec", box, "--", "tty", env=coi_env.environ())
    assert (code, out) == (1, b"not a tty\n")


def test_exec_passes_stdin_through(coi_env, box):
    done = subprocess.run([COI, "container", "exec", box, "--", "tr", "a-z", "A-Z"],
                          input=b"piped in\n", capture_output=True, env=coi_env.environ(),
                          timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, b"PIPED IN\n")


def test_exec_capture_prints_one_exec_record_and_exits_with_the_code(coi_env, capsys, box):
    code, out, err = run_main(capsys, "container", "exec", box, "--capture", "--", "sh", "-c",
                              "printf 'a b\\n'; echo oops >&2; exit 3")
    assert (code, err) == (3, "")
    record = parse_record(out, "exec")
    assert (record["stdout"], record["stderr"], record["exit_code"]) == ("a b\n", "oops\n", 3)
    assert out.count("\n") == 1


def test_exec_capture_format_raw_prints_only_the_stdout_bytes(coi_env, box):
    code, out, err = coi("container", "exec", box, "--capture", "--format", "raw", "--",
                         "sh", "-c", "printf 'x\\000\\377y'; echo diag >&2; exit 5",
                         env=coi_env.environ())
    assert code == 5
    assert out == b"x\x00\xffy"
    assert err == b"diag\n"


def test_exec_format_without_capture_is_a_usage_error(coi_env, capsys, box):
    code, out, err = run_main(capsys, "container", "exec", box, "--format", "raw", "--", "pwd")
    assert (code, out) == (EXIT_USAGE, "")
    assert err.startswith("coi-container: --format only applies with --capture")


def test_exec_as_user_1000_in_workspace_with_env(coi_env, capsys, box):
    code, out, _ = run_main(capsys, "container", "exec", box, "--user", str(CODE_UID),
                            "--cwd", "/workspace", "--env", "FOO=bar baz", "--env", "EQ=a=b",
                            "--capture", "--format", "raw", "--", "sh", "-c",
                            'id -u; id -g; pwd; echo "$FOO|$EQ"')
    assert code == 0
    assert out.splitlines() == ["1000", "1000", "/workspace", "bar baz|a=b"]


def test_exec_group_can_differ_from_user(coi_env, capsys, box):
    code, out, _ = run_main(capsys, "container", "exec", box, "--user", "1000", "--group", "0",
                            "--capture", "--format", "raw", "--", "id", "-g")
    assert (code, out) == (0, "0\n")


def test_exec_in_a_missing_cwd_is_refused_without_running(coi_env, capsys, box, where):
    code, out, err = run_main(capsys, "container", "exec", box, "--cwd", where, "--",
                              "touch", "ran")
    assert (code, out) == (EXIT_NOT_FOUND, "")
    assert f"directory {where} does not exist in container {box}" in err
    code, _, _ = run_main(capsys, "container", "exec", box, "--capture", "--", "test",
                          "-e", "/ran")
    assert code == 1


@pytest.mark.parametrize(("options", "problem"), [
    (["--env", "NOEQUALS"], "--env 'NOEQUALS' is not KEY=VALUE"),
    (["--env", "1X=y"], "--env '1X=y' is not KEY=VALUE"),
    (["--user", "code"], "--user 'code' is not a numeric id"),
    (["--group", "-5"], "--group '-5' is not a numeric id"),
    (["--cwd", "workspace"], "--cwd 'workspace' must be an absolute path"),
    (["--capture", "--format", "yaml"], "unknown format 'yaml'; use json or raw"),
])
def test_exec_bad_options_are_refused_in_one_line_with_exit_2(coi_env, capsys, box, options,
                                                              problem):
    code, _, err = run_main(capsys, "container", "exec", box, *options, "--", "true")
    assert code == EXIT_USAGE
    assert problem in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(("argv", "problem"), [
    (["container", "exec", "coi-test-x", "ls"], "needs '--' before the command"),
    (["container", "exec", "coi-test-x", "--"], "needs a command after '--'"),
    (["container", "exec"], "needs '--' before the command"),
    (["container", "launch", "coi-test-image"], "container launch: missing <name>"),
    (["container", "mount", "coi-test-x", "dev", "/tmp"], "container mount: missing <path>"),
    (["file", "pull", "coi-test-x:/etc/hostname"], "file pull: missing <target>"),
])
def test_missing_arguments_are_usage_errors(coi_env, capsys, argv, problem):
    code, out, err = run_main(capsys, *argv)
    assert (code, out) == (EXIT_USAGE, "")
    first, *usage = err.splitlines()
    assert problem in first
    assert len(usage) <= 2
    assert all(line.lstrip().startswith(("usage: coi-container", "coi-container", "["))
               for line in usage)


def test_exec_in_a_missing_container_exits_3_and_capture_answers_in_json(coi_env, capsys):
    code, out, err = run_main(capsys, "container", "exec", "coi-test-nonexistent-zz",
                              "--capture", "--", "true")
    assert code == EXIT_NOT_FOUND
    record = parse_record(out, "error")
    assert record["code"] == "not_found"
    assert err.count("\n") == 1


def test_exec_in_a_stopped_container_says_to_start_it(coi_env, capsys, own):
    name = own(start=False)
    code, _, err = run_main(capsys, "container", "exec", name, "--", "true")
    assert code == EXIT_FAILED
    assert f"container {name} is stopped, not running (start it: coi container start {name})" \
        in err


# -- mount ---------------------------------------------------------------------------------


def test_mount_shows_a_host_directory_in_the_running_container(coi_env, capsys, box,
                                                               incus_client, run_in, tmp_path):
    shared = tmp_path / "shared dir"
    shared.mkdir()
    (shared / "hello.txt").write_text("from the host\n")
    device = f"m{secrets.token_hex(3)}"
    code, out, _ = run_main(capsys, "container", "mount", box, device, str(shared),
                            f"/mnt/{device}", "--shift")
    assert code == 0
    assert out == f"mounted {shared} at /mnt/{device} in {box} (device {device})\n"
    assert run_in(box, ["cat", f"/mnt/{device}/hello.txt"]).stdout == "from the host\n"
    settings = incus_client.instance(box)["devices"][device]
    assert settings == {"type": "disk", "source": str(shared), "path": f"/mnt/{device}",
                        "shift": "true"}


def test_mount_refuses_a_device_name_the_container_has(coi_env, capsys, box, tmp_path,
                                                       incus_client):
    code, _, err = run_main(capsys, "container", "mount", box, "root", str(tmp_path), "/mnt/x")
    assert code == EXIT_FAILED
    assert f"container {box} already has a device named root" in err
    assert incus_client.instance(box)["expanded_devices"]["root"]["path"] == "/"


@pytest.mark.parametrize(("source", "path", "code", "problem"), [
    ("missing", "/mnt/x", EXIT_NOT_FOUND, "does not exist"),
    ("file", "/mnt/x", EXIT_USAGE, "is not a directory"),
    ("dir", "mnt/x", EXIT_USAGE, "must be an absolute path"),
])
def test_mount_refuses_bad_sources_and_paths(coi_env, capsys, box, tmp_path, source, path,
                                             code, problem):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    got, _, err = run_main(capsys, "container", "mount", box, "dev", str(tmp_path / source),
                           path)
    assert got == code
    assert problem in err


def test_mount_on_a_missing_container_exits_3(coi_env, capsys, tmp_path):
    code, _, err = run_main(capsys, "container", "mount", "coi-test-nonexistent-zz", "dev",
                            str(tmp_path), "/mnt/x")
    assert code == EXIT_NOT_FOUND
    assert "container coi-test-nonexistent-zz does not exist" in err


# -- file push / pull -----------------------------------------------------------------------


def test_push_and_pull_round_trip_binary_content_mode_and_spaces(coi_env, box, where,
                                                                 tmp_path, run_in):
    source = tmp_path / "a file.bin"
    data = secrets.token_bytes(4096) + b"\x00 end"
    source.write_bytes(data)
    source.chmod(0o750)
    remote = f"{where}/dir with space/copy.bin"
    env = coi_env.environ()
    code, out, _ = coi("file", "push", str(source), f"{box}:{remote}", env=env)
    assert (code, out) == (0, f"pushed {source} to {box}:{remote}\n".encode())
    assert run_in(box, ["stat", "-c", "%a %s", remote]).stdout == f"750 {len(data)}\n"
    back = tmp_path / "back here" / "returned.bin"
    code, _, _ = coi("file", "pull", f"{box}:{remote}", str(back), env=env)
    assert code == 0
    assert back.read_bytes() == data
    assert stat.S_IMODE(back.stat().st_mode) == 0o750


def test_push_and_pull_into_existing_directories_keep_the_name(coi_env, capsys, box, where,
                                                               tmp_path):
    source = tmp_path / "name.txt"
    source.write_text("x")
    assert run_main(capsys, "file", "push", str(source), f"{box}:{where}/")[0] == 0
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, _ = run_main(capsys, "file", "pull", f"{box}:{where}/name.txt", str(out_dir))
    assert (code, out) == (0, f"pulled {box}:{where}/name.txt to {out_dir}/name.txt\n")
    assert (out_dir / "name.txt").read_text() == "x"


def test_push_and_pull_a_directory_tree_with_r(coi_env, capsys, box, where, tmp_path, run_in):
    tree = tmp_path / "my tree"
    (tree / "sub dir").mkdir(parents=True)
    (tree / "top.txt").write_text("top\n")
    (tree / "sub dir" / "deep.bin").write_bytes(b"\x00\x01\x02")
    (tree / "sub dir").chmod(0o700)
    os.symlink("top.txt", tree / "link")
    code, out, _ = run_main(capsys, "file", "push", "-r", str(tree), f"{box}:{where}/renamed")
    assert (code, out) == (0, f"pushed {tree} to {box}:{where}/renamed\n")
    listing = run_in(box, ["sh", "-c", f"cd {where}/renamed && find . | sort && "
                                       "stat -c %a 'sub dir' && readlink link"]).stdout
    assert listing.splitlines() == [".", "./link", "./sub dir", "./sub dir/deep.bin",
                                    "./top.txt", "700", "top.txt"]
    back = tmp_path / "back"
    code, _, _ = run_main(capsys, "file", "pull", "-r", f"{box}:{where}/renamed", str(back))
    assert code == 0
    assert (back / "top.txt").read_text() == "top\n"
    assert (back / "sub dir" / "deep.bin").read_bytes() == b"\x00\x01\x02"
    assert stat.S_IMODE((back / "sub dir").stat().st_mode) == 0o700
    assert not os.path.lexists(back / "link")  # a pull never makes links (SECURITY.md)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".coi-pull-")]


def test_directories_without_r_are_refused_both_ways(coi_env, capsys, box, tmp_path, run_in):
    code, _, err = run_main(capsys, "file", "push", str(tmp_path), f"{box}:/root/nope")
    assert code == EXIT_USAGE
    assert "is a directory (use -r to copy a directory)" in err
    assert run_in(box, ["test", "-e", "/root/nope"]).returncode == 1
    code, _, err = run_main(capsys, "file", "pull", f"{box}:/etc", str(tmp_path / "etc"))
    assert code == EXIT_USAGE
    assert f"{box}:/etc is a directory" in err
    assert not (tmp_path / "etc").exists()


def test_pull_r_never_merges_into_an_existing_directory(coi_env, capsys, box, tmp_path):
    existing = tmp_path / "workspace"
    existing.mkdir()
    (existing / "mine").write_text("keep")
    code, _, err = run_main(capsys, "file", "pull", "-r", f"{box}:/workspace", str(tmp_path))
    assert code == EXIT_FAILED
    assert f"{existing}' is an existing directory (remove it or choose another name)" in err
    assert sorted(p.name for p in existing.iterdir()) == ["mine"]


def test_pull_r_brings_only_files_and_directories_never_links_to_host_paths(
        coi_env, capsys, box, where, tmp_path, run_in):
    made = run_in(box, ["sh", "-c", f"mkdir -p {where}/sub && echo hi > {where}/a && "
                        f"ln -s / {where}/root && ln -s /etc/passwd {where}/sub/pw && "
                        f"ln -s /root/.ssh {where}/keys"])
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "file", "pull", "-r", f"{box}:{where}", str(out))
    assert code == 0, err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["a", "sub"]
    assert not any(p.is_symlink() for p in out.rglob("*"))


def test_pull_of_a_tree_holding_a_fifo_stops_and_writes_nothing(coi_env, capsys, box, where,
                                                                tmp_path, run_in):
    """Bounded: the copy stalls on the FIFO (no writer) and is stopped after
    PULL_IDLE_SECONDS (20 s) instead of hanging for ever."""
    made = run_in(box, ["sh", "-c", f"mkdir -p {where} && echo hi > {where}/a && "
                        f"mkfifo {where}/pipe"])
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_main(capsys, "file", "pull", "-r", f"{box}:{where}", str(out / "d"))
    assert code == EXIT_USAGE, err
    assert "stalled" in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(("verb", "args", "problem"), [
    ("push", ["FILE", "/tmp/x"], "destination '/tmp/x' is not NAME:PATH"),
    ("push", ["FILE", ":/tmp/x"], "has no container name before ':'"),
    ("push", ["FILE", "BOX:tmp/x"], "the path in the container must be absolute"),
    ("push", ["FILE", "Bad_Name:/tmp/x"], "container name 'Bad_Name' contains"),
    ("pull", ["/etc/hostname", "OUT"], "source '/etc/hostname' is not NAME:PATH"),
    ("pull", ["BOX:", "OUT"], "the path in the container must be absolute"),
])
def test_malformed_name_path_is_refused_with_exit_2(coi_env, capsys, box, tmp_path, verb,
                                                    args, problem):
    (tmp_path / "file").write_text("x")
    swap = {"FILE": str(tmp_path / "file"), "OUT": str(tmp_path / "out")}
    argv = [swap.get(a, a.replace("BOX", box)) for a in args]
    code, out, err = run_main(capsys, "file", verb, *argv)
    assert (code, out) == (EXIT_USAGE, "")
    assert problem in err
    assert not (tmp_path / "out").exists()


def test_missing_sources_exit_3(coi_env, capsys, box, tmp_path):
    code, _, err = run_main(capsys, "file", "push", str(tmp_path / "nope"), f"{box}:/root/x")
    assert code == EXIT_NOT_FOUND
    assert "host path" in err
    assert "does not exist" in err
    code, _, err = run_main(capsys, "file", "pull", f"{box}:/root/no-such-file",
                            str(tmp_path / "x"))
    assert code == EXIT_NOT_FOUND
    assert f"{box}:/root/no-such-file does not exist" in err
    assert not (tmp_path / "x").exists()


def test_push_and_pull_with_a_missing_container_exit_3(coi_env, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for argv in (["push", str(tmp_path / "file"), "coi-test-nonexistent-zz:/root/x"],
                 ["pull", "coi-test-nonexistent-zz:/etc/hostname", str(tmp_path / "out")]):
        code, _, err = run_main(capsys, "file", *argv)
        assert code == EXIT_NOT_FOUND
        assert "container coi-test-nonexistent-zz does not exist" in err


# -- file push: what it makes belongs to code ------------------------------------------------

HOST_USER = 1001
"""A non-root host user (a number only) whose session container maps it to code."""


@pytest.fixture
def session_box(make_container, open_tmp):
    """A running container set up as a session of HOST_USER: raw.idmap maps the host
    user to code (1000) and HOST_USER's workspace is at /workspace. Returns (name, the
    host workspace)."""
    ensure_subids([HOST_USER], [HOST_USER])  # what coi setup allows for its users
    workspace = open_tmp / "workspace"
    workspace.mkdir()
    os.chown(workspace, HOST_USER, HOST_USER)
    idmap = f"uid {HOST_USER} {TOOL_UID}\ngid {HOST_USER} {TOOL_UID}"
    box = make_container(config={"raw.idmap": idmap}, devices={
        "workspace": {"type": "disk", "source": str(workspace), "path": "/workspace"}})
    return box.name, workspace


def owners_inside(run_in, box, *paths):
    done = run_in(box, ["stat", "-c", "%u:%g %a %n", *paths])
    assert done.ok, done.stderr
    return done.stdout.splitlines()


def test_pushed_files_belong_to_code_so_the_host_user_keeps_them_and_code_can_change_them(
        coi_env, capsys, session_box, run_in, tmp_path):
    box, workspace = session_box
    note = tmp_path / "note.txt"
    note.write_text("pushed\n")
    note.chmod(0o640)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "top.txt").write_text("top\n")
    (tree / "sub" / "deep.txt").write_text("deep\n")
    (tree / "sub").chmod(0o750)
    (tree / "top.txt").chmod(0o600)
    assert run_main(capsys, "file", "push", str(note), f"{box}:/workspace/")[0] == 0
    assert run_main(capsys, "file", "push", "-r", str(tree), f"{box}:/workspace/")[0] == 0

    assert owners_inside(run_in, box, "/workspace/note.txt", "/workspace/tree",
                         "/workspace/tree/sub", "/workspace/tree/top.txt",
                         "/workspace/tree/sub/deep.txt") == [
        "1000:1000 640 /workspace/note.txt", "1000:1000 755 /workspace/tree",
        "1000:1000 750 /workspace/tree/sub", "1000:1000 600 /workspace/tree/top.txt",
        "1000:1000 644 /workspace/tree/sub/deep.txt"]
    for path in ("note.txt", "tree", "tree/sub", "tree/top.txt", "tree/sub/deep.txt"):
        host = (workspace / path).stat()
        assert (host.st_uid, host.st_gid) == (HOST_USER, HOST_USER), path
    changed = run_in(box, ["sh", "-c", "echo more >> /workspace/note.txt && "
                                       "echo more >> /workspace/tree/top.txt && "
                                       "touch /workspace/tree/sub/new && "
                                       "rm /workspace/tree/sub/deep.txt"], user=TOOL_UID)
    assert changed.ok, changed.stderr
    assert (workspace / "note.txt").read_text() == "pushed\nmore\n"
    assert (workspace / "tree" / "sub" / "new").stat().st_uid == HOST_USER


def test_push_takes_an_owner_group_and_mode(coi_env, capsys, box, where, tmp_path, run_in):
    source = tmp_path / "key"
    source.write_text("secret\n")
    source.chmod(0o644)
    code, _, err = run_main(capsys, "file", "push", "--uid", "0", "--mode", "600", str(source),
                            f"{box}:{where}/root-key")
    assert code == 0, err
    code, _, err = run_main(capsys, "file", "push", "--uid", "1000", "--gid", "0", str(source),
                            f"{box}:{where}/mixed")
    assert code == 0, err
    assert owners_inside(run_in, box, f"{where}/root-key", f"{where}/mixed") == [
        f"0:0 600 {where}/root-key", f"1000:0 644 {where}/mixed"]


def test_push_r_with_a_mode_sets_the_files_and_keeps_the_directories(coi_env, capsys, box,
                                                                     where, tmp_path, run_in):
    tree = tmp_path / "tree"
    (tree / "private").mkdir(parents=True)
    (tree / "private").chmod(0o700)
    (tree / "private" / "a").write_text("a")
    (tree / "b").write_text("b")
    code, _, err = run_main(capsys, "file", "push", "-r", "--mode", "0640", "--uid", "1000",
                            "--gid", "1000", str(tree), f"{box}:{where}/copy")
    assert code == 0, err
    assert owners_inside(run_in, box, f"{where}/copy/private", f"{where}/copy/private/a",
                         f"{where}/copy/b") == [
        f"1000:1000 700 {where}/copy/private", f"1000:1000 640 {where}/copy/private/a",
        f"1000:1000 640 {where}/copy/b"]


def test_push_r_skips_fifos_and_says_so(coi_env, capsys, box, where, tmp_path, run_in):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("x")
    os.mkfifo(tree / "pipe")
    code, out, _ = run_main(capsys, "file", "push", "-r", str(tree), f"{box}:{where}/t")
    assert (code, out) == (0, f"pushed {tree} to {box}:{where}/t (skipped 1 device, FIFO or "
                              "socket file)\n")
    assert run_in(box, ["ls", f"{where}/t"]).stdout == "file\n"


# -- help ------------------------------------------------------------------------------------


def test_help_states_the_stop_timeout_the_code_uses(coi_env, capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code is None  # docopt's SystemExit after printing help: status 0
    assert f"waiting up to {STOP_TIMEOUT} s" in out
    assert f"in the container. Default: {TOOL_UID}\n" in out
    assert out.strip() == USAGE.strip()


def test_exec_json_record_round_trips_through_json(coi_env, capsys, box):
    _, out, _ = run_main(capsys, "container", "exec", box, "--capture", "--", "printf",
                         "caf\\303\\251 \\377")
    assert json.loads(out)["stdout"] == "caf\u00e9 \ufffd"


@pytest.mark.parametrize("source", ["/", "/etc", "/var/lib/incus"])
def test_container_mount_of_a_host_secret_or_system_path_is_refused_before_incus(
        capsys, box, source):
    code, _, err = run_main(capsys, "container", "mount", box, "extra", source, "/mnt/extra")
    assert code == EXIT_USAGE, err
    assert "may not be mounted into a session" in err
    assert "extra" not in Incus().instance_config(box).get("devices", {})
