"""The porcelain is the plumbing: `coi run FLAGS -- CMD` and `coi-slot next FLAGS` piped
into `coi-shell run --record` make the same container and give the same result, as the
non-root member in the default (restricted) network mode."""

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from coi_common import naming

pytestmark = pytest.mark.incus

PROBE = ("echo A=$A; nproc; cat /sys/fs/cgroup/pids.max; ls /data; "
         "cat /storage/note; wc -c < /workspace/.env")
VOLATILE = ("volatile.", "image.")


def _flags(user_coi, slot: int, data: Path, storage: Path) -> list[str]:
    return ["--persistent", "--slot", str(slot), "--env", "A=from-a-flag", "--cpu", "1",
            "--memory", "512MiB", "--processes", "300", "--mount", f"{data}:/data:ro",
            "--storage", str(storage), "--no-mask"]


def _shared_dirs(user_coi) -> tuple[Path, Path]:
    data = Path(user_coi.workspace).parent / f"{Path(user_coi.workspace).name}-data"
    storage = Path(user_coi.workspace).parent / f"{Path(user_coi.workspace).name}-storage"
    for folder in (data, storage):
        folder.mkdir()
        os.chown(folder, user_coi.user.uid, user_coi.user.gid)
    (data / "in-data").write_text("x")
    (storage / "note").write_text("kept\n")
    (Path(user_coi.workspace) / ".env").write_text("SECRET=1\n")
    for path in (data / "in-data", storage / "note", Path(user_coi.workspace) / ".env"):
        os.chown(path, user_coi.user.uid, user_coi.user.gid)
    return data, storage


def _comparable(instance: dict) -> dict:
    """What the flags decided about a container: its config and devices, without what
    differs by slot alone (its name, slot key, view directory, the start hook's words for
    them) or Incus's own state."""
    config = {k: v for k, v in instance["config"].items()
              if not k.startswith(VOLATILE) and k != "user.coi.slot"}
    # coi-net's start hook names the container and its interface.
    hook = config.get("raw.lxc", "").replace(instance["name"], "NAME")
    config["raw.lxc"] = hook.replace(instance["devices"]["eth0"].get("host_name", "-"), "IF")
    devices = {name: {k: v for k, v in device.items() if k != "source" or name != "workspace"}
               for name, device in instance["devices"].items()}
    nic = devices.get("eth0", {})
    nic.pop("host_name", None)  # coi's fixed host-side name, from the container's name
    return {"config": config, "devices": devices}


@pytest.fixture
def dirs(user_coi):
    data, storage = _shared_dirs(user_coi)
    yield data, storage
    for folder in (data, storage):
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


def test_a_pipeline_of_coi_slot_next_and_coi_shell_is_coi_run_flags_included(
        user_coi, incus_client, dirs):
    data, storage = dirs
    porcelain = user_coi("run", *_flags(user_coi, 1, data, storage), "--", "sh", "-c", PROBE)
    assert porcelain.returncode == 0, porcelain.stderr
    record = Path(user_coi.workspace) / ".." / f"{Path(user_coi.workspace).name}-slot.json"
    next_flags = shlex.join(_flags(user_coi, 2, data, storage))
    script = (f"coi-slot next {next_flags} > {shlex.quote(str(record))} && "
              f"coi-shell run --record {shlex.quote(str(record))} -- sh -c {shlex.quote(PROBE)}")
    bin_dir = Path(user_coi.user.coi).parent
    piped = user_coi.user.run(["sh", "-c", f"PATH={bin_dir}:$PATH; {script}"],
                              env=user_coi.env, cwd=user_coi.workspace, timeout=180)
    try:
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout == porcelain.stdout
        assert "A=from-a-flag" in piped.stdout
        assert piped.stdout.endswith("\n9\n")  # --no-mask: .env shown whole (9 bytes)
        slot_record = json.loads(record.read_text())
        assert (slot_record["kind"], slot_record["slot"]) == ("slot", 2)
    finally:
        record.unlink(missing_ok=True)
    first, second = (incus_client.instance(naming.container_name(
        str(user_coi.workspace), slot, user_coi.prefix)) for slot in (1, 2))
    assert _comparable(first) == _comparable(second)
    assert first["config"]["limits.processes"] == "300"


def test_a_slot_record_with_flags_beside_it_is_refused(user_coi):
    done = user_coi("run", "--persistent", "--record", "/nonexistent", "--", "true")
    assert done.returncode == 2
    assert "with a slot record the record says everything" in done.stderr


def test_coi_run_is_its_children_as_the_trace_shows(user_coi):
    """COI_TRACE names every external call: the porcelain's children among them, each
    with its duration and exit, and the children's own calls under their own pids."""
    trace = Path(user_coi.workspace).parent / f"{Path(user_coi.workspace).name}.trace"
    trace.touch()
    os.chown(trace, user_coi.user.uid, user_coi.user.gid)
    try:
        done = user_coi("run", "--", "true", env={"COI_TRACE": str(trace)})
        text = trace.read_text()
    finally:
        trace.unlink()
    assert done.returncode == 0, done.stderr
    children: dict[str, list[str]] = {}
    for line in text.splitlines():
        _, pid, kind, *what = line.split()
        assert re.search(r" [0-9]+\.[0-9] ms ", line), line  # every call has its duration
        if kind == "child":
            children.setdefault(pid, []).append(" ".join(what[:2]))
    assert sorted(children.values()) == [
        ["coi-session save", "coi-net remove"],  # coi-slot end's own
        ["coi-slot next", "coi-net apply", "coi-session restore", "coi-slot end"]], text
